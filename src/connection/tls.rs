//! TLS on the listen port: the server's certificate (reloadable), and [`Socket`], a
//! non-blocking socket that is plain TCP or TLS — a client's connection to the server, or the
//! server's own connection to Redis (`rediss://`). The handshake runs inside the owner's loop
//! like any other read: a TLS socket's `read` feeds rustls what the TCP socket holds and writes
//! what rustls answers, returning WouldBlock when the TCP socket is empty, so no call ever
//! blocks. Bytes written before the handshake ends wait in rustls until it does.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use super::reply::ShutWrite;

/// A non-blocking socket: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Socket {
    /// `ws://`, `http://`, `redis://`.
    Plain(TcpStream),
    /// `wss://`, `https://`, `rediss://`. Boxed: the rustls state is a few hundred bytes, and
    /// plain sockets should not pay for it.
    Tls(Box<TlsSocket>),
}

/// TLS over a non-blocking TCP socket, either side.
#[derive(Debug)]
pub struct TlsSocket {
    tcp: TcpStream,
    tls: rustls::Connection,
    /// The write side is to be shut once rustls has written everything (close_notify last).
    shut: bool,
}

impl Socket {
    /// Plain TCP: a read shorter than asked means the kernel buffer is empty. Not so over TLS,
    /// where a read stops at the end of a record.
    pub fn is_plain(&self) -> bool {
        matches!(self, Socket::Plain(_))
    }

    /// The client side of TLS to `name` over a connected (or connecting) socket.
    pub fn tls_client(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Socket> {
        let tls = ClientConnection::new(config, name).map_err(io::Error::other)?;
        Ok(Socket::Tls(Box::new(TlsSocket {
            tcp,
            tls: tls.into(),
            shut: false,
        })))
    }

    /// The TCP socket, for (de)registration and its addresses.
    pub fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Socket::Plain(tcp) => tcp,
            Socket::Tls(tls) => &mut tls.tcp,
        }
    }

    /// Whether a short read means the TCP socket is empty. Not with TLS: rustls may hand back
    /// part of what it decrypted while the socket still holds more.
    pub fn short_read_drains(&self) -> bool {
        matches!(self, Socket::Plain(_))
    }
}

impl TlsSocket {
    /// Writes what rustls has queued (handshake messages, records, alerts) until done or
    /// WouldBlock; then shuts the write side if that was asked for.
    fn write_queued(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.shut {
            let _ = self.tcp.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Like [`TlsSocket::write_queued`], where WouldBlock is no error: the rest goes later.
    fn write_queued_some(&mut self) -> io::Result<()> {
        match self.write_queued() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = match self {
            Socket::Plain(tcp) => return tcp.read(buf),
            Socket::Tls(s) => s,
        };
        loop {
            match s.tls.reader().read(buf) {
                // Ok(0): the peer's close_notify.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            s.write_queued_some()?;
            match s.tls.read_tls(&mut s.tcp) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            if let Err(e) = s.tls.process_new_packets() {
                // Tell the peer why (the alert rustls queued), then fail the connection.
                let _ = s.write_queued_some();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake answers go out now: the peer waits for them before sending more.
            s.write_queued_some()?;
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let s = match self {
            Socket::Plain(tcp) => return tcp.write(buf),
            Socket::Tls(s) => s,
        };
        // Records still unsent: take nothing more, so what waits is bounded by the caller's
        // own buffer (tungstenite's max_write_buffer_size), not by rustls.
        s.write_queued()?;
        let n = s.tls.writer().write(buf)?;
        s.write_queued_some()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Plain(tcp) => tcp.flush(),
            Socket::Tls(s) => s.write_queued(),
        }
    }
}

impl ShutWrite for Socket {
    fn shut_write(&mut self) {
        match self {
            Socket::Plain(tcp) => tcp.shut_write(),
            Socket::Tls(s) => {
                s.tls.send_close_notify();
                s.shut = true;
                let _ = s.write_queued();
            }
        }
    }
}

/// The server's TLS settings: the certificate and key files, and the certificate in force,
/// which [`ServerTls::reload`] replaces (SIGHUP in the binary). Handshakes begun after a reload
/// get the new certificate; open connections keep theirs.
pub struct ServerTls {
    config: Arc<ServerConfig>,
    current: Arc<CurrentCert>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// The certificate every new handshake gets.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|cert| Arc::clone(&cert))
    }
}

impl ServerTls {
    /// Loads the PEM certificate chain and private key. The error names the file and what is
    /// wrong with it.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, String> {
        let key = load_certified_key(cert_path, key_path)?;
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(key))));
        let provider = Arc::new(crypto_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        // WebSocket upgrades are HTTP/1.1; a client offering h2 must not pick it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            current,
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
        })
    }

    /// Reads the files again; on success new handshakes use the new certificate. On error the
    /// old one stays in force.
    pub fn reload(&self) -> Result<(), String> {
        let key = load_certified_key(&self.cert_path, &self.key_path)?;
        let mut current = self
            .current
            .0
            .write()
            .map_err(|_| "TLS certificate lock poisoned".to_string())?;
        *current = Arc::new(key);
        Ok(())
    }

    /// Starts the server side of a TLS connection on an accepted socket.
    pub fn accept(&self, tcp: TcpStream) -> io::Result<Socket> {
        let tls = ServerConnection::new(Arc::clone(&self.config)).map_err(io::Error::other)?;
        Ok(Socket::Tls(Box::new(TlsSocket {
            tcp,
            tls: tls.into(),
            shut: false,
        })))
    }
}

/// rustls's ring provider. rustls marks it deprecated because it offers no post-quantum key
/// exchange; its alternative, aws-lc-rs, adds the OpenSSL licence and a long C build. Classic
/// X25519/P-256 key exchange is what browsers and load balancers use with most servers today.
#[allow(deprecated)]
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("--tls-cert {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no PEM certificate in it",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("--tls-key {}: {e}", key_path.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("--tls-key {}: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(certs, signer);
    match certified.keys_match() {
        // A key type whose public half the provider cannot derive: nothing to compare.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err(format!(
            "--tls-key {} does not match --tls-cert {}: {e}",
            key_path.display(),
            cert_path.display()
        )),
    }
}
