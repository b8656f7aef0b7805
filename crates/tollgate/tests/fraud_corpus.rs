mod common;

// ==== numbers_and_caller_id: premium numbers in every form, 484, spoofed and asserted caller IDs (SPEC §3d, §4a) ====
mod numbers_and_caller_id {
    use super::common::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    /// Flags of `keys create` for a key whose CIDR is admitted without a
    /// credential (a carrier interconnect). One place to change when the
    /// flag becomes `--trust-cidr`.
    fn trusted_key_args(cidr: &str) -> Vec<&str> {
        vec!["--source-cidr", cidr]
    }

    /// An edge routed to a fresh MiniUas in `mode`, with one key made with
    /// `key_args` before the edge starts.
    fn edge(mode: UasMode, key_args: &[&str]) -> (MiniUas, Edge, String) {
        let uas = MiniUas::start(mode);
        let dir = TestDir::new("numbers");
        let key = create_key(&dir.join("data"), "numbers", key_args);
        let edge = Edge::start_in(dir, EdgeConfig::routed_to(uas.addr.port()));
        (uas, edge, key)
    }

    /// An INVITE to `ruri_user` (or a full `tel:`/`sip:` Request-URI) from
    /// `from_user`, with a bearer token whose `to`/`from` are given.
    fn bearer_invite(edge: &Edge, key: &str, ruri: &str, from: &str, to_claim: &str) -> Req {
        let n = now_unix();
        let t = jwt_for(key, &claims(n - 5, n + 300, to_claim, from));
        let mut r = Req::invite(edge.sip_udp, ruri, from);
        if ruri.starts_with("tel:") || ruri.starts_with("sip:") {
            r.ruri = ruri.to_string();
            r.to = format!("<{ruri}>");
        }
        r.bearer(&t)
    }

    fn code(ua: &mut UdpUa, r: &Req) -> u16 {
        ua.call(r).code().unwrap_or(0)
    }

    /// Toll fraud through dialling forms: premium-rate, shared-cost and
    /// revenue-share destinations written as `+` E.164, national, `00`,
    /// `011`, with separators, as a `tel:` Request-URI and as a `tel:` token
    /// `to`, each get 403 from the default install and leg B sees no INVITE.
    #[test]
    fn premium_and_revenue_share_in_every_form_get_403_and_never_reach_leg_b() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let cases: &[(&str, &str)] = &[
            ("+19005550100", "+19005550100"),
            ("19005550100", "19005550100"),
            ("9005550100", "9005550100"),
            ("0019005550100", "0019005550100"),
            ("01119005550100", "011 1 900 555 0100"),
            ("1-900-555-0100", "+1 (900) 555-0100"),
            ("tel:+1-900-555-0100", "tel:+1-900-555-0100"),
            ("19005550100", "tel:+19005550100"),
            ("00449090901234", "00449090901234"),
            ("01144909090123", "01144909090123"),
            ("+44.909.090.1234", "+449090901234"),
            ("+448712345678", "+448712345678"),
            ("0033810123456", "+33810123456"),
            ("00499001234567", "+499001234567"),
            ("+979123456789", "+979123456789"),
            ("011881612345678", "+881612345678"),
            ("+883510000000", "+883510000000"),
        ];
        for (ruri, to) in cases {
            let r = bearer_invite(&edge, &key, ruri, "+14155550199", to);
            assert_eq!(code(&mut ua, &r), 403, "{ruri} (token to {to})");
        }
        // A normal number proves the route works (so silence at leg B means
        // refusal, not a broken route).
        let r = bearer_invite(&edge, &key, "14155550100", "+14155550199", "+14155550100");
        assert_eq!(code(&mut ua, &r), 486);
        assert_eq!(uas.count("INVITE"), 1, "only the normal call reached leg B");
    }

    /// The other side of the deny list: an ordinary number in each form is
    /// one number and is admitted (200 from the destination).
    #[test]
    fn normal_number_in_every_form_is_admitted() {
        let (uas, edge, key) = edge(UasMode::Answer, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let forms = [
            "+14155550100",
            "14155550100",
            "4155550100",
            "0014155550100",
            "01114155550100",
            "+1-415-555-0100",
            "tel:+1.415.555.0100",
        ];
        for f in forms {
            let r = bearer_invite(&edge, &key, f, "+14155550199", "tel:+1 415 555 0100");
            let fin = ua.call(&r);
            assert_eq!(fin.code(), Some(200), "{f}: {}", fin.text());
            assert_eq!(ua.ack_and_bye(&r, &fin), Some(200), "{f}");
        }
        assert_eq!(uas.count("INVITE"), forms.len());
    }

    /// A key's allow-list and deny prefixes, written in one form, hold for
    /// destinations dialled in any other form; a name never matches a
    /// number prefix.
    #[test]
    fn key_allow_and_deny_prefixes_hold_across_forms() {
        let (uas, edge, key) = edge(
            UasMode::Busy,
            &[
                "--allow-prefix",
                "1415",
                "--deny-prefix",
                "011 1 415 555 01",
            ],
        );
        let mut ua = UdpUa::new(edge.sip_udp);
        for (dest, want) in [
            ("+14155550100", 403),
            ("4155550123", 403),
            ("0014155550199", 403),
            ("+14155559999", 486),
            ("0014155559998", 486),
            ("4155559997", 486),
            ("+12125550100", 403),
            ("0012125550100", 403),
            ("agent", 403),
        ] {
            let r = bearer_invite(&edge, &key, dest, "+14155550199", dest);
            assert_eq!(code(&mut ua, &r), want, "{dest}");
        }
        assert_eq!(uas.count("INVITE"), 3);
    }

    /// Slipping past the number checks with a destination that looks like a
    /// number but is none (too short, a bare `+`, an international prefix
    /// alone, a star code): 484 Address Incomplete, nothing at leg B. A SIP
    /// name is not a number attempt and still goes through.
    #[test]
    fn number_attempts_that_are_no_number_get_484() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        for dest in [
            "12345",
            "+",
            "011",
            "5550100",
            "*6719005550100",
            "+9991234567",
        ] {
            let r = bearer_invite(&edge, &key, dest, "+14155550199", dest);
            let fin = ua.call(&r);
            assert_eq!(fin.code(), Some(484), "{dest}: {}", fin.text());
        }
        assert_eq!(uas.count("INVITE"), 0);
        let r = bearer_invite(&edge, &key, "agent", "+14155550199", "agent");
        assert_eq!(code(&mut ua, &r), 486);
    }

    /// Caller-ID spoofing with a token: From is a number the token does not
    /// name, and a P-Asserted-Identity carries the token's `from`. The PAI of
    /// an untrusted source is no identity: 401 invalid_token.
    #[test]
    fn spoofed_from_with_matching_pai_gets_invalid_token() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let n = now_unix();
        let t = jwt_for(
            &key,
            &claims(n - 5, n + 300, "+14155550100", "+14155550199"),
        );
        let r = Req::invite(edge.sip_udp, "+14155550100", "+19998887777")
            .header("P-Asserted-Identity", "<sip:+14155550199@carrier.example>")
            .bearer(&t);
        assert_invalid_token(&ua.call(&r), "spoofed From, PAI = token from");
        assert_eq!(uas.count("INVITE"), 0);
    }

    /// Smuggling a caller ID past the check: an admitted untrusted caller
    /// adds a P-Asserted-Identity; leg B gets the checked identity (the From,
    /// canonical) and no P-Asserted-Identity at all.
    #[test]
    fn untrusted_pai_never_reaches_leg_b() {
        let (uas, edge, key) = edge(UasMode::Busy, &[]);
        let mut ua = UdpUa::new(edge.sip_udp);
        let r = bearer_invite(&edge, &key, "+14155550100", "14155550199", "+14155550100")
            .header("P-Asserted-Identity", "<sip:+18885550000@evil.example>");
        assert_eq!(code(&mut ua, &r), 486);
        assert!(uas.wait_for("INVITE", 1, Duration::from_secs(10)));
        let inv = &uas.requests("INVITE")[0];
        assert!(
            inv.header("P-Asserted-Identity").is_none(),
            "PAI reached leg B:\n{}",
            inv.text()
        );
        let from = SipMsg::uri_user(inv.header("From").unwrap_or(""));
        assert_eq!(from.as_deref(), Some("+14155550199"), "{}", inv.text());
    }

    /// A trusted carrier (credential-less, from its CIDR) asserts the caller
    /// with P-Asserted-Identity: it is honoured, canonical, and passed on to
    /// leg B as both From and P-Asserted-Identity.
    #[test]
    fn trusted_carrier_pai_is_passed_on() {
        let (uas, edge, _key) = edge(UasMode::Busy, &trusted_key_args("127.0.0.3/32"));
        let sock = UdpSocket::bind("127.0.0.3:0").expect("bind 127.0.0.3");
        let local = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let r = Req::invite(edge.sip_udp, "+14155550100", "anonymous")
            .header("P-Asserted-Identity", "<tel:+1-415-555-0123>");
        let bytes = r.render(local);
        let fin = poll(Duration::from_secs(10), || {
            sock.send_to(&bytes, edge.sip_udp).ok()?;
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, _) = sock.recv_from(&mut buf).ok()?;
                let m = SipMsg::parse(&buf[..n])?;
                if m.code().is_some_and(|c| c >= 200) {
                    return Some(m);
                }
            }
        })
        .expect("a final answer to the carrier");
        assert_eq!(fin.code(), Some(486), "{}", fin.text());
        let inv = &uas.requests("INVITE")[0];
        let pai = inv.header("P-Asserted-Identity").unwrap_or("");
        assert_eq!(
            SipMsg::uri_user(pai).as_deref(),
            Some("+14155550123"),
            "{}",
            inv.text()
        );
        let from = SipMsg::uri_user(inv.header("From").unwrap_or(""));
        assert_eq!(from.as_deref(), Some("+14155550123"));
    }

    /// A key limited to its own caller IDs (`--caller-id`) is used to
    /// present another number: 403, for a bearer token and for digest;
    /// its own numbers in any form go through.
    #[test]
    fn caller_id_refuses_other_callers_bearer_and_digest() {
        let (uas, edge, key) = edge(UasMode::Busy, &["--caller-id", "+1 415 555 01"]);
        let mut ua = UdpUa::new(edge.sip_udp);
        for (from, want) in [
            ("+14155550123", 486),
            ("4155550199", 486),
            ("+12125550100", 403),
            ("+14155550200", 403),
        ] {
            let r = bearer_invite(&edge, &key, "+14155550100", from, "+14155550100");
            assert_eq!(code(&mut ua, &r), want, "bearer, from {from}");
        }
        let id = key_id(&key);
        let pass = digest_password(&key);
        for (from, want) in [("+12125550100", 403), ("0014155550100", 486)] {
            let first = Req::invite(edge.sip_udp, "+14155550100", from);
            let fin = ua.call(&first);
            assert_eq!(fin.code(), Some(401), "{}", fin.text());
            let (_, ch) = www_auth(&fin)
                .into_iter()
                .find(|(s, _)| s.eq_ignore_ascii_case("Digest"))
                .expect("a Digest challenge");
            let mut r = first.clone();
            r.branch = unique("z9hG4bK-tg");
            r.cseq += 1;
            let auth = digest_authorization(&ch, &id, &pass, "INVITE", &r.ruri, "00000001", "c1");
            let r = r.header("Authorization", &auth);
            assert_eq!(code(&mut ua, &r), want, "digest, from {from}");
        }
        assert_eq!(uas.count("INVITE"), 3);
    }
}
