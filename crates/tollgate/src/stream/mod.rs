//! Media streams to AI backends over WebSocket (SPEC §10).
//!
//! A route whose target is a `ws://`/`wss://` URL sends leg B to the stream
//! gateway: a SIP user agent inside the edge, on loopback, that answers
//! every INVITE itself. The B2BUA and the media relay treat it as any other
//! leg B, so leg A keeps everything it has (authentication, limits, SRTP
//! decrypted and re-encrypted by the relay, latching, the media timeout,
//! CDRs, webhooks); the gateway gets plain RTP from the relay and bridges it
//! to the backend in the Twilio Media Streams message set.
//!
//! | module | concept |
//! | --- | --- |
//! | [`twilio`] | the message set (sans-IO) |
//! | [`connect`] | opening the WebSocket: address policy, TLS, signed upgrade |
//! | [`gateway`] | the local SIP user agent (leg B of stream calls) |
//! | [`bridge`] | one call's RTP <-> WebSocket task, paced playout |
//!
//! G.711 conversion and the paced playout queue are media pieces
//! (`tollgate_media::g711`, `tollgate_media::playout`).

pub mod bridge;
pub mod connect;
pub mod gateway;
pub mod twilio;

use crate::config::{ConfigError, StreamsSection};
use ipnet::IpNet;
use std::sync::Arc;
use std::time::Duration;

pub use gateway::Gateway;

/// `[streams]` (and `[tls] ca_file`), resolved.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub allow_cidrs: Vec<IpNet>,
    pub connect_timeout: Duration,
    /// Frames (20 ms) of backend audio held per call.
    pub queue_frames: usize,
    /// Roots: the web PKI plus `[tls] ca_file`.
    pub tls: Arc<rustls::ClientConfig>,
}

/// True if a route target names a stream backend.
pub fn is_stream_url(target: &str) -> bool {
    let t = target.trim_start();
    t.len() >= 5
        && (t[..5].eq_ignore_ascii_case("ws://")
            || t.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("wss://")))
}

impl StreamConfig {
    /// Errors name the field.
    pub fn from_section(
        sec: &StreamsSection,
        ca_file: Option<&str>,
    ) -> Result<StreamConfig, ConfigError> {
        let allow_cidrs =
            crate::webhook::parse_cidrs("streams.allow_cidrs", sec.allow_cidrs.as_deref())?;
        let connect_ms = sec.connect_timeout_ms.unwrap_or(5000);
        if !(100..=60_000).contains(&connect_ms) {
            return Err(ConfigError(
                "streams.connect_timeout_ms: must be 100..=60000".into(),
            ));
        }
        let queue_ms = sec.queue_ms.unwrap_or(30_000);
        if !(20..=600_000).contains(&queue_ms) {
            return Err(ConfigError("streams.queue_ms: must be 20..=600000".into()));
        }
        Ok(StreamConfig {
            allow_cidrs,
            connect_timeout: Duration::from_millis(connect_ms),
            queue_frames: (queue_ms / 20) as usize,
            tls: Arc::new(client_tls(ca_file)?),
        })
    }

    #[cfg(test)]
    pub fn for_tests() -> StreamConfig {
        StreamConfig::from_section(&StreamsSection::default(), None).expect("defaults are valid")
    }
}

/// A rustls client config trusting the web PKI roots and `ca_file`.
fn client_tls(ca_file: Option<&str>) -> Result<rustls::ClientConfig, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(f) = ca_file {
        let err = |e: &dyn std::fmt::Display| ConfigError(format!("tls.ca_file: {f}: {e}"));
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(f)
            .map_err(|e| err(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(&e))?;
        if certs.is_empty() {
            return Err(err(&"no PEM certificate in it"));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// HELP text of the stream metric families.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "tollgate_streams_active",
        "Media streams to AI backends connected now"
    );
    describe_counter!(
        "tollgate_streams_total",
        "Media streams ended, by cause (completed = the call hung up; stream_* = the stream failed or closed and ended the call)"
    );
    describe_counter!(
        "tollgate_stream_frames_total",
        "20 ms audio frames streamed, by direction (to_backend, from_backend = played into the call)"
    );
    describe_counter!(
        "tollgate_stream_frames_dropped_total",
        "Audio frames dropped, by reason (queue_full = the backend sent more than [streams] queue_ms ahead; backend_slow = the backend did not read the caller's audio; cleared = flushed by a clear)"
    );
    describe_gauge!(
        "tollgate_stream_queue_frames",
        "Backend audio frames queued for playout, all stream calls"
    );
    describe_counter!(
        "tollgate_stream_underruns_total",
        "Times a stream's playout queue ran dry mid-speech (the backend was late)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls_are_told_from_sip_targets() {
        assert!(is_stream_url("wss://ai.example.com/x"));
        assert!(is_stream_url("WS://127.0.0.1:1/"));
        assert!(!is_stream_url("sip:agent@127.0.0.1"));
        assert!(!is_stream_url("ws"));
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad =
            |s: StreamsSection, ca: Option<&str>| StreamConfig::from_section(&s, ca).unwrap_err().0;
        assert!(bad(
            StreamsSection {
                allow_cidrs: Some(vec!["nope".into()]),
                ..Default::default()
            },
            None
        )
        .starts_with("streams.allow_cidrs"));
        assert!(bad(
            StreamsSection {
                connect_timeout_ms: Some(5),
                ..Default::default()
            },
            None
        )
        .starts_with("streams.connect_timeout_ms"));
        assert!(bad(
            StreamsSection {
                queue_ms: Some(0),
                ..Default::default()
            },
            None
        )
        .starts_with("streams.queue_ms"));
        assert!(
            bad(StreamsSection::default(), Some("/nonexistent/ca.pem")).starts_with("tls.ca_file")
        );
        let ok = StreamConfig::for_tests();
        assert_eq!(ok.queue_frames, 1500);
        assert_eq!(ok.connect_timeout, Duration::from_secs(5));
    }
}
