//! The signaling core's per-call metric handles: each series is registered
//! once per core, on its first use (so `/metrics` shows the same series as
//! when they were looked up by name), and then incremented through its
//! handle, without building a key or hashing a name per message.
//! Rare events (refusals, lockouts, parse errors) still use the macros.

use metrics::{Counter, Gauge, Histogram};
use std::collections::HashMap;

/// Method labels of `tollgate_sip_requests_total` and
/// `tollgate_sip_requests_sent_total`; anything else is `other`.
const METHODS: [&str; 15] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "UPDATE",
    "INFO",
    "PRACK",
    "REGISTER",
    "SUBSCRIBE",
    "NOTIFY",
    "MESSAGE",
    "REFER",
    "PUBLISH",
    "other",
];

fn method_index(m: &str) -> usize {
    METHODS[..METHODS.len() - 1]
        .iter()
        .position(|k| *k == m)
        .unwrap_or(METHODS.len() - 1)
}

/// One core's handles (see the module doc).
#[derive(Default)]
pub(crate) struct CoreMetrics {
    requests: [Option<Counter>; METHODS.len()],
    requests_sent: [Option<Counter>; METHODS.len()],
    responses: HashMap<u16, Counter>,
    calls: HashMap<&'static str, Counter>,
    calls_active: Option<Gauge>,
    call_setup: Option<Histogram>,
}

impl CoreMetrics {
    /// `tollgate_sip_requests_total{method}`: a request received.
    pub(crate) fn request(&mut self, method: &str) {
        let i = method_index(method);
        self.requests[i]
            .get_or_insert_with(
                || metrics::counter!("tollgate_sip_requests_total", "method" => METHODS[i]),
            )
            .increment(1);
    }

    /// `tollgate_sip_requests_sent_total{method}`: a request we sent.
    pub(crate) fn request_sent(&mut self, method: &str) {
        let i = method_index(method);
        self.requests_sent[i]
            .get_or_insert_with(
                || metrics::counter!("tollgate_sip_requests_sent_total", "method" => METHODS[i]),
            )
            .increment(1);
    }

    /// `tollgate_sip_responses_total{code}`: a response we sent.
    pub(crate) fn response(&mut self, code: u16) {
        self.responses
            .entry(code)
            .or_insert_with(
                || metrics::counter!("tollgate_sip_responses_total", "code" => code.to_string()),
            )
            .increment(1);
    }

    fn calls_active(&mut self) -> &Gauge {
        self.calls_active
            .get_or_insert_with(|| metrics::gauge!("tollgate_calls_active"))
    }

    /// A call admitted: `tollgate_calls_active` up.
    pub(crate) fn call_started(&mut self) {
        self.calls_active().increment(1.0);
    }

    /// A call over: `tollgate_calls_active` down, `tollgate_calls_total{result}`.
    pub(crate) fn call_ended(&mut self, result: &'static str) {
        self.calls_active().decrement(1.0);
        self.calls
            .entry(result)
            .or_insert_with(|| metrics::counter!("tollgate_calls_total", "result" => result))
            .increment(1);
    }

    /// `tollgate_call_setup_seconds`: INVITE to answer.
    pub(crate) fn call_setup(&mut self, secs: f64) {
        self.call_setup
            .get_or_insert_with(|| metrics::histogram!("tollgate_call_setup_seconds"))
            .record(secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method_label(m: &str) -> &'static str {
        METHODS[method_index(m)]
    }

    #[test]
    fn methods_outside_the_list_are_other() {
        assert_eq!(method_label("INVITE"), "INVITE");
        assert_eq!(method_label("PUBLISH"), "PUBLISH");
        assert_eq!(method_label("FOO"), "other");
        assert_eq!(method_label("other"), "other");
        assert_eq!(
            method_label("invite"),
            "other",
            "methods are case-sensitive"
        );
    }
}
