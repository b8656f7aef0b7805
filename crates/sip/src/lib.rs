//! Tollgate's SIP signaling: framing and parsing (`message`, `framing`), RFC 3261
//! transactions (`transaction`), the B2BUA with its credential checks
//! (`b2bua`), the edge's own address in messages (`local_addr`), and the tokio driver (`driver`).
#![forbid(unsafe_code)]

pub mod b2bua;
mod core_metrics;
pub mod driver;
pub mod framing;
pub mod local_addr;
pub mod lockout;
pub mod message;
pub mod resolve;
pub mod route;
pub mod tls;
pub mod tls_client;
pub mod transaction;

pub use b2bua::{B2bua, CallEvent, Config, EndCause, MediaProfile, Route};
pub use message::{Message, ParseError, SipUri};
pub use transaction::{Peer, TimerConfig, Transport};
