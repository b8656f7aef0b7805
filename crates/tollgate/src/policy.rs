//! The B2BUA's call policy, made of the trunk allocator (admission, budgets)
//! and the durable CDR store. This is the one place where a trunk refusal
//! becomes a SIP status (SPEC §4).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tollgate_keys::KeyRecord;
use tollgate_sip::b2bua::{CallPolicy, CallRecord, Refused};
use tollgate_sip::EndCause;
use tollgate_trunk::{Allocator, Cdr, CdrSink, ChannelId, KeyLimits, Refusal};

pub struct TrunkPolicy {
    alloc: Arc<Allocator>,
    cdrs: Arc<dyn CdrSink>,
    channels: HashMap<u64, ChannelId>,
}

impl TrunkPolicy {
    pub fn new(alloc: Arc<Allocator>, cdrs: Arc<dyn CdrSink>) -> Self {
        Self {
            alloc,
            cdrs,
            channels: HashMap::new(),
        }
    }
}

/// SPEC §4: 503 + Retry-After, 486, 402, 403.
pub fn status_of(r: &Refusal) -> Refused {
    match r {
        Refusal::RateLimited { retry_after_secs } => Refused {
            code: 503,
            retry_after: Some(*retry_after_secs),
        },
        Refusal::Busy => Refused {
            code: 486,
            retry_after: None,
        },
        Refusal::BudgetExhausted => Refused {
            code: 402,
            retry_after: None,
        },
        Refusal::DestinationDenied => Refused {
            code: 403,
            retry_after: None,
        },
        // A refusal this edge does not know yet: refuse as overloaded.
        #[allow(unreachable_patterns)]
        _ => Refused {
            code: 503,
            retry_after: Some(1),
        },
    }
}

fn cause_label(c: EndCause) -> &'static str {
    match c {
        EndCause::Completed => "normal",
        EndCause::Cancelled => "cancel",
        EndCause::Rejected(486) => "busy",
        EndCause::Rejected(_) => "rejected",
        EndCause::Timeout => "timeout",
        EndCause::NoAck => "no_ack",
        EndCause::Shutdown => "shutdown",
        EndCause::LimitReached => "limit_reached",
        EndCause::Admin => "admin_hangup",
        EndCause::MediaTimeout => "media_timeout",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

impl CallPolicy for TrunkPolicy {
    fn admit(
        &mut self,
        call: u64,
        key: &KeyRecord,
        destination: &str,
        now: Instant,
        unix: i64,
    ) -> Result<(), Refused> {
        let limits = KeyLimits::from(&key.limits);
        match self.alloc.admit(&key.id, &limits, destination, now, unix) {
            Ok(ch) => {
                self.channels.insert(call, ch);
                Ok(())
            }
            Err(r) => Err(status_of(&r)),
        }
    }

    fn answered(&mut self, call: u64, unix: i64) -> Option<u64> {
        let ch = self.channels.get(&call)?;
        self.alloc.answered(*ch, unix)
    }

    fn ended(&mut self, r: &CallRecord) {
        if let Some(ch) = self.channels.remove(&r.call) {
            self.alloc.release(ch, r.billable_secs, r.end);
        }
        // Per-key outcome counters (attempts and billable seconds are counted
        // by the allocator): bounded labels, a key id and a fixed cause set.
        let cause = cause_label(r.cause);
        metrics::counter!("tollgate_key_calls_ended_total", "key" => r.key_id.clone(), "cause" => cause)
            .increment(1);
        if r.answer.is_some() {
            metrics::counter!("tollgate_key_calls_answered_total", "key" => r.key_id.clone())
                .increment(1);
        }
        let cdr = Cdr {
            call_id: if r.call_id.is_empty() {
                format!("{}-{}", r.start, r.call)
            } else {
                r.call_id.clone()
            },
            key_id: r.key_id.clone(),
            trunk: r.key_id.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            start: r.start,
            answer: r.answer,
            end: r.end,
            billable_secs: r.billable_secs,
            cause: cause.to_string(),
            sip_code: r.sip_code,
            sip_call_id: (!r.a_call_id.is_empty()).then(|| r.a_call_id.clone()),
        };
        if let Err(e) = self.cdrs.record(&cdr) {
            tracing::error!(error = %e, call = %cdr.call_id, "CDR not recorded");
        }
    }
}
