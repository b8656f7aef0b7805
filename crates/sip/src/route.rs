//! Route selection (SPEC §9): which [`Route`] a call takes, by the token's
//! `model` and the canonical destination's longest `prefix` (SPEC §4a), and
//! the credentials the edge answers an upstream carrier's digest challenge
//! with (RFC 3261 §22.2).

use crate::b2bua::Route;
use std::fmt;
use tollgate_keys::number::{Dest, Prefix};

/// Digest credentials of a carrier route: the edge answers a 401/407 to
/// leg B's INVITE with them. `Debug` and `Display` never show the password.
#[derive(Clone)]
pub struct OutboundAuth {
    pub username: String,
    password: String,
}

impl OutboundAuth {
    pub fn new(username: String, password: String) -> Self {
        OutboundAuth { username, password }
    }

    /// The secret, for the digest computation only.
    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for OutboundAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How well a route fits a call, or `None` if it does not apply: a route
/// naming a `model` applies only to tokens with that model, a route naming
/// a `prefix` only to destinations it matches.
fn fit(route: &Route, model: Option<&str>, dest: &Dest) -> Option<(bool, usize)> {
    let by_model = match &route.model {
        None => false,
        Some(m) if Some(m.as_str()) == model => true,
        Some(_) => return None,
    };
    let prefix_len = match &route.prefix {
        None => 0,
        Some(p) if dest.matches(p) => match p {
            Prefix::Number(s) | Prefix::Name(s) => s.len(),
        },
        Some(_) => return None,
    };
    Some((by_model, prefix_len))
}

/// The route a call takes: among those that apply, one naming the token's
/// model before one that does not, then the longest prefix, then the first
/// in the configuration. `None`: no route applies (404).
pub fn pick(routes: &[Route], model: Option<&str>, dest: &Dest) -> Option<usize> {
    let mut best: Option<(usize, (bool, usize))> = None;
    for (i, r) in routes.iter().enumerate() {
        if let Some(f) = fit(r, model, dest) {
            if best.is_none_or(|(_, b)| f > b) {
                best = Some((i, f));
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::b2bua::MediaProfile;
    use crate::message::SipUri;
    use crate::transaction::{Peer, Transport};
    use tollgate_keys::number::NumberPlan;

    fn route(model: Option<&str>, prefix: Option<&str>, port: u16) -> Route {
        let plan = NumberPlan::default();
        let text = format!("sip:127.0.0.1:{port}");
        Route {
            model: model.map(str::to_owned),
            prefix: prefix.map(|p| plan.prefix(p).unwrap()),
            target: SipUri::parse(&text).unwrap(),
            target_text: text,
            peer: Peer {
                transport: Transport::Udp,
                addr: ([127, 0, 0, 1], port).into(),
                flow: None,
            },
            media: MediaProfile::Auto,
            sdes_over_cleartext: false,
            auth: None,
        }
    }

    #[test]
    fn longest_prefix_then_model_then_the_default() {
        let plan = NumberPlan::default();
        let routes = vec![
            route(None, None, 1),
            route(None, Some("+1"), 2),
            route(None, Some("+44"), 3),
            route(None, Some("+4420"), 4),
            route(Some("gpt"), None, 5),
            route(Some("gpt"), Some("+44"), 6),
            route(None, Some("agent"), 7),
        ];
        let d = |s: &str| plan.canonicalize(s);
        let at =
            |m: Option<&str>, s: &str| pick(&routes, m, &d(s)).map(|i| routes[i].peer.addr.port());
        assert_eq!(at(None, "011 44 20 7946 0000"), Some(4));
        assert_eq!(at(None, "+441632960000"), Some(3));
        assert_eq!(at(None, "4155550100"), Some(2));
        assert_eq!(at(None, "+33144556677"), Some(1));
        assert_eq!(at(None, "agent"), Some(7));
        assert_eq!(at(None, "agent2"), Some(1));
        // A model route wins over prefixes; with a prefix too, it must match.
        assert_eq!(at(Some("gpt"), "+14155550100"), Some(5));
        assert_eq!(at(Some("gpt"), "+442079460000"), Some(6));
        // Another model: the routes without one apply.
        assert_eq!(at(Some("other"), "+14155550100"), Some(2));
        assert_eq!(pick(&routes[1..4], None, &d("+33144556677")), None);
    }

    #[test]
    fn the_password_is_never_in_debug_output() {
        let a = OutboundAuth::new("trunk1".into(), "hunter2-secret".into());
        let text = format!("{a:?}");
        assert!(
            text.contains("trunk1") && !text.contains("hunter2"),
            "{text}"
        );
    }
}
