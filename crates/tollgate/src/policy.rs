//! The B2BUA's call policy, made of the trunk allocator (admission, budgets)
//! and the durable CDR store. This is the one place where a trunk refusal
//! becomes a SIP status (SPEC §4).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tollgate_keys::{KeyRecord, KeyStore, PendingUse, ReplayCache};
use tollgate_sip::b2bua::{AdmitInfo, CallPolicy, CallRecord, Refused};
use tollgate_sip::EndCause;
use tollgate_trunk::{
    Allocator, CallJournal, Cdr, CdrSink, ChannelId, KeyLimits, OpenCall, Refusal, TrunkKey,
};

pub struct TrunkPolicy {
    alloc: Arc<Allocator>,
    /// Where a key's ancestors are looked up: their limits bound its calls.
    keys: Arc<dyn KeyStore>,
    cdrs: Arc<dyn CdrSink>,
    channels: HashMap<u64, ChannelId>,
    /// Call events to the token's webhook: only a `try_send` here (webhook.rs).
    webhooks: Option<crate::webhook::Hooks>,
    hooked: HashMap<u64, Arc<crate::webhook::CallCtx>>,
    /// Admitted calls, shared by every shard and the admin API.
    calls: CallRegistry,
    /// Crash recovery of calls up (`edge_lost` CDRs): only queues here.
    journal: Option<Arc<CallJournal>>,
    /// `[state] on_unavailable = "refuse"`: while the fleet's shared state
    /// is down, every new call is refused, credential or not (SPEC §4).
    state_gate: Option<Arc<tollgate_state::Shared>>,
    /// `[state]`: the fleet's admission (credential use, calls per second,
    /// concurrent calls: one script in Redis).
    fleet: Option<Fleet>,
    /// Records the calls whose `record` parameter is true (SPEC §10).
    recorder: Option<Arc<crate::recording::Recorder>>,
    /// Recorded calls: the recording's name, for the CDR and webhook.
    recorded: HashMap<u64, String>,
}

/// The fleet's side of an admission.
struct Fleet {
    admission: Arc<tollgate_state::FleetChannels>,
    /// `on_unavailable = "local"`: while Redis does not answer, a call goes
    /// ahead on this edge's limits and its credential's use is recorded in
    /// this edge's own replay cache; `None`: 503.
    local_replay: Option<Arc<dyn ReplayCache>>,
}

/// An admitted call as the admin API lists it (`GET /v1/calls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCall {
    /// Leg B's Call-ID: the call's id in its CDR and in the admin API.
    pub call_id: String,
    /// Leg A's Call-ID, as the caller knows the call.
    pub a_call_id: String,
    pub key_id: String,
    pub from: String,
    pub to: String,
    /// Unix seconds.
    pub start: i64,
    /// Unix seconds, once leg B answered.
    pub answered: Option<i64>,
}

/// Calls between admission and their CDR, keyed by the B2BUA's call handle
/// (what `driver::Control::Hangup` takes); the admin API finds a call by its
/// `call_id`. A sharded map: no global lock on the INVITE path.
pub type CallRegistry = Arc<dashmap::DashMap<u64, ActiveCall>>;

impl TrunkPolicy {
    pub fn new(alloc: Arc<Allocator>, cdrs: Arc<dyn CdrSink>, keys: Arc<dyn KeyStore>) -> Self {
        Self {
            alloc,
            keys,
            cdrs,
            channels: HashMap::new(),
            webhooks: None,
            hooked: HashMap::new(),
            calls: CallRegistry::default(),
            journal: None,
            state_gate: None,
            fleet: None,
            recorder: None,
            recorded: HashMap::new(),
        }
    }

    /// Records calls whose token says `record`.
    pub fn with_recorder(mut self, recorder: Arc<crate::recording::Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// Admits fleet-wide as well (and records the credential's single use
    /// in the same round trip); `local_replay`: admit on this edge's limits
    /// and record uses there when Redis does not answer (else 503).
    pub fn with_fleet_channels(
        mut self,
        admission: Arc<tollgate_state::FleetChannels>,
        local_replay: Option<Arc<dyn ReplayCache>>,
    ) -> Self {
        self.fleet = Some(Fleet {
            admission,
            local_replay,
        });
        self
    }

    /// Refuses new calls with 503 + Retry-After while `shared` is down.
    pub fn with_state_gate(mut self, shared: Arc<tollgate_state::Shared>) -> Self {
        self.state_gate = Some(shared);
        self
    }

    /// Journals admissions, answers and ends, so that a call up at a crash
    /// gets its CDR at the next start.
    pub fn with_journal(mut self, journal: Arc<CallJournal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Journals the admission of `call` (just put in the registry).
    fn journal_opened(&self, call: u64) {
        let (Some(j), Some(c)) = (&self.journal, self.calls.get(&call)) else {
            return;
        };
        j.opened(OpenCall {
            call_id: cdr_call_id(&c.call_id, c.start, call),
            key_id: c.key_id.clone(),
            trunk: c.key_id.clone(),
            from: c.from.clone(),
            to: c.to.clone(),
            start: c.start,
            sip_call_id: (!c.a_call_id.is_empty()).then(|| c.a_call_id.clone()),
        });
    }

    /// Shares `calls` (the admin API's view of active calls) with this shard.
    pub fn with_calls(mut self, calls: CallRegistry) -> Self {
        self.calls = calls;
        self
    }

    /// Sends call events to the webhooks the tokens name.
    pub fn with_webhooks(mut self, hooks: crate::webhook::Hooks) -> Self {
        self.webhooks = Some(hooks);
        self
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

/// A call's id in its CDR and in the journal: leg B's Call-ID, or
/// `<start>-<handle>` if it has none.
fn cdr_call_id(call_id: &str, start: i64, call: u64) -> String {
    if call_id.is_empty() {
        format!("{start}-{call}")
    } else {
        call_id.to_string()
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
        EndCause::OfferAnswerFailed => "offer_answer_failed",
        EndCause::Stream(s) => s.label(),
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// A credential reused (SPEC §4: 401; the B2BUA answers it as the
/// credential check does).
const REPLAYED: Refused = Refused {
    code: 401,
    retry_after: None,
};

/// Shared state unreachable with `on_unavailable = "refuse"`.
const STATE_UNAVAILABLE: Refused = Refused {
    code: 503,
    retry_after: Some(tollgate_sip::b2bua::STATE_RETRY_AFTER_SECS),
};

impl TrunkPolicy {
    /// The fleet's admission of a call this edge admitted on its own
    /// limits: `Some` refusal, or `None` (admitted, leases held).
    fn fleet_admit(
        &self,
        call: u64,
        key: &KeyRecord,
        chain: &[TrunkKey<'_>],
        pending: Option<&PendingUse>,
        unix: i64,
    ) -> Option<Refused> {
        let Some(fleet) = &self.fleet else {
            // A use left to an admission that has no fleet: fail closed.
            return pending.map(|_| STATE_UNAVAILABLE);
        };
        let root = chain.last().map_or(key.id.as_str(), |k| k.id);
        let keys: Vec<tollgate_state::ChainKey<'_>> = chain
            .iter()
            .map(|k| tollgate_state::ChainKey {
                id: k.id,
                max_calls: k.limits.max_calls,
                cps: k.limits.cps,
                daily_minutes: k.limits.daily_minutes,
            })
            .collect();
        let (refused, reason) = match fleet.admission.admit(root, &keys, call, pending) {
            Ok(tollgate_state::Admission::Admitted) => return None,
            Ok(tollgate_state::Admission::Replayed) => return Some(REPLAYED),
            Ok(tollgate_state::Admission::Busy) => (status_of(&Refusal::Busy), "busy"),
            Ok(tollgate_state::Admission::BudgetExhausted) => {
                (status_of(&Refusal::BudgetExhausted), "budget")
            }
            Ok(tollgate_state::Admission::RateLimited(secs)) => (
                status_of(&Refusal::RateLimited {
                    retry_after_secs: secs,
                }),
                "rate_limited",
            ),
            Err(_) => match &fleet.local_replay {
                Some(local) => return pending.and_then(|p| local_use(local.as_ref(), p, unix)),
                None => (STATE_UNAVAILABLE, "state_unavailable"),
            },
        };
        metrics::counter!("tollgate_fleet_refusals_total", "reason" => reason).increment(1);
        Some(refused)
    }

    /// Records `pending` alone, for a call refused on this edge's limits:
    /// `Some(401)` for a replay (or 503 when it cannot be recorded), `None`
    /// the first time (the call gets its limit's status).
    fn record_use_alone(&self, root: &str, pending: &PendingUse, unix: i64) -> Option<Refused> {
        let Some(fleet) = &self.fleet else {
            return Some(STATE_UNAVAILABLE);
        };
        match fleet.admission.record_use(root, pending) {
            Ok(true) => None,
            Ok(false) => Some(REPLAYED),
            Err(_) => match &fleet.local_replay {
                Some(local) => local_use(local.as_ref(), pending, unix),
                None => Some(STATE_UNAVAILABLE),
            },
        }
    }
}

/// How long an answered call may go on: the shorter of this edge's grant
/// and the fleet's. Redis not answering leaves the edge's own (a call up
/// continues through an outage, SPEC §8).
fn fleet_bound(
    local: Option<u64>,
    fleet: Option<Result<Option<u64>, tollgate_state::StateError>>,
) -> Option<u64> {
    match fleet {
        Some(Ok(Some(f))) => Some(local.map_or(f, |l| l.min(f))),
        Some(Err(e)) => {
            tracing::debug!(error = %e, "fleet budget unavailable; this edge's grant holds");
            local
        }
        _ => local,
    }
}

/// A use recorded in this edge's own cache (`on_unavailable = "local"`).
fn local_use(local: &dyn ReplayCache, pending: &PendingUse, unix: i64) -> Option<Refused> {
    match local.record_use(&pending.id, pending.expires_at, unix) {
        tollgate_keys::Use::First => None,
        tollgate_keys::Use::Replayed => Some(REPLAYED),
        tollgate_keys::Use::Unavailable => Some(STATE_UNAVAILABLE),
    }
}

impl CallPolicy for TrunkPolicy {
    fn admit(
        &mut self,
        call: u64,
        key: &KeyRecord,
        destination: &tollgate_keys::number::Dest,
        info: &AdmitInfo<'_>,
        now: Instant,
        unix: i64,
    ) -> Result<(), Refused> {
        // Shared state down with `refuse`: a call admitted now would escape
        // the fleet's limits, and its credential's single use could not be
        // recorded fleet-wide. No Redis round trip: the health thread's flag.
        if self.state_gate.as_ref().is_some_and(|s| !s.is_up()) {
            metrics::counter!("tollgate_state_refusals_total").increment(1);
            return Err(STATE_UNAVAILABLE);
        }
        // A missing parent or a loop: refused (fail closed), as the
        // source check does.
        let Some(ancestors) = tollgate_keys::store::ancestors(self.keys.as_ref(), key) else {
            return Err(status_of(&Refusal::Busy));
        };
        let chain: Vec<TrunkKey<'_>> = std::iter::once(key)
            .chain(ancestors.iter().map(|k| &**k))
            .map(|k| TrunkKey {
                id: &k.id,
                limits: KeyLimits::from(&k.limits),
            })
            .collect();
        let ch = match self.alloc.admit_chain(&chain, destination, now, unix) {
            Ok(ch) => ch,
            Err(r) => {
                // A replay is a 401 before any limit, as on one edge.
                let root = chain.last().map_or(key.id.as_str(), |k| k.id);
                if let Some(replayed) = info
                    .pending_use
                    .and_then(|p| self.record_use_alone(root, p, unix))
                {
                    return Err(replayed);
                }
                return Err(status_of(&r));
            }
        };
        // Then the fleet's: the credential's use, the key's and every
        // ancestor's rate and channels on all edges, one script in Redis.
        if let Some(r) = self.fleet_admit(call, key, &chain, info.pending_use, unix) {
            self.alloc.release(ch, 0, unix);
            return Err(r);
        }
        self.channels.insert(call, ch);
        self.calls.insert(
            call,
            ActiveCall {
                call_id: info.call_id.to_string(),
                a_call_id: info.a_call_id.to_string(),
                key_id: key.id.clone(),
                from: info.from.to_string(),
                to: destination.to_string(),
                start: unix,
                answered: None,
            },
        );
        self.journal_opened(call);
        if let (true, Some(rec)) = (info.record, &self.recorder) {
            let id = cdr_call_id(info.call_id, unix, call);
            if let Some(name) = rec.start(call, &key.id, &id) {
                self.recorded.insert(call, name);
            }
        }
        if let Some(hooks) = &self.webhooks {
            if let Some(ctx) = hooks.initiated(key, destination.as_str(), info, unix) {
                self.hooked.insert(call, ctx);
            }
        }
        Ok(())
    }

    fn answered(&mut self, call: u64, unix: i64) -> Option<u64> {
        if let Some(mut c) = self.calls.get_mut(&call) {
            c.answered = Some(unix);
            if let Some(j) = &self.journal {
                j.answered(cdr_call_id(&c.call_id, c.start, call), unix);
            }
        }
        if let (Some(hooks), Some(ctx)) = (&self.webhooks, self.hooked.get(&call)) {
            hooks.answered(ctx, unix);
        }
        let local = match self.channels.get(&call) {
            Some(ch) => self.alloc.answered(*ch, unix),
            None => return None,
        };
        let fleet = self
            .fleet
            .as_ref()
            .map(|f| f.admission.answered(call, unix));
        fleet_bound(local, fleet)
    }

    fn budget_check(&mut self, call: u64, unix: i64) -> Option<u64> {
        let local = match self.channels.get(&call) {
            Some(ch) => self.alloc.budget_check(*ch, unix),
            None => return Some(0),
        };
        let fleet = self
            .fleet
            .as_ref()
            .map(|f| f.admission.budget_check(call, unix));
        fleet_bound(local, fleet)
    }

    fn ended(&mut self, r: &CallRecord) {
        self.calls.remove(&r.call);
        if let Some(ch) = self.channels.remove(&r.call) {
            self.alloc.release(ch, r.billable_secs, r.end);
        }
        if let Some(fleet) = &self.fleet {
            let id = cdr_call_id(&r.call_id, r.start, r.call);
            fleet.admission.release(r.call, &id, r.billable_secs, r.end);
        }
        // Per-key outcome counters (attempts and billable seconds are counted
        // by the allocator): bounded labels, a key id and a fixed cause set.
        let cause = cause_label(r.cause);
        let recording = self.recorded.remove(&r.call);
        if let (Some(rec), Some(_)) = (&self.recorder, &recording) {
            rec.stop(r.call);
        }
        if let (Some(hooks), Some(ctx)) = (&self.webhooks, self.hooked.remove(&r.call)) {
            hooks.completed(&ctx, r, cause, recording.as_deref());
        }
        metrics::counter!("tollgate_key_calls_ended_total", "key" => r.key_id.clone(), "cause" => cause)
            .increment(1);
        if r.answer.is_some() {
            metrics::counter!("tollgate_key_calls_answered_total", "key" => r.key_id.clone())
                .increment(1);
        }
        let cdr = Cdr {
            call_id: cdr_call_id(&r.call_id, r.start, r.call),
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
            recording,
        };
        if let Err(e) = self.cdrs.record(&cdr) {
            tracing::error!(error = %e, call = %cdr.call_id, "CDR not recorded");
        }
        if let Some(j) = &self.journal {
            j.closed(cdr.call_id);
        }
    }
}
