//! Where a Redis URL points (the topology, each node's URL, the clients and TLS settings a
//! [`RedisConfig`] gives) and what a fresh connection sends first: the address (and TLS for
//! `rediss://`), then `AUTH` and `SELECT` as the URL asks. Shared by the subscriber's links and the cores' publishing links.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use redis::{ConnectionInfo, IntoConnectionInfo};
use rustls::pki_types::ServerName;

use super::RedisConfig;
use crate::connection::Socket;

/// How the backplane reaches the servers a [`RedisConfig`] names.
impl RedisConfig {
    /// The initial topology: the cluster's slot map, or the one server of `url`.
    pub(crate) fn topology(&self) -> std::io::Result<super::cluster::SlotMap> {
        use redis::IntoConnectionInfo;
        if !self.cluster.is_empty() {
            let map = super::cluster::SlotMap::fetch(self)?;
            return Ok(if self.sharded() {
                map
            } else {
                super::cluster::SlotMap::single(map.shards[0].clone())
            });
        }
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(std::io::Error::other)?;
        match info.addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                Ok(super::cluster::SlotMap::single(format!("{host}:{port}")))
            }
            _ => Err(std::io::Error::other(
                "only redis:// and rediss:// URLs are supported",
            )),
        }
    }

    /// A client of the `redis` crate for `url` (the publisher's, the workers'), trusting
    /// `--redis-ca-cert` for a `rediss://` URL when given.
    pub(crate) fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match self.ca_pem() {
            Ok(Some(root_cert)) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            ),
            Ok(None) => redis::Client::open(url),
            Err(e) => Err(redis::RedisError::from(std::io::Error::other(e))),
        }
    }

    /// The TLS client settings for the backplane's own non-blocking links (`rediss://`).
    pub(crate) fn tls_client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        if !self.tls() {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        match self.ca_pem()? {
            Some(pem) => {
                use rustls::pki_types::pem::PemObject;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| e.to_string())?;
                    roots.add(cert).map_err(|e| e.to_string())?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(crate::connection::crypto_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(Arc::new(config)))
    }

    /// `rediss://` or `redis://`, as `url` says.
    pub(crate) fn scheme(&self) -> &'static str {
        if self.tls() {
            "rediss://"
        } else {
            "redis://"
        }
    }

    /// A client for one node, with the credentials of `url`.
    pub(crate) fn node_url(&self, addr: &str) -> String {
        match self
            .url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
        {
            Some((creds, _)) if !self.cluster.is_empty() => {
                format!("{}{creds}@{addr}", self.scheme())
            }
            _ if self.cluster.is_empty() => self.url.clone(),
            _ => format!("{}{addr}", self.scheme()),
        }
    }
}

/// A parsed `redis://` or `rediss://` URL and its first resolved address.
pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    pub info: ConnectionInfo,
    /// For `rediss://`: the name the certificate must carry (the URL's host).
    tls_name: Option<ServerName<'static>>,
}

impl Endpoint {
    /// Parses `url` and resolves its host (an IP literal resolves without a lookup).
    pub fn resolve(url: &str) -> io::Result<Self> {
        let info = url.into_connection_info().map_err(io::Error::other)?;
        let (host, port, tls) = match info.addr().clone() {
            redis::ConnectionAddr::Tcp(host, port) => (host, port, false),
            redis::ConnectionAddr::TcpTls { host, port, .. } => (host, port, true),
            _ => {
                return Err(io::Error::other(
                    "only redis:// and rediss:// URLs are supported",
                ))
            }
        };
        let tls_name = if tls {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::other(format!("rediss:// host {host:?}: {e}")))?;
            Some(name)
        } else {
            None
        };
        let addr = (host.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other("redis host did not resolve"))?;
        Ok(Endpoint {
            addr,
            info,
            tls_name,
        })
    }

    /// The socket to talk to Redis over: `tcp` itself, or TLS over it for `rediss://` (the
    /// handshake then runs in the link's non-blocking reads and writes).
    pub fn wrap(
        &self,
        tcp: mio::net::TcpStream,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> io::Result<Socket> {
        match (&self.tls_name, tls) {
            (None, _) => Ok(Socket::Plain(tcp)),
            (Some(name), Some(config)) => Socket::tls_client(tcp, Arc::clone(config), name.clone()),
            (Some(_), None) => Err(io::Error::other(
                "rediss:// but no TLS settings (see the --redis-ca-cert error at start)",
            )),
        }
    }

    /// Appends the `AUTH` the URL asks for to `out`; returns how many commands (0 or 1).
    pub fn write_auth(&self, out: &mut Vec<u8>) -> usize {
        let settings = self.info.redis_settings();
        let Some(password) = settings.password() else {
            return 0;
        };
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
        auth.write_packed_command(out);
        1
    }

    /// Appends the `SELECT` of a URL with a database other than 0; returns how many commands.
    /// (Not for subscribers: pub/sub ignores the database.)
    pub fn write_select(&self, out: &mut Vec<u8>) -> usize {
        let db = self.info.redis_settings().db();
        if db == 0 {
            return 0;
        }
        redis::cmd("SELECT").arg(db).write_packed_command(out);
        1
    }
}

/// A Redis or socket error as an operator reads it: what failed and what to check. Messages it
/// does not know are returned as they are.
pub(crate) fn plain_words(error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    let said = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    let plain = if said(&["wrongpass", "invalid username-password", "invalid password"]) {
        "authentication failed: Redis refused the user name or password in --redis-url"
    } else if said(&["noauth", "authentication required"]) {
        "Redis wants a password: give it in --redis-url (redis://:PASSWORD@host:port)"
    } else if said(&["noperm", "no permissions"]) {
        "the Redis user may not run a command this server needs (pub/sub, scripts, streams)"
    } else if said(&["connection refused"]) {
        "connection refused: nothing listens at the Redis address (is Redis running?)"
    } else if said(&["timed out", "timeout"]) {
        "Redis did not answer in time"
    } else if said(&["readonly"]) {
        "this Redis is a read-only replica (after a failover?); reconnecting"
    } else if said(&["loading"]) {
        "Redis is loading its data set; retrying"
    } else if said(&["certificate", "tls", "handshake"]) {
        "the TLS handshake with Redis failed (check rediss:// and --redis-ca-cert)"
    } else if said(&[
        "connection reset",
        "broken pipe",
        "unexpected eof",
        "end of file",
    ]) {
        "Redis closed the connection"
    } else {
        return error.to_string();
    };
    format!("{plain} [{}]", error.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_in_plain_words() {
        let wrong = plain_words("WRONGPASS invalid username-password pair or user is disabled.");
        assert!(wrong.starts_with("authentication failed"), "{wrong}");
        assert!(plain_words("NOAUTH Authentication required.").contains("wants a password"));
        assert!(plain_words("Connection refused (os error 111)").starts_with("connection refused"));
        assert_eq!(plain_words("ERR something new"), "ERR something new");
    }

    #[test]
    fn auth_and_select_follow_the_url() {
        let plain = Endpoint::resolve("redis://127.0.0.1:6390").unwrap();
        let mut out = Vec::new();
        assert_eq!(plain.write_auth(&mut out) + plain.write_select(&mut out), 0);
        assert!(out.is_empty());

        let full = Endpoint::resolve("redis://u:pw@127.0.0.1:6390/3").unwrap();
        assert_eq!(full.addr.port(), 6390);
        assert_eq!(full.write_auth(&mut out), 1);
        assert_eq!(full.write_select(&mut out), 1);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$2\r\npw\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"),
            "{text}"
        );
    }
}
