//! Leg B's attempts within one call: the INVITE sent again with digest
//! credentials after a carrier's 401/407 (RFC 3261 §22.2), or to the route's
//! next target after a 408, a 5xx or no answer (SPEC §9). Each attempt is a
//! new client transaction (new branch, CSeq + 1, same Call-ID and From tag),
//! so the call keeps one identity and one CDR.

use super::{B2bua, CallState, EndCause, Purpose, Route};
use crate::message::{Header, Message};
use crate::route::{self, OutboundAuth, Target};
use crate::transaction::Peer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tollgate_keys::digest::parse_challenge;

/// What a call may still try on leg B.
#[derive(Debug)]
pub(super) struct Attempts {
    /// The route's credentials for a carrier's challenge.
    pub auth: Option<Arc<OutboundAuth>>,
    /// A challenge of the current target was answered already: a second
    /// one means the credentials are wrong.
    pub challenged: bool,
    /// The Request-URI user toward a target without one (the destination).
    pub user: String,
    /// The target being tried.
    pub current: Target,
    /// Targets not tried yet, in order.
    pub remaining: Vec<Target>,
}

/// The target a call tries first, where it is now, and the rest, in order
/// ([`route::order`]); `None` when no target can be reached (every name
/// unresolved).
pub(super) fn targets_in_order(r: &Route) -> Option<(Target, Peer, Vec<Target>)> {
    let mut v = if r.targets.is_empty() {
        vec![Target::new(
            r.target.clone(),
            r.target_text.clone(),
            r.peer.clone(),
        )]
    } else {
        route::order(&r.targets)
    };
    while !v.is_empty() {
        let first = v.remove(0);
        if let Some(peer) = first.current_peer() {
            return Some((first, peer, v));
        }
    }
    None
}

/// Counts an INVITE toward `t` (per-target metrics, SPEC §9).
pub(super) fn count_invite(t: &Target) {
    metrics::counter!("tollgate_route_target_invites_total", "target" => t.label.clone())
        .increment(1);
}

fn count_failure(t: &Target, code: u16) {
    metrics::counter!(
        "tollgate_route_target_failures_total",
        "target" => t.label.clone(),
        "code" => code.to_string()
    )
    .increment(1);
}

impl B2bua {
    /// A final 3xx-6xx from leg B while leg A waits: true if it is dealt
    /// with here (another INVITE went out, or leg A got its answer and the
    /// call ended); false to relay it to leg A.
    pub(super) fn leg_b_failed(&mut self, now: Instant, id: u64, msg: &Message, code: u16) -> bool {
        let Some(call) = self.calls.get(&id) else {
            return false;
        };
        if call.state != CallState::Setup || call.cancel_pending {
            return false;
        }
        if route::fails_over(code) {
            let current = &call.attempts.current;
            count_failure(current, code);
            return self.next_target(now, id);
        }
        match code {
            401 | 407 => {
                if self.answer_challenge(now, id, msg, code) {
                    return true;
                }
                // The destination's challenge is not leg A's to answer
                // (its credentials are the edge's): the route lacks or has
                // wrong credentials.
                self.refuse_a(now, id, 503, "destination refused the route's credentials");
                true
            }
            _ => false,
        }
    }

    /// Leg B's INVITE got no answer (Timer B): true if the next target is
    /// being tried.
    pub(super) fn leg_b_timed_out(&mut self, now: Instant, id: u64) -> bool {
        let Some(call) = self.calls.get(&id) else {
            return false;
        };
        if call.cancel_pending {
            return false;
        }
        count_failure(&call.attempts.current, 408);
        self.next_target(now, id)
    }

    /// Sends leg B's INVITE to the next target not tried yet: true if
    /// there was one.
    fn next_target(&mut self, now: Instant, id: u64) -> bool {
        let Some(call) = self.calls.get_mut(&id) else {
            return false;
        };
        let Some(mut inv) = call.b_invite_msg.clone() else {
            return false;
        };
        let (next, peer) = loop {
            if call.attempts.remaining.is_empty() {
                return false;
            }
            let t = call.attempts.remaining.remove(0);
            if let Some(p) = t.current_peer() {
                break (t, p);
            }
        };
        let ruri = next.request_uri(&call.attempts.user);
        tracing::info!(call = id, from = %call.attempts.current.text, to = %next.text, "leg B fails over to the next target");
        if let crate::message::StartLine::Request { uri, .. } = &mut inv.start {
            uri.clone_from(&ruri);
        }
        inv.set_header("To", format!("<{ruri}>"));
        inv.remove_headers("Authorization");
        inv.remove_headers("Proxy-Authorization");
        call.b.remote_uri = format!("<{ruri}>");
        call.b.remote_target = ruri;
        call.attempts.challenged = false;
        count_invite(&next);
        call.attempts.current = next;
        self.send_invite_b(now, id, inv, peer)
    }

    /// The driver could not connect to `addr` (TCP connect, TLS handshake
    /// or certificate check): every call still waiting on its INVITE there
    /// tries its next target, or leg A gets 503 (SPEC §9).
    pub fn transport_failed(&mut self, now: Instant, addr: SocketAddr) {
        self.clock = self.clock.max(now);
        let waiting: Vec<u64> = self
            .calls
            .values()
            .filter(|c| {
                c.state == CallState::Setup
                    && !c.cancel_pending
                    && c.b.peer.addr == addr
                    && c.b.peer.transport.reliable()
                    && c.b.remote_tag.is_none()
            })
            .map(|c| c.id)
            .collect();
        for id in waiting {
            let invite = self
                .by_client
                .iter()
                .find(|(_, (c, p))| *c == id && matches!(p, Purpose::InviteB))
                .map(|(k, _)| k.clone());
            if let Some(k) = invite {
                self.by_client.remove(&k);
                self.txn.forget_client(&k);
            }
            if let Some(call) = self.calls.get(&id) {
                count_failure(&call.attempts.current, 503);
            }
            if !self.next_target(now, id) {
                self.refuse_a(
                    now,
                    id,
                    503,
                    "destination unreachable (connection or TLS failed)",
                );
            }
        }
        self.drain_txn_events(now);
    }

    /// Answers leg A's INVITE with `code` and a `Warning` saying why, and
    /// ends the call (leg B has given its final answer).
    fn refuse_a(&mut self, now: Instant, id: u64, code: u16, why: &str) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        let (a_invite, tag) = (call.a_invite.clone(), call.a.local_tag.clone());
        let warning = Header {
            name: "Warning".into(),
            value: format!("399 tollgate \"{why}\""),
        };
        self.reply(now, &a_invite, code, vec![warning], Some(&tag));
        self.end_call(id, EndCause::Rejected(code));
    }

    /// Answers a 401 (`WWW-Authenticate`) or 407 (`Proxy-Authenticate`)
    /// once per target with the route's credentials.
    fn answer_challenge(&mut self, now: Instant, id: u64, msg: &Message, code: u16) -> bool {
        let Some(call) = self.calls.get_mut(&id) else {
            return false;
        };
        let Some(auth) = call.attempts.auth.clone() else {
            return false;
        };
        if call.attempts.challenged {
            tracing::warn!(call = id, user = %auth.username, code, "leg B refused the route's digest credentials");
            return false;
        }
        let Some(mut inv) = call.b_invite_msg.clone() else {
            return false;
        };
        let (ask, answer) = if code == 401 {
            ("WWW-Authenticate", "Authorization")
        } else {
            ("Proxy-Authenticate", "Proxy-Authorization")
        };
        let Some(challenge) = msg.headers_named(ask).find_map(|v| parse_challenge(v).ok()) else {
            return false;
        };
        call.attempts.challenged = true;
        let peer = call.b.peer.clone();
        let cnonce = self.token(12);
        let uri = inv.request_uri().unwrap_or_default().to_owned();
        let value =
            challenge.authorization(&auth.username, auth.password(), "INVITE", &uri, &cnonce);
        inv.remove_headers("Authorization");
        inv.remove_headers("Proxy-Authorization");
        inv.set_header(answer, value);
        metrics::counter!("tollgate_leg_b_digest_answers_total").increment(1);
        self.send_invite_b(now, id, inv, peer)
    }

    /// Sends `inv` (leg B's INVITE, maybe changed) again as a new client
    /// transaction toward `peer`: new branch, next CSeq.
    pub(super) fn send_invite_b(
        &mut self,
        now: Instant,
        id: u64,
        mut inv: Message,
        peer: Peer,
    ) -> bool {
        let seq = inv.cseq().map_or(1, |c| c.seq) + 1;
        let branch = self.branch();
        let via = self.via(peer.transport, &branch, peer.addr.ip());
        inv.set_header("Via", via.value);
        inv.set_header("CSeq", format!("{seq} INVITE"));
        let Some(key) = self.txn.request(now, inv.clone(), peer.clone()) else {
            return false;
        };
        self.metrics.request_sent("INVITE");
        let Some(call) = self.calls.get_mut(&id) else {
            return false;
        };
        call.b_invite_msg = Some(inv);
        call.b.local_cseq = seq;
        call.b.remote_tag = None;
        call.b.peer = peer;
        call.b_provisional = false;
        self.track(id, key, Purpose::InviteB);
        true
    }
}

/// The CSeq number of leg B's current INVITE (its 2xx is ACKed with it).
pub(super) fn invite_cseq(inv: Option<&Message>) -> u32 {
    inv.and_then(|m| m.cseq()).map_or(1, |c| c.seq)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{invite, reply_from_b, rig, udp, Rig};
    use crate::message::{Header, Message};
    use crate::route::{OutboundAuth, Target};
    use std::sync::Arc;
    use std::time::Duration;
    use tollgate_keys::digest::{parse_authorization, verify};

    fn a_invites(r: &mut Rig, jti: &str) {
        let tok = r.token(jti);
        r.a_sends(&invite(
            &format!("Authorization: Bearer {tok}\r\n"),
            &format!("z9hG4bK{jti}"),
        ));
    }

    fn codes(msgs: &[Message]) -> Vec<u16> {
        msgs.iter().filter_map(Message::status).collect()
    }

    /// The rig's route with targets on these ports (first = the rig's B).
    fn with_targets(r: &mut Rig, ports: &[u16]) {
        let route = &mut r.b2b.cfg.routes[0];
        route.targets = ports
            .iter()
            .map(|p| {
                let text = format!("sip:agent@127.0.0.1:{p}");
                Target::new(crate::SipUri::parse(&text).unwrap(), text, udp(*p))
            })
            .collect();
    }

    #[test]
    fn a_carriers_challenge_is_answered_once_in_the_same_call() {
        let mut r = rig();
        r.b2b.cfg.routes[0].auth = Some(Arc::new(OutboundAuth::new("trunk".into(), "pw1".into())));
        a_invites(&mut r, "d1");
        let b = r.b.clone();
        let inv = r.sent_to(&b).remove(0);
        let mut challenge =
            crate::message::parse(reply_from_b(&inv, 401, "c1").as_bytes()).unwrap();
        challenge.headers.push(Header {
            name: "WWW-Authenticate".into(),
            value: "Digest realm=\"carrier\", nonce=\"n1\", qop=\"auth\"".into(),
        });
        r.b_sends(String::from_utf8(challenge.to_bytes().to_vec()).unwrap());
        let again = r.sent_to(&b);
        let inv2 = again.iter().find(|m| m.method() == Some("INVITE")).unwrap();
        assert_eq!(inv2.call_id(), inv.call_id(), "the same call");
        assert_eq!(inv2.cseq().unwrap().seq, 2);
        let cred = parse_authorization(inv2.header("Authorization").unwrap()).unwrap();
        assert!(verify(&cred, "INVITE", "pw1"));
        let a = r.a.clone();
        assert!(!codes(&r.sent_to(&a)).contains(&401), "leg A never sees it");
        // Answered: leg B's ACK (sent with leg A's) will carry CSeq 2.
        r.b_sends(reply_from_b(inv2, 200, "c1"));
        assert!(codes(&r.sent_to(&a)).contains(&200));
        let call = r.b2b.calls.values().next().unwrap();
        assert_eq!(call.pending_ack.as_ref().map(|p| p.other_cseq), Some(2));
        assert_eq!(r.b2b.calls.len(), 1);
    }

    #[test]
    fn the_next_target_after_a_503_or_no_answer_and_408_when_none_is_left() {
        let mut r = rig();
        with_targets(&mut r, &[5080, 5081]);
        let (b1, b2, a) = (udp(5080), udp(5081), r.a.clone());
        a_invites(&mut r, "f1");
        let inv = r.sent_to(&b1).remove(0);
        r.b_sends(reply_from_b(&inv, 503, "x1"));
        let inv2 = r.sent_to(&b2).remove(0);
        assert_eq!(
            (inv2.call_id(), inv2.cseq().unwrap().seq),
            (inv.call_id(), 2)
        );
        assert_eq!(inv2.request_uri(), Some("sip:agent@127.0.0.1:5081"));
        assert!(!codes(&r.sent_to(&a)).contains(&503));
        // The second is silent: Timer B (64*T1) and no target left: 408.
        r.advance(Duration::from_secs(40));
        assert!(codes(&r.sent_to(&a)).contains(&408));
        assert!(r.b2b.calls.is_empty(), "one call, ended once");

        // A silent first target: the second gets the INVITE after Timer B.
        let _ = r.sent_to(&b1);
        a_invites(&mut r, "f2");
        let invites = |m: &[Message]| m.iter().filter(|m| m.method() == Some("INVITE")).count();
        assert_eq!(invites(&r.sent_to(&b1)), 1);
        r.advance(Duration::from_secs(33));
        assert!(invites(&r.sent_to(&b2)) >= 1);
    }

    #[test]
    fn a_connection_that_fails_ends_the_wait_with_the_next_target_or_503() {
        let mut r = rig();
        with_targets(&mut r, &[5080, 5081]);
        for t in &mut r.b2b.cfg.routes[0].targets {
            t.peer.transport = crate::transaction::Transport::Tcp;
        }
        let (b1, b2, a) = (udp(5080), udp(5081), r.a.clone());
        a_invites(&mut r, "t1");
        assert_eq!(r.sent_to(&b1).len(), 1);
        r.b2b.transport_failed(r.t, b1.addr);
        assert_eq!(r.sent_to(&b2).len(), 1, "the next target at once");
        r.b2b.transport_failed(r.t, b2.addr);
        assert!(
            codes(&r.sent_to(&a)).contains(&503),
            "none left: 503, no wait"
        );
        assert!(r.b2b.calls.is_empty());
    }

    #[test]
    fn pings_mark_a_target_down_and_calls_skip_it_until_it_answers() {
        let mut r = rig();
        with_targets(&mut r, &[5080, 5081]);
        r.b2b.cfg.routes[0].ping_interval = Some(Duration::from_secs(5));
        let routes = r.b2b.cfg.routes.clone();
        r.b2b.set_routes(routes);
        let (b1, b2) = (udp(5080), udp(5081));
        r.advance(Duration::from_millis(200));
        let ping = r.sent_to(&b1).remove(0);
        assert_eq!(ping.method(), Some("OPTIONS"));
        assert_eq!(r.sent_to(&b2).len(), 1);
        r.b_sends(reply_from_b(&ping, 503, "p"));
        let health = r.b2b.cfg.routes[0].targets[0].health.clone();
        assert!(!health.is_up());
        a_invites(&mut r, "p1");
        assert!(r.sent_to(&b1).is_empty(), "a target down is skipped");
        assert_eq!(r.sent_to(&b2).len(), 1);
        // The next round: it answers, it is used again.
        r.advance(Duration::from_secs(6));
        let ping = r
            .sent_to(&b1)
            .into_iter()
            .find(|m| m.method() == Some("OPTIONS"))
            .unwrap();
        r.b_sends(reply_from_b(&ping, 200, "p"));
        assert!(health.is_up());
    }
}
