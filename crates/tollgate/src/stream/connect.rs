//! Opening a stream's WebSocket (RFC 6455) to the backend: the address
//! policy of webhooks (public addresses, or inside `[streams] allow_cidrs`;
//! `ws://` only inside it), TLS with rustls (web PKI roots plus
//! `[tls] ca_file`, SNI and the URL's host checked), and the upgrade request
//! signed `X-Tollgate-Signature: t=<ts>,v1=<hex HMAC-SHA256(webhook secret,
//! "<ts>.<url>")>` (as webhooks sign their body). Everything, name lookup
//! included, within the connect timeout; each failure is a [`StreamEnd`].

use super::StreamConfig;
use crate::webhook::permitted;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tollgate_sip::b2bua::StreamEnd;

/// A TCP or TLS connection.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

pub type Ws = WebSocketStream<Box<dyn Conn>>;

/// Largest message taken from a backend (a `media` of 15 s is ~160 KB).
pub const MAX_MESSAGE: usize = 256 << 10;

/// A `ws://` / `wss://` URL checked for use as a route target.
pub fn check_url(u: &str) -> Result<reqwest::Url, String> {
    if u.len() > 2048 {
        return Err("at most 2048 characters".into());
    }
    let url = reqwest::Url::parse(u).map_err(|e| format!("{u:?} is not a URL: {e}"))?;
    if url.scheme() != "ws" && url.scheme() != "wss" {
        return Err(format!("{u:?}: a stream target is ws:// or wss://"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{u:?}: no credentials in the URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{u:?}: no host"));
    }
    if url.fragment().is_some() {
        return Err(format!("{u:?}: no #fragment in a WebSocket URL"));
    }
    Ok(url)
}

/// Whether the edge may connect to `ip` for a URL of this scheme.
pub fn may_connect(ip: IpAddr, tls: bool, cfg: &StreamConfig) -> bool {
    if tls {
        permitted(ip, &cfg.allow_cidrs)
    } else {
        let canon = ip.to_canonical();
        cfg.allow_cidrs
            .iter()
            .any(|n| n.contains(&ip) || n.contains(&canon))
    }
}

/// The value of `X-Tollgate-Signature` for the upgrade to `url`.
pub fn signature(secret: &str, ts: i64, url: &str) -> String {
    crate::webhook::signature(secret, ts, url.as_bytes())
}

/// Connects within `cfg.connect_timeout`.
pub async fn connect(url: &str, secret: Option<&str>, cfg: &StreamConfig) -> Result<Ws, StreamEnd> {
    match tokio::time::timeout(cfg.connect_timeout, connect_inner(url, secret, cfg)).await {
        Ok(r) => r,
        Err(_) => Err(StreamEnd::ConnectTimeout),
    }
}

async fn connect_inner(
    url: &str,
    secret: Option<&str>,
    cfg: &StreamConfig,
) -> Result<Ws, StreamEnd> {
    let parsed = check_url(url).map_err(|_| StreamEnd::ConnectFailed)?;
    let tls = parsed.scheme() == "wss";
    let port = parsed
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });
    let host = parsed.host_str().unwrap_or_default().to_owned();
    let literal: Option<IpAddr> = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse().ok(),
        None => host.parse().ok(),
    };
    let candidates: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|_| StreamEnd::ConnectFailed)?
            .collect(),
    };
    let allowed: Vec<SocketAddr> = candidates
        .iter()
        .copied()
        .filter(|a| may_connect(a.ip(), tls, cfg))
        .collect();
    if allowed.is_empty() {
        tracing::warn!(host = %host, "stream target refused: no permitted address (ws:// needs [streams] allow_cidrs; wss:// a public address or one inside it)");
        return Err(if candidates.is_empty() {
            StreamEnd::ConnectFailed
        } else {
            StreamEnd::NotPermitted
        });
    }
    let mut tcp = None;
    for a in &allowed {
        if let Ok(s) = TcpStream::connect(a).await {
            tcp = Some(s);
            break;
        }
    }
    let tcp = tcp.ok_or(StreamEnd::ConnectFailed)?;
    let _ = tcp.set_nodelay(true);
    let conn: Box<dyn Conn> = if tls {
        let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|_| StreamEnd::TlsFailed)?;
        let s = tokio_rustls::TlsConnector::from(cfg.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                tracing::warn!(host = %host, error = %e, "stream TLS handshake failed");
                StreamEnd::TlsFailed
            })?;
        Box::new(s)
    } else {
        Box::new(tcp)
    };
    let mut req = url
        .into_client_request()
        .map_err(|_| StreamEnd::ConnectFailed)?;
    if let Some(secret) = secret {
        let sig = signature(secret, crate::unix_now() as i64, url);
        if let Ok(v) = sig.parse() {
            req.headers_mut().insert("X-Tollgate-Signature", v);
        }
    }
    if let Ok(v) = "tollgate-stream/1".parse() {
        req.headers_mut().insert("User-Agent", v);
    }
    // Small buffers (messages are ~400 bytes; tungstenite's defaults of
    // 128 KiB each way cost 256 KiB per stream), each message written at
    // once (the writer task sends one at a time anyway).
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(8 << 10)
        .write_buffer_size(0);
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, conn, Some(ws_cfg))
        .await
        .map_err(|e| {
            tracing::warn!(host = %host, error = %e, "stream upgrade failed");
            match e {
                tokio_tungstenite::tungstenite::Error::Http(_) => StreamEnd::Rejected,
                _ => StreamEnd::Closed,
            }
        })?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_ws_or_wss_without_credentials() {
        assert!(check_url("wss://ai.example.com/media").is_ok());
        assert!(check_url("ws://127.0.0.1:8765/x?y=1").is_ok());
        assert!(check_url("https://ai.example.com/").is_err());
        assert!(check_url("wss://u:p@ai.example.com/").is_err());
        assert!(check_url("wss://ai.example.com/#f").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn ws_only_inside_the_allow_list_and_wss_like_webhooks() {
        let mut cfg = StreamConfig::for_tests();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Nothing allowed: public wss only; never plain ws, never private.
        assert!(may_connect(ip("8.8.8.8"), true, &cfg));
        assert!(!may_connect(ip("8.8.8.8"), false, &cfg));
        for a in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "::1",
        ] {
            assert!(!may_connect(ip(a), true, &cfg), "{a}");
            assert!(!may_connect(ip(a), false, &cfg), "{a}");
        }
        cfg.allow_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(may_connect(ip("10.1.2.3"), false, &cfg));
        assert!(may_connect(ip("::ffff:10.1.2.3"), false, &cfg));
        assert!(may_connect(ip("10.1.2.3"), true, &cfg));
        assert!(!may_connect(ip("192.168.1.1"), false, &cfg));
    }

    #[test]
    fn the_upgrade_signature_is_the_webhook_hmac_over_the_url() {
        let sig = signature("s3cret", 1700000000, "wss://ai.example.com/m");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
        let want = ring::hmac::sign(&key, b"1700000000.wss://ai.example.com/m");
        assert_eq!(
            sig,
            format!("t=1700000000,v1={}", hex::encode(want.as_ref()))
        );
    }
}
