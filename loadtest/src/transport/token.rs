//! Auth tokens for the `?token=` query: the user id itself in dev mode, or an HS256 JWT
//! (`sub` = user id, `exp`) minted locally from `--jwt-secret`.

use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
}

pub enum Minter {
    Dev,
    Jwt { key: EncodingKey, ttl_s: u64 },
}

impl Minter {
    pub fn new(secret: Option<&str>, ttl_s: u64) -> Self {
        match secret {
            Some(s) => Self::Jwt {
                key: EncodingKey::from_secret(s.as_bytes()),
                ttl_s,
            },
            None => Self::Dev,
        }
    }

    pub fn token(&self, user_id: &str, now_s: u64) -> Result<String, String> {
        match self {
            Self::Dev => Ok(user_id.to_owned()),
            Self::Jwt { key, ttl_s } => encode(
                &Header::default(),
                &Claims {
                    sub: user_id,
                    exp: now_s + ttl_s,
                    iat: now_s,
                },
                key,
            )
            .map_err(|e| format!("cannot mint JWT: {e}")),
        }
    }

    /// The native upgrade path for `user_id`, with a token minted now.
    pub fn native_path(&self, base: &str, user_id: &str) -> Result<String, String> {
        Ok(native_path(base, &self.token(user_id, unix_now_s())?))
    }
}

/// Request path for a native upgrade: `<base>?token=<token>`.
pub fn native_path(base: &str, token: &str) -> String {
    format!("{base}?token={token}")
}

pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};

    #[derive(serde::Deserialize)]
    struct Back {
        sub: String,
        exp: u64,
    }

    #[test]
    fn dev_token_is_user_id() {
        assert_eq!(Minter::new(None, 60).token("u17", 0).unwrap(), "u17");
        assert_eq!(
            Minter::new(None, 60).native_path("/ws", "u17").unwrap(),
            "/ws?token=u17"
        );
    }

    #[test]
    fn jwt_verifies_with_the_same_secret() {
        let now = unix_now_s();
        let t = Minter::new(Some("s3cret"), 600).token("u17", now).unwrap();
        let got = decode::<Back>(
            &t,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(got.claims.sub, "u17");
        assert_eq!(got.claims.exp, now + 600);
        assert!(decode::<Back>(
            &t,
            &DecodingKey::from_secret(b"other"),
            &Validation::new(Algorithm::HS256)
        )
        .is_err());
        // Tokens go in a query string: base64url, no characters needing escapes.
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'));
    }
}
