//! Route selection (SPEC §9): which [`Route`] a call takes, by the token's
//! `model` and the canonical destination's longest `prefix` (SPEC §4a), and
//! the credentials the edge answers an upstream carrier's digest challenge
//! with (RFC 3261 §22.2).

use crate::b2bua::Route;
use crate::message::SipUri;
use crate::resolve::Located;
use crate::transaction::{Peer, Transport};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tollgate_keys::number::{Dest, Prefix};

/// One destination of a route: tried in order, the next on a 408, a 5xx or
/// no answer; skipped while its OPTIONS pings fail (SPEC §9).
#[derive(Debug, Clone)]
pub struct Target {
    pub uri: SipUri,
    /// The URI as configured (the metrics' `target` label).
    pub text: String,
    /// Where it is: fixed for an IP address; for a name, a placeholder
    /// (see [`Target::current_peer`]).
    pub peer: Peer,
    /// Shared by every shard and call; set by the pings of shard 0.
    pub health: Arc<Health>,
    /// The metrics' `target` label: where it is in the configuration
    /// (`routes[i].targets[j]`), never an address (bounded, no call data).
    pub label: String,
    /// A target named by DNS: its latest answer (RFC 3263), kept fresh on
    /// the async side.
    pub located: Option<Arc<Located>>,
}

impl Target {
    pub fn new(uri: SipUri, text: String, peer: Peer) -> Self {
        Target {
            uri,
            text,
            peer,
            health: Arc::new(Health::default()),
            label: "routes[0].targets[0]".to_owned(),
            located: None,
        }
    }

    /// Names the target by its place in the configuration (metrics label)
    /// and shows it up in `tollgate_route_target_up`.
    pub fn labelled(mut self, route: usize, index: usize) -> Self {
        self.label = format!("routes[{route}].targets[{index}]");
        metrics::gauge!("tollgate_route_target_up", "target" => self.label.clone()).set(1.0);
        self
    }

    /// A target whose host is a DNS name: unresolved until `located` is set.
    pub fn named(uri: SipUri, text: String, transport: Transport) -> Self {
        let peer = Peer {
            transport,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            flow: None,
        };
        Target {
            located: Some(Arc::default()),
            ..Target::new(uri, text, peer)
        }
    }

    /// Where to send now: the fixed address, or the name's first answer;
    /// `None` while a name does not resolve.
    pub fn current_peer(&self) -> Option<Peer> {
        match &self.located {
            None => Some(self.peer.clone()),
            Some(l) => l.first(),
        }
    }

    /// Leg B's Request-URI toward this target: the target's own URI when it
    /// names a user (an agent), else the destination (canonical, SPEC §4a)
    /// at the target's host: what an upstream carrier gateway expects.
    pub fn request_uri(&self, user: &str) -> String {
        if self.uri.user.is_some() {
            return self.text.clone();
        }
        let host = crate::b2bua::bracket(&self.uri.host);
        match self.uri.port {
            Some(p) => format!("sip:{user}@{host}:{p}"),
            None => format!("sip:{user}@{host}"),
        }
    }
}

/// Whether a target answers its OPTIONS pings. Up until a ping says
/// otherwise.
#[derive(Debug)]
pub struct Health {
    up: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: AtomicBool::new(true),
        }
    }
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records a ping's outcome for `target` (its URI) labelled `label`;
    /// logs a change.
    pub fn set(&self, up: bool, label: &str, target: &str) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            tracing::info!(target, up, "route target health changed (OPTIONS)");
            metrics::gauge!("tollgate_route_target_up", "target" => label.to_owned()).set(if up {
                1.0
            } else {
                0.0
            });
        }
    }
}

/// A ping's final status: does the target serve? Any answer but a 408 or
/// a 5xx means it does (a 404 or 405 to OPTIONS is still a live server).
pub fn ping_says_up(code: u16) -> bool {
    code != 408 && code < 500
}

/// The order a call tries `targets` in: those up, in configured order;
/// when none is up, all of them (a ping may be wrong, a call must not be
/// refused on it alone). A name that does not resolve is never tried.
pub fn order(targets: &[Target]) -> Vec<Target> {
    let found: Vec<&Target> = targets
        .iter()
        .filter(|t| t.current_peer().is_some())
        .collect();
    let up: Vec<Target> = found
        .iter()
        .filter(|t| t.health.is_up())
        .map(|t| (*t).clone())
        .collect();
    if up.is_empty() {
        found.into_iter().cloned().collect()
    } else {
        up
    }
}

/// A leg-B final response after which the next target is tried (SPEC §9;
/// RFC 3263 §4.3 for 503).
pub fn fails_over(code: u16) -> bool {
    code == 408 || (500..600).contains(&code)
}

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
            targets: Vec::new(),
            ping_interval: None,
        }
    }

    fn target(text: &str, port: u16) -> Target {
        let peer = Peer {
            transport: Transport::Udp,
            addr: ([127, 0, 0, 1], port).into(),
            flow: None,
        };
        Target::new(SipUri::parse(text).unwrap(), text.into(), peer)
    }

    #[test]
    fn targets_in_order_skipping_those_down_and_the_request_uri() {
        let ts = vec![
            target("sip:127.0.0.1:5061", 5061),
            target("sip:agent@127.0.0.1:5062", 5062),
            target("sip:127.0.0.3", 5063),
        ];
        let ports = |v: Vec<Target>| {
            v.iter()
                .map(|t| t.current_peer().unwrap().addr.port())
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(order(&ts)), [5061, 5062, 5063]);
        ts[0].health.set(false, "l", "a");
        assert_eq!(ports(order(&ts)), [5062, 5063]);
        for t in &ts {
            t.health.set(false, "l", "a");
        }
        assert_eq!(ports(order(&ts)), [5061, 5062, 5063], "none up: try all");
        ts[2].health.set(true, "l", "a");
        assert_eq!(ports(order(&ts)), [5063]);
        assert_eq!(ts[0].request_uri("+4420"), "sip:+4420@127.0.0.1:5061");
        assert_eq!(ts[1].request_uri("+4420"), "sip:agent@127.0.0.1:5062");
        assert_eq!(ts[2].request_uri("+1"), "sip:+1@127.0.0.3");
        let named = Target::named(
            SipUri::parse("sip:gw.carrier.test").unwrap(),
            "sip:gw.carrier.test".into(),
            Transport::Udp,
        );
        let with_name = vec![named.clone(), ts[2].clone()];
        assert_eq!(
            ports(order(&with_name)),
            [5063],
            "an unresolved name is skipped"
        );
        let found = ts[1].peer.clone();
        named.located.as_ref().unwrap().set(vec![found]);
        assert_eq!(
            ports(order(&with_name)),
            [5062, 5063],
            "resolved: tried first"
        );
        assert!(fails_over(503) && fails_over(408) && fails_over(500));
        assert!(!fails_over(486) && !fails_over(404) && !fails_over(603));
        assert!(ping_says_up(200) && ping_says_up(405) && !ping_says_up(503));
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
