//! OPTIONS pings toward route targets (SPEC §9, RFC 3261 §11): shard 0 asks
//! each target of a route with `ping_interval` whether it serves; a 408, a
//! 5xx or no answer marks it down (calls skip it), any other answer up.

use super::B2bua;
use crate::message::{Header, Message, StartLine};
use crate::route::{self, Target};
use crate::transaction::TxnKey;
use bytes::Bytes;
use std::collections::HashMap;
use std::time::Instant;

/// Pings of one core: when each route's next round is due, and the pings
/// in flight.
#[derive(Debug, Default)]
pub(super) struct Pinger {
    /// Per route (same index as `Config::routes`): the next round.
    due: Vec<Option<Instant>>,
    inflight: HashMap<TxnKey, Target>,
}

impl Pinger {
    /// Schedules the first round of each pinged route at `now`.
    pub fn reset(&mut self, routes: &[super::Route], now: Instant) {
        self.due = routes
            .iter()
            .map(|r| r.ping_interval.map(|_| now))
            .collect();
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.due.iter().flatten().min().copied()
    }

    pub fn owns(&self, key: &TxnKey) -> bool {
        self.inflight.contains_key(key)
    }

    /// Pings in flight (part of the core's census).
    pub fn len(&self) -> usize {
        self.inflight.len()
    }
}

impl B2bua {
    /// Whether this core pings (one core per edge: shard 0).
    fn pings(&self) -> bool {
        self.shard.0 == 0
    }

    pub(super) fn ping_due(&self) -> Option<Instant> {
        if self.pings() {
            self.pinger.next_due()
        } else {
            None
        }
    }

    /// Sends the rounds that are due.
    pub(super) fn send_pings(&mut self, now: Instant) {
        if !self.pings() {
            return;
        }
        for i in 0..self.pinger.due.len() {
            let Some(at) = self.pinger.due[i] else {
                continue;
            };
            if at > now {
                continue;
            }
            let Some(r) = self.cfg.routes.get(i) else {
                continue;
            };
            let (interval, targets) = (r.ping_interval, r.targets.clone());
            self.pinger.due[i] = interval.map(|d| now + d);
            for t in targets {
                let Some(peer) = t.current_peer() else {
                    continue; // a name not resolved now: nothing to ask
                };
                let branch = self.branch();
                let local = self.local(peer.transport, peer.addr.ip());
                let headers = vec![
                    self.via(peer.transport, &branch, peer.addr.ip()),
                    Header {
                        name: "Max-Forwards".into(),
                        value: "70".into(),
                    },
                    Header {
                        name: "From".into(),
                        value: format!("<sip:ping@{}>;tag={}", local.ip(), self.token(8)),
                    },
                    Header {
                        name: "To".into(),
                        value: format!("<{}>", t.text),
                    },
                    Header {
                        name: "Call-ID".into(),
                        value: format!("{}.{}@tollgate", self.token(12), self.shard.0),
                    },
                    Header {
                        name: "CSeq".into(),
                        value: "1 OPTIONS".into(),
                    },
                ];
                let msg = Message {
                    start: StartLine::Request {
                        method: "OPTIONS".into(),
                        uri: t.text.clone(),
                    },
                    headers,
                    body: Bytes::new(),
                };
                if let Some(key) = self.txn.request(now, msg, peer) {
                    metrics::counter!("tollgate_sip_requests_sent_total", "method" => "OPTIONS")
                        .increment(1);
                    self.pinger.inflight.insert(key, t);
                }
            }
        }
    }

    /// A ping's final response (`Some(code)`) or its timeout (`None`).
    pub(super) fn on_ping_result(&mut self, key: &TxnKey, code: Option<u16>) {
        if code.is_some_and(|c| c < 200) {
            return;
        }
        if let Some(t) = self.pinger.inflight.remove(key) {
            t.health
                .set(code.is_some_and(route::ping_says_up), &t.label, &t.text);
        }
    }
}
