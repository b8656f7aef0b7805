//! API keys and INVITE credentials for Tollgate.
//!
//! This crate is a sans-IO core (apart from [`store::FileKeyStore`], which owns
//! the on-disk key file): every check takes `now` from the caller, so tests run
//! on a simulated clock.
//!
//! * [`apikey`]: the `tg_sk_…` / `tg_pk_…` key format and the values derived
//!   from a key (JWT signing key, digest password, webhook secret, admin hash).
//! * [`store`]: [`KeyRecord`], the [`KeyStore`] trait, [`FileKeyStore`] and
//!   [`MemoryKeyStore`].
//! * [`jwt`]: HS256 per-call bearer tokens.
//! * [`digest`]: RFC 3261 / RFC 8760 digest with stateless nonces.
//! * [`replay`]: single-use caches for `jti`s and nonces.
//! * [`number`]: normalisation of numbers and SIP user parts.
//! * [`credential`]: the whole credential check on an initial INVITE.
//! * `fuzzing`: fuzz oracles for the digest and JWT parsers (`fuzz/`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod apikey;
pub mod credential;
pub mod digest;
#[doc(hidden)]
pub mod fuzzing;
pub mod jwt;
pub mod number;
pub mod replay;
pub mod store;

mod ct;

pub use apikey::{digest_password, key_hash, signing_key, webhook_secret, ApiKey, KeyKind};
pub use credential::{
    AuthConfig, Authenticator, DigestBySource, InviteView, Method, Outcome, Principal,
};
pub use digest::{Algorithm, DigestError, DigestResponse, NonceIssuer};
pub use jwt::{Claims, TokenError};
pub use replay::{FileReplayCache, MemoryReplayCache, PendingUse, ReplayCache, ReplayLoad, Use};
pub use store::{
    FileKeyStore, KeyAdmin, KeyRecord, KeyStore, Limits, MemoryKeyStore, Scope, SecretMaterial,
};

use std::path::PathBuf;

/// The crate's error for key parsing and key-store operations.
///
/// Verification failures of credentials have their own reason-carrying types
/// ([`TokenError`], [`DigestError`]) because they are outcomes, not faults.
/// No variant ever carries key material or token text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not a well-formed `tg_sk_<id>_<secret>` / `tg_pk_<id>_<secret>` key.
    #[error("malformed API key (expected tg_sk_<12 [a-z0-9]>_<32+ [A-Za-z0-9]> or tg_pk_...)")]
    Malformed,
    /// No key with this id.
    #[error("no key with id {0:?}")]
    NotFound(String),
    /// The key was revoked and cannot be rolled or used as a parent.
    #[error("key {0:?} is revoked")]
    Revoked(String),
    /// A requested key would be looser than its parent, or is otherwise invalid.
    #[error("invalid key request: {0}")]
    Invalid(String),
    /// An I/O error on a file of the data directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key file exists but cannot be parsed.
    #[error("{path}: corrupt key file: {source}")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// The parse error (line and column, never file content).
        #[source]
        source: serde_json::Error,
    },
    /// The shared key store (SPEC §8) could not be reached or answered badly.
    #[error("shared state unavailable: {0}")]
    Unavailable(String),
    /// The operating system's random generator failed.
    #[error("system random number generator failed")]
    Rng,
}

/// Result with [`KeyError`] as the default error.
pub type Result<T, E = KeyError> = std::result::Result<T, E>;
