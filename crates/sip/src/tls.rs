//! SIP over TLS (RFC 3261 §26.2, RFC 5630), server side: rustls through
//! tokio-rustls with the ring provider. The certificate chain and key come
//! from PEM files; with a client CA file, mutual TLS is required (a client
//! certificate must chain to that CA and be valid now: untrusted, expired or
//! missing certificates fail the handshake).
//!
//! [`TlsAcceptor::reload`] re-reads the files and swaps the `ServerConfig`:
//! new handshakes use the new one, connections already up keep theirs (a
//! rustls connection holds its own `Arc` of the config it started with).
//! A failed reload keeps the last good config.
//!
//! Slowloris: every handshake must finish within [`HANDSHAKE_TIMEOUT`]; at
//! most [`MAX_HANDSHAKES`] run at once, and at most
//! [`MAX_HANDSHAKES_PER_IP`] from one source address (so one host cannot
//! take every slot); connections beyond that are closed at once, before any
//! TLS work is done for them.

use dashmap::DashMap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A TLS handshake that has not finished in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once; more connections are closed.
pub const MAX_HANDSHAKES: usize = 256;
/// Most TLS handshakes in progress at once from one source IP.
pub const MAX_HANDSHAKES_PER_IP: usize = 32;

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// With it, clients must present a certificate that chains to one of
    /// these CAs (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// A TLS setting that cannot be used; the message names the file, never
/// any key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// Why a connection got no TLS session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("too many TLS handshakes in progress")]
    Busy,
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
}

impl HandshakeError {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::Busy => "busy",
            HandshakeError::Timeout => "timeout",
            HandshakeError::Failed(_) => "failed",
        }
    }
}

pub(crate) fn load_certs(
    field: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |e: &dyn std::fmt::Display| TlsError(format!("{field}: {}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    if certs.is_empty() {
        return Err(err(&"no PEM certificate in the file"));
    }
    Ok(certs)
}

fn load_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error text of a PEM parse never contains the key itself.
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError(format!("{field}: {}: {e}", path.display())))
}

/// Builds a server config from the files (the same check at start and on
/// every reload).
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs = load_certs("tls.cert_file", &files.cert_file)?;
    let key = load_key("tls.key_file", &files.key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("tls: {e}")))?;
    let builder = match &files.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs("tls.client_ca_file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError(format!("tls.client_ca_file: {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError(format!("tls.client_ca_file: {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(certs, key).map_err(|e| {
        TlsError(format!(
            "tls.cert_file/tls.key_file: {} with {}: {e}",
            files.cert_file.display(),
            files.key_file.display()
        ))
    })
}

/// The server side of SIP over TLS: a reloadable config plus the handshake
/// limits.
pub struct TlsAcceptor {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    slots: Arc<Semaphore>,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    max_per_ip: usize,
    timeout: Duration,
}

/// A handshake in progress: one global slot and one of its source's.
#[derive(Debug)]
pub struct HandshakeSlot {
    _global: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<DashMap<IpAddr, usize>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("files", &self.files)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Reads the files; an error names the field and the file.
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let config = Arc::new(server_config(&files)?);
        Ok(Self {
            files,
            config: RwLock::new(config),
            slots: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            per_ip: Arc::new(DashMap::new()),
            max_per_ip: MAX_HANDSHAKES_PER_IP,
            timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// Other handshake limits than the defaults (tests, tuning).
    pub fn with_limits(mut self, timeout: Duration, max_handshakes: usize, per_ip: usize) -> Self {
        self.timeout = timeout;
        self.slots = Arc::new(Semaphore::new(max_handshakes.max(1)));
        self.max_per_ip = per_ip.max(1);
        self
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the certificate, key and client CA files and uses them for
    /// every handshake from now on; established connections are untouched.
    /// On error the previous config stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(server_config(&self.files)?);
        match self.config.write() {
            Ok(mut c) => *c = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        metrics::counter!("tollgate_sip_tls_reloads_total").increment(1);
        Ok(())
    }

    /// The config new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A handshake slot for a connection from `ip`, if one is free (take it
    /// before spawning the handshake, so a flood costs no task).
    pub fn slot(&self, ip: IpAddr) -> Option<HandshakeSlot> {
        {
            let mut n = self.per_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return None;
            }
            *n += 1;
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(global) => Some(HandshakeSlot {
                _global: global,
                ip,
                per_ip: self.per_ip.clone(),
            }),
            Err(_) => {
                self.per_ip.remove_if_mut(&ip, |_, n| {
                    *n = n.saturating_sub(1);
                    *n == 0
                });
                None
            }
        }
    }

    /// The handshake on `stream`, within the timeout, holding `slot` until it
    /// ends.
    pub async fn handshake<S>(
        &self,
        stream: S,
        slot: HandshakeSlot,
    ) -> Result<tokio_rustls::server::TlsStream<S>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
        let r = tokio::time::timeout(self.timeout, acceptor.accept(stream)).await;
        drop(slot);
        match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(HandshakeError::Failed(e)),
            Err(_) => Err(HandshakeError::Timeout),
        }
    }

    /// [`slot`](Self::slot) and [`handshake`](Self::handshake) in one.
    pub async fn accept<S>(
        &self,
        stream: S,
        ip: IpAddr,
    ) -> Result<tokio_rustls::server::TlsStream<S>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let slot = self.slot(ip).ok_or(HandshakeError::Busy)?;
        self.handshake(stream, slot).await
    }
}

/// HELP text of the TLS metric families (call once the recorder is set).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "tollgate_sip_tls_handshake_failures_total",
        "SIP/TLS connections that got no TLS session, by reason (failed: refused or broken handshake, e.g. an untrusted, expired or missing client certificate; timeout; busy: the concurrent-handshake cap was reached)"
    );
    metrics::describe_counter!(
        "tollgate_sip_tls_reloads_total",
        "Successful reloads of the SIP/TLS certificate, key and client CA files"
    );
}

#[cfg(test)]
mod tests {
    //! Real handshakes over loopback sockets with rcgen certificates and a
    //! tokio-rustls client.
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::ServerName;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn leaf(ca: &Ca, cn: &str) -> (String, String) {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(path: &Path, text: &str) {
        // Write-then-rename, the way an operator's tooling replaces files.
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tollgate-tls-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn client(ca: &Ca) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }

    /// An echo server over the acceptor; returns its address.
    async fn echo_server(acceptor: Arc<TlsAcceptor>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((s, from)) = l.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s, from.ip()).await else {
                        return;
                    };
                    let mut buf = [0u8; 256];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn connect(
        c: &tokio_rustls::TlsConnector,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        c.connect(name, tcp).await
    }

    fn leaf_der(s: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    async fn echo(s: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn reload_swaps_the_certificate_for_new_handshakes_only() {
        let dir = tmpdir("reload");
        let ca1 = ca("ca one");
        let ca2 = ca("ca two");
        let files = TlsFiles {
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            client_ca_file: None,
        };
        let (c1, k1) = leaf(&ca1, "first");
        write(&files.cert_file, &c1);
        write(&files.key_file, &k1);
        let acceptor = Arc::new(TlsAcceptor::new(files.clone()).unwrap());
        let addr = echo_server(acceptor.clone()).await;

        let mut old = connect(&client(&ca1), addr).await.unwrap();
        let first_der = leaf_der(&old);
        assert_eq!(echo(&mut old, b"before").await, b"before");

        // A broken file: reload refuses it and the old config stays.
        write(&files.key_file, "not a key");
        let e = acceptor.reload().unwrap_err();
        assert!(e.0.contains("tls.key_file"), "{e}");
        let again = connect(&client(&ca1), addr).await.unwrap();
        assert_eq!(leaf_der(&again), first_der);

        let (c2, k2) = leaf(&ca2, "second");
        write(&files.cert_file, &c2);
        write(&files.key_file, &k2);
        acceptor.reload().unwrap();

        // New handshakes see the new certificate (and a client that only
        // trusts the old CA is refused).
        let new = connect(&client(&ca2), addr).await.unwrap();
        assert_ne!(leaf_der(&new), first_der);
        assert!(connect(&client(&ca1), addr).await.is_err());
        // The connection made before the reload goes on.
        assert_eq!(echo(&mut old, b"after reload").await, b"after reload");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn silent_and_excess_handshakes_are_cut() {
        let dir = tmpdir("limits");
        let ca1 = ca("ca");
        let files = TlsFiles {
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            client_ca_file: None,
        };
        let (c, k) = leaf(&ca1, "srv");
        write(&files.cert_file, &c);
        write(&files.key_file, &k);
        // Three handshakes at once, two per source address.
        let acceptor = Arc::new(TlsAcceptor::new(files).unwrap().with_limits(
            Duration::from_millis(300),
            3,
            2,
        ));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = acceptor.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, from)) = l.accept().await else {
                    return;
                };
                let a = server.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let r = a
                        .accept(s, from.ip())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.label());
                    let _ = tx.send((from.ip(), r));
                });
            }
        });
        let from = |ip: [u8; 4]| async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind((ip, 0).into()).unwrap();
            sock.connect(addr).await.unwrap()
        };
        // Two silent clients from 127.0.0.1 fill its share; a third from
        // there is refused at once.
        let _s1 = from([127, 0, 0, 1]).await;
        let _s2 = from([127, 0, 0, 1]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _s3 = from([127, 0, 0, 1]).await;
        // Another address still gets the last global slot; then nobody.
        let _s4 = from([127, 0, 0, 2]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _s5 = from([127, 0, 0, 3]).await;
        let mut busy = Vec::new();
        let mut timeouts = 0;
        for _ in 0..5 {
            let (ip, r) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            match r {
                Err("busy") => busy.push(ip.to_string()),
                Err("timeout") => timeouts += 1,
                other => panic!("{ip}: {other:?}"),
            }
        }
        busy.sort();
        assert_eq!(busy, ["127.0.0.1", "127.0.0.3"]);
        assert_eq!(timeouts, 3, "silent handshakes are cut at the timeout");
        // Their slots came back.
        let ok = connect(&client(&ca1), addr).await;
        assert!(ok.is_ok(), "{ok:?}");
        assert!(acceptor.per_ip.len() <= 1, "per-address counts are freed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_files_name_the_field() {
        let dir = tmpdir("bad");
        let files = TlsFiles {
            cert_file: dir.join("missing.pem"),
            key_file: dir.join("key.pem"),
            client_ca_file: None,
        };
        assert!(TlsAcceptor::new(files.clone())
            .unwrap_err()
            .0
            .contains("tls.cert_file"));
        let ca1 = ca("ca");
        let (c, _) = leaf(&ca1, "srv");
        let (_, other_key) = leaf(&ca1, "other");
        write(&files.cert_file.with_file_name("cert.pem"), &c);
        write(&files.key_file, &other_key);
        let mismatched = TlsFiles {
            cert_file: dir.join("cert.pem"),
            ..files.clone()
        };
        let e = TlsAcceptor::new(mismatched.clone()).unwrap_err();
        assert!(e.0.contains("tls.cert_file/tls.key_file"), "{e}");
        let no_ca = TlsFiles {
            client_ca_file: Some(dir.join("nope.pem")),
            ..mismatched
        };
        assert!(TlsAcceptor::new(no_ca)
            .unwrap_err()
            .0
            .contains("tls.client_ca_file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
