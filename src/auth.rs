//! Authentication: turns the token of an upgrade request into a user id, or a reason to refuse.
//!
//! The user id comes only from the verified token (`sub` of a JWT, or the token itself in dev
//! mode), never from another query parameter.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::access::{GrantClaims, RoomGrant};
use crate::config::{AuthMode, MAX_USER_ID_BYTES};
use crate::UserId;

/// Why a token was refused. Each maps to HTTP 401 with the `Display` text as its one-line body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `?token=` and no `Authorization: Bearer`. The client must send a token.
    #[error("missing token")]
    Missing,
    /// The token is not a JWT, or the user id in it is unusable.
    #[error("malformed token")]
    Malformed,
    /// The JWT's `exp` is in the past. The client must fetch a fresh token.
    #[error("token expired")]
    Expired,
    /// The JWT was not signed with the configured secret.
    #[error("invalid signature")]
    BadSignature,
    /// Any other failed check (algorithm, audience, issuer, not yet valid, missing claim).
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(flatten)]
    grant: GrantClaims,
}

/// What a verified token says: who, until when, and where (see [`crate::access`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub`, or the dev token).
    pub user: UserId,
    /// The JWT's `exp` in Unix seconds; `None` in dev mode (such a session does not expire).
    pub exp: Option<u64>,
    /// The rooms the `rooms`/`rooms_read` claims allow; `None` without either claim.
    pub grant: Option<RoomGrant>,
    /// The token's whole claims, for the connect hook; `None` in dev mode.
    pub claims: Option<serde_json::Value>,
}

/// Verifies tokens according to the configured [`AuthMode`].
pub struct Authenticator {
    mode: Mode,
}

// One per server: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Mode {
    Dev,
    Jwt {
        key: DecodingKey,
        validation: Validation,
    },
}

impl Authenticator {
    /// Builds the verifier; JWT mode accepts HS256 only, so `alg: none` and others are refused.
    pub fn new(mode: &AuthMode) -> Self {
        let mode = match mode {
            AuthMode::Dev => Mode::Dev,
            AuthMode::Jwt {
                secret,
                audience,
                issuer,
                leeway,
            } => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.leeway = leeway.as_secs();
                // jsonwebtoken checks `aud`/`iss` only when present unless they are required:
                // a configured audience or issuer must also refuse tokens without the claim.
                let mut required = vec!["exp", "sub"];
                required.extend(audience.as_ref().map(|_| "aud"));
                required.extend(issuer.as_ref().map(|_| "iss"));
                validation.set_required_spec_claims(&required);
                validation.validate_nbf = true;
                match audience {
                    Some(aud) => validation.set_audience(&[aud]),
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = issuer {
                    validation.set_issuer(&[iss]);
                }
                Mode::Jwt {
                    key: DecodingKey::from_secret(secret.as_bytes()),
                    validation,
                }
            }
        };
        Authenticator { mode }
    }

    /// Whether tokens are taken as user ids without verification.
    pub fn is_dev(&self) -> bool {
        matches!(self.mode, Mode::Dev)
    }

    /// Verifies `token` and returns the user id it names.
    pub fn authenticate(&self, token: Option<&str>) -> Result<UserId, AuthError> {
        self.identify(token).map(|identity| identity.user)
    }

    /// Verifies `token` and returns everything the session needs from it.
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let identity = match &self.mode {
            Mode::Dev => Identity {
                user: UserId::from(token),
                exp: None,
                grant: None,
                claims: None,
            },
            Mode::Jwt { key, validation } => {
                let claims = jsonwebtoken::decode::<serde_json::Value>(token, key, validation)
                    .map_err(|e| map_jwt_error(e.kind()))?
                    .claims;
                let typed = Claims::deserialize(&claims).map_err(|_| AuthError::Malformed)?;
                Identity {
                    user: UserId::from(typed.sub),
                    exp: typed.exp,
                    grant: typed.grant.grant(),
                    claims: Some(claims),
                }
            }
        };
        if !valid_user_id(&identity.user) {
            return Err(AuthError::Malformed);
        }
        Ok(identity)
    }

    /// The clock-skew allowance for `exp`, in seconds (0 in dev mode).
    pub fn leeway_secs(&self) -> u64 {
        match &self.mode {
            Mode::Dev => 0,
            Mode::Jwt { validation, .. } => validation.leeway,
        }
    }
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::Invalid("algorithm not allowed")
        }
        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer"),
        ErrorKind::ImmatureSignature => AuthError::Invalid("token not yet valid"),
        ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing required claim"),
        _ => AuthError::Malformed,
    }
}

/// A user id is 1..=[`MAX_USER_ID_BYTES`] bytes with no control characters.
pub fn valid_user_id(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_ID_BYTES && !user.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn jwt_auth() -> Authenticator {
        Authenticator::new(&AuthMode::Jwt {
            secret: SECRET.into(),
            audience: None,
            issuer: None,
            leeway: Duration::ZERO,
        })
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn dev_mode_takes_the_token_as_user() {
        let auth = Authenticator::new(&AuthMode::Dev);
        assert_eq!(&*auth.authenticate(Some("alice")).unwrap(), "alice");
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert_eq!(auth.authenticate(Some("")), Err(AuthError::Missing));
        assert_eq!(auth.authenticate(Some("a\nb")), Err(AuthError::Malformed));
    }

    #[test]
    fn good_jwt_yields_sub() {
        let t = token(json!({"sub": "u1", "exp": now() + 60}), SECRET);
        assert_eq!(&*jwt_auth().authenticate(Some(&t)).unwrap(), "u1");
    }

    #[test]
    fn identity_carries_exp_and_the_room_claims() {
        let exp = now() + 60;
        let t = token(
            json!({"sub": "u1", "exp": exp, "rooms": ["team:*"], "rooms_read": ["news"]}),
            SECRET,
        );
        let id = jwt_auth().identify(Some(&t)).unwrap();
        assert_eq!(id.exp, Some(exp));
        let grant = id.grant.unwrap();
        assert!(grant.may_send("team:1") && grant.may_join("news") && !grant.may_send("news"));
        assert_eq!(id.claims.unwrap()["rooms_read"][0], "news");
        let plain = token(json!({"sub": "u1", "exp": exp}), SECRET);
        assert_eq!(jwt_auth().identify(Some(&plain)).unwrap().grant, None);
        let bad_rooms = token(json!({"sub": "u1", "exp": exp, "rooms": "x"}), SECRET);
        assert_eq!(
            jwt_auth().identify(Some(&bad_rooms)),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn expired_wrong_signature_and_garbage_are_refused() {
        let auth = jwt_auth();
        let expired = token(json!({"sub": "u1", "exp": now() - 10}), SECRET);
        assert_eq!(auth.authenticate(Some(&expired)), Err(AuthError::Expired));
        let forged = token(
            json!({"sub": "u1", "exp": now() + 60}),
            "another-secret-of-enough-length",
        );
        assert_eq!(
            auth.authenticate(Some(&forged)),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            auth.authenticate(Some("garbage")),
            Err(AuthError::Malformed)
        );
        let no_exp = token(json!({"sub": "u1"}), SECRET);
        assert!(matches!(
            auth.authenticate(Some(&no_exp)),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn configured_audience_and_issuer_are_required() {
        let auth = Authenticator::new(&AuthMode::Jwt {
            secret: SECRET.into(),
            audience: Some("sb".into()),
            issuer: Some("idp".into()),
            leeway: Duration::ZERO,
        });
        let exp = now() + 60;
        let t = token(
            json!({"sub": "u1", "exp": exp, "aud": "sb", "iss": "idp"}),
            SECRET,
        );
        assert_eq!(&*auth.authenticate(Some(&t)).unwrap(), "u1");
        for claims in [
            json!({"sub": "u1", "exp": exp, "iss": "idp"}),
            json!({"sub": "u1", "exp": exp, "aud": "sb"}),
        ] {
            let t = token(claims, SECRET);
            assert_eq!(
                auth.authenticate(Some(&t)),
                Err(AuthError::Invalid("missing required claim"))
            );
        }
    }

    #[test]
    fn alg_none_is_refused() {
        use base64_like::encode_url;
        let header = encode_url(br#"{"alg":"none","typ":"JWT"}"#);
        let body = encode_url(format!(r#"{{"sub":"u1","exp":{}}}"#, now() + 60).as_bytes());
        let t = format!("{header}.{body}.");
        assert!(jwt_auth().authenticate(Some(&t)).is_err());
    }

    /// Minimal base64url (no padding) so the test can forge an unsigned token.
    mod base64_like {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        pub fn encode_url(input: &[u8]) -> String {
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let b = [
                    chunk[0],
                    *chunk.get(1).unwrap_or(&0),
                    *chunk.get(2).unwrap_or(&0),
                ];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
