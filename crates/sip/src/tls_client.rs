//! SIP over TLS toward leg B (RFC 3261 §26.2, RFC 5922): rustls client with
//! the web PKI roots plus `[tls] ca_file`, SNI and certificate checks
//! against the target's host (the name in its URI, or its IP address), one
//! connection per target address, reused by every call (RFC 5923 style).

use crate::tls::{load_certs, TlsError};
use dashmap::DashMap;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// TCP connect plus handshake must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens verified TLS connections to route targets.
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    /// The name a target's certificate must carry, by the address its name
    /// resolved to (set by whoever locates the target).
    names: DashMap<SocketAddr, ServerName<'static>>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("names", &self.names.len())
            .finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// Web PKI roots plus the CAs of `ca_file` (`[tls] ca_file`).
    pub fn new(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            for c in load_certs("tls.ca_file", path)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError(format!("tls.ca_file: {}: {e}", path.display())))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("tls: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConnector {
            config: Arc::new(config),
            names: DashMap::new(),
        })
    }

    /// Connections to `addr` must present a certificate for `host` (sent as
    /// SNI when it is a name).
    pub fn expect_name(&self, addr: SocketAddr, host: &str) -> Result<(), TlsError> {
        let name = ServerName::try_from(host.trim_end_matches('.').to_owned())
            .map_err(|e| TlsError(format!("{host:?}: {e}")))?;
        self.names.insert(addr, name);
        Ok(())
    }

    /// The name checked for `addr`: the one expected, else the address.
    fn name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        self.names
            .get(&addr)
            .map(|n| n.clone())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    /// Connects and verifies, within [`CONNECT_TIMEOUT`].
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self.name_for(addr);
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let attempt = async {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            connector.connect(name, tcp).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS connect timed out",
            )),
        }
    }
}
