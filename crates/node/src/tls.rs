//! Mutual TLS on every listener and every dial (rustls, no OpenSSL).
//!
//! A node with `[tls]` serves its gRPC and HTTP ports only over TLS. The gRPC port takes only a
//! peer that shows a certificate from the cluster CA (`tls.ca`); the HTTP port also takes one
//! that shows none (for `/health` probes) but refuses one from another CA or expired. What a
//! certificate may do is decided per RPC or per path by [`crate::auth`]. The files are re-read when they change (certificate rotation):
//! each new connection is accepted with the newest server configuration, and the channels to
//! the other members are remade with the newest client identity.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::node::lock;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are looked at (by modification time) for a change.
pub(crate) const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// The ALPN protocol of the gRPC port.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol of the HTTP port.
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The `[tls]` files: this node's certificate chain and key, and the CA that signs every
/// member's and client's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsPaths {
    /// PEM certificate chain, leaf first.
    pub(crate) cert: PathBuf,
    /// PEM private key.
    pub(crate) key: PathBuf,
    /// PEM CA certificate(s) trusted for peers and clients.
    pub(crate) ca: PathBuf,
}

/// Why TLS material cannot be used; each message names the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material (a key that does not match its certificate, ...).
    #[error("TLS configuration from {cert} and {ca}: {source}")]
    Rustls {
        /// The certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// tonic refused the client side for a member.
    #[error("TLS client configuration for member {member}: {message}")]
    Client {
        /// The member dialled.
        member: String,
        /// What tonic said.
        message: String,
    },
    /// The CA file cannot verify clients.
    #[error("CA {path}: {message}")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// What the verifier builder said.
        message: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            path: path.to_owned(),
            message: format!("not PEM certificates: {error}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "holds no certificate".to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| TlsError::Pem {
        path: path.to_owned(),
        message: format!("no PEM private key: {error}"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a listener's handshake requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientCert {
    /// No handshake without a certificate signed by the CA (the gRPC port).
    Required,
    /// A client may come without a certificate; one it presents must still be signed by the
    /// CA and valid (the HTTP port, where `/health` is open to probes and every other path
    /// checks the certificate per request).
    Optional,
}

/// A server configuration that verifies client certificates against the CA, requiring one or
/// not as `client_cert` says.
pub(crate) fn server_config(
    paths: &TlsPaths,
    alpn: &[u8],
    client_cert: ClientCert,
) -> Result<ServerConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certificates(&paths.ca)? {
        roots.add(ca).map_err(|source| TlsError::Rustls {
            cert: paths.cert.clone(),
            ca: paths.ca.clone(),
            source,
        })?;
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if client_cert == ClientCert::Optional {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|error| TlsError::Verifier {
        path: paths.ca.clone(),
        message: error.to_string(),
    })?;
    let rustls_error = |source| TlsError::Rustls {
        cert: paths.cert.clone(),
        ca: paths.ca.clone(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(&paths.cert)?, private_key(&paths.key)?)
        .map_err(rustls_error)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The client side for tonic: this node's (or the CLI user's) identity and the CA that must
/// have signed the server's certificate. `server_name` is what the server's certificate must
/// name (a member id, or the address's IP when `None`).
pub(crate) fn client_config(
    paths: &TlsPaths,
    server_name: Option<&str>,
) -> Result<ClientTlsConfig, TlsError> {
    cli_client_config(&paths.ca, Some((&paths.cert, &paths.key)), server_name)
}

/// Like [`client_config`], with the identity (certificate, key) optional: a CLI user without
/// a certificate still gets TLS, and the node's refusal says what is missing.
pub(crate) fn cli_client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> Result<ClientTlsConfig, TlsError> {
    // Parse first, so that a bad file is reported here with its name, not at the first call.
    certificates(ca)?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        certificates(cert)?;
        private_key(key)?;
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(match server_name {
        Some(name) => config.domain_name(name),
        None => config,
    })
}

/// What the three files looked like when last read: length and modification time each.
type Stamp = Vec<Option<(u64, SystemTime)>>;

fn stamp(paths: &TlsPaths) -> Stamp {
    [&paths.cert, &paths.key, &paths.ca]
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.len(), meta.modified().ok()?))
        })
        .collect()
}

/// Notices when the `[tls]` files change.
#[derive(Debug)]
pub(crate) struct FileWatch {
    paths: TlsPaths,
    seen: Mutex<(Stamp, Instant)>,
}

impl FileWatch {
    /// Watches `paths`, taking their present state as seen.
    pub(crate) fn new(paths: TlsPaths) -> Self {
        let seen = stamp(&paths);
        Self {
            paths,
            seen: Mutex::new((seen, Instant::now())),
        }
    }

    /// The watched files.
    pub(crate) fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// True once after the files changed (looked at no more than once per [`RELOAD_CHECK`]).
    pub(crate) fn changed(&self) -> bool {
        let mut seen = lock(&self.seen);
        if seen.1.elapsed() < RELOAD_CHECK {
            return false;
        }
        seen.1 = Instant::now();
        let now = stamp(&self.paths);
        if now == seen.0 {
            return false;
        }
        seen.0 = now;
        true
    }
}

/// The server side of one listener: the newest good configuration, re-read when the files
/// change. A change that does not load (a key written before its certificate, ...) keeps the
/// previous configuration and is retried at the next check.
#[derive(Debug)]
pub(crate) struct ServerTls {
    watch: FileWatch,
    alpn: &'static [u8],
    client_cert: ClientCert,
    current: Mutex<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads the files now; an error here stops the node from starting.
    pub(crate) fn load(
        paths: &TlsPaths,
        alpn: &'static [u8],
        client_cert: ClientCert,
    ) -> Result<Self, TlsError> {
        let config = server_config(paths, alpn, client_cert)?;
        Ok(Self {
            watch: FileWatch::new(paths.clone()),
            alpn,
            client_cert,
            current: Mutex::new(Arc::new(config)),
        })
    }

    /// The configuration for the next connection.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        if self.watch.changed() {
            match server_config(self.watch.paths(), self.alpn, self.client_cert) {
                Ok(config) => {
                    tracing::info!(cert = %self.watch.paths().cert.display(), "TLS certificate reloaded");
                    *lock(&self.current) = Arc::new(config);
                }
                Err(error) => {
                    tracing::warn!(%error, "TLS files changed but do not load; keeping the previous ones");
                }
            }
        }
        Arc::clone(&lock(&self.current))
    }
}

/// Accepts TCP connections on `listener` and completes TLS handshakes in their own tasks;
/// the established streams come out of the returned receiver. A failed handshake (no client
/// certificate, one from another CA, an expired one, ...) calls `refused` and drops the
/// connection. The loop stops when the receiver is dropped.
pub(crate) fn accept(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    refused: Arc<dyn Fn() + Send + Sync>,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(crate::server::server_nodelay());
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            let refused = Arc::clone(&refused);
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, addr)).await;
                    }
                    Ok(Err(error)) => {
                        refused();
                        tracing::info!(peer = %addr, %error, "TLS handshake refused");
                    }
                    Err(_) => {
                        refused();
                        tracing::info!(peer = %addr, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

/// The established TLS connections of a listener, for axum.
#[derive(Debug)]
pub(crate) struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves the streams of `incoming`, accepted on `local`.
    pub(crate) fn new(
        incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        local: SocketAddr,
    ) -> Self {
        Self { incoming, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(pair) => pair,
            // The accept loop only ends when this receiver is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let paths = TlsPaths {
            cert: empty.clone(),
            key: dir.path().join("missing.key"),
            ca: empty.clone(),
        };
        let error = server_config(&paths, ALPN_H2, ClientCert::Required)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("empty.pem") && error.contains("no certificate"),
            "{error}"
        );
        let error = client_config(
            &TlsPaths {
                ca: dir.path().join("missing.pem"),
                ..paths
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("missing.pem"), "{error}");
    }

    #[test]
    fn a_file_change_is_seen_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.pem");
        std::fs::write(&file, "one").unwrap();
        let watch = FileWatch::new(TlsPaths {
            cert: file.clone(),
            key: file.clone(),
            ca: file.clone(),
        });
        std::thread::sleep(RELOAD_CHECK);
        assert!(!watch.changed());
        std::fs::write(&file, "a longer content").unwrap();
        std::thread::sleep(RELOAD_CHECK);
        assert!(watch.changed());
        std::thread::sleep(RELOAD_CHECK);
        assert!(!watch.changed());
    }
}
