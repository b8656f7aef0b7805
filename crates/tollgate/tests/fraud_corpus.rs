mod common;

// ==== media_hijack: RTP bleed and media hijack on RTP and SRTP legs, NAT latching (SPEC §5) ====
mod media_hijack {
    //! Against the real binary with media anchored: strangers (another port
    //! of the caller's host, 127.0.0.1, and another host, 127.0.0.3) send
    //! RTP and RTCP to the edge's leg-A and leg-B ports before the call's
    //! streams start, during them and after the caller stopped. They must
    //! receive nothing, and nothing of theirs may reach either leg: every
    //! packet carries its sender's SSRC, and each leg's socket must see only
    //! the other leg's. Leg B is a destination run by the test (its SDP
    //! names a socket the test reads and writes).

    use super::common::*;
    use bytes::BytesMut;
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;
    use std::time::Duration;
    use tollgate_media::sdp::{Crypto, SessionDescription};
    use tollgate_media::srtp::{new_context, Direction, SrtpKeys, SrtpTransform, Suite};

    const SSRC_A: u32 = 0x0A0A_0A0A;
    const SSRC_B: u32 = 0x0B0B_0B0B;
    const SSRC_STRANGER: u32 = 0x0E0E_0E0E;
    const SUITE: Suite = Suite::AesCm128HmacSha1_80;
    /// Long enough for a relayed datagram on loopback, even on a loaded
    /// machine, once the edge counted what it dropped.
    const QUIET: Duration = Duration::from_millis(400);

    /// Leg B: answers the edge's INVITE with an SDP naming `rtp` and
    /// `rtcp` on 127.0.0.1, and hands the test the offer it got.
    struct Dest {
        addr: SocketAddr,
        offers: mpsc::Receiver<String>,
        stop: Arc<AtomicBool>,
        handle: Option<thread::JoinHandle<()>>,
    }

    impl Dest {
        fn start(rtp: u16, rtcp: u16) -> Dest {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = sock.local_addr().unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, offers) = mpsc::channel();
            let st = stop.clone();
            let handle = thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st.load(Ordering::Relaxed) {
                    let Ok((n, src)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(m) = SipMsg::parse(&buf[..n]) else {
                        continue;
                    };
                    let resp = match m.method() {
                        Some("INVITE") => {
                            let _ = tx.send(String::from_utf8_lossy(&m.body).to_string());
                            let sdp = format!(
                                "v=0\r\no=b 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
                                 t=0 0\r\nm=audio {rtp} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
                                 a=rtcp:{rtcp}\r\n"
                            );
                            let contact = format!("Contact: <sip:b@{addr}>\r\n");
                            make_response(&m, 200, "OK", "dest", &contact, &sdp)
                        }
                        Some("ACK") | None => continue,
                        Some(_) => make_response(&m, 200, "OK", "dest", "", ""),
                    };
                    let _ = sock.send_to(&resp, src);
                }
            });
            Dest {
                addr,
                offers,
                stop,
                handle: Some(handle),
            }
        }
    }

    impl Drop for Dest {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    /// A media endpoint: an RTP and an RTCP socket.
    struct Endpoint {
        rtp: UdpSocket,
        rtcp: UdpSocket,
    }

    impl Endpoint {
        fn on(ip: &str) -> Endpoint {
            let bind = || {
                let s = UdpSocket::bind((ip, 0)).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            };
            Endpoint {
                rtp: bind(),
                rtcp: bind(),
            }
        }
        fn ports(&self) -> (u16, u16) {
            let p = |s: &UdpSocket| s.local_addr().unwrap().port();
            (p(&self.rtp), p(&self.rtcp))
        }
        /// Every datagram that arrives on either socket within [`QUIET`].
        fn received(&self) -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            let end = std::time::Instant::now() + QUIET;
            let mut buf = [0u8; 2048];
            while std::time::Instant::now() < end {
                let mut idle = true;
                for s in [&self.rtp, &self.rtcp] {
                    if let Ok((n, _)) = s.recv_from(&mut buf) {
                        got.push(buf[..n].to_vec());
                        idle = false;
                    }
                }
                if idle {
                    thread::sleep(Duration::from_millis(5));
                }
            }
            got
        }
    }

    /// The sender's SSRC of an RTP or RTCP packet.
    fn ssrc(p: &[u8]) -> u32 {
        let at = if p.len() >= 2 && (192..=223).contains(&p[1]) {
            4
        } else {
            8
        };
        p.get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn rtp(seq: u16, ssrc: u32) -> BytesMut {
        let mut b = BytesMut::from(&[0x80u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        b[2..4].copy_from_slice(&seq.to_be_bytes());
        b[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        b[8..12].copy_from_slice(&ssrc.to_be_bytes());
        b.extend_from_slice(&[ssrc as u8; 160]);
        b
    }

    fn rtcp_rr(ssrc: u32) -> BytesMut {
        let mut b = BytesMut::from(&[0x80u8, 201, 0, 1][..]);
        b.extend_from_slice(&ssrc.to_be_bytes());
        b
    }

    /// The edge's address for a stream of `sdp`: (RTP, RTCP).
    fn edge_ports(sdp: &[u8]) -> (SocketAddr, SocketAddr) {
        let s = SessionDescription::parse(sdp)
            .unwrap_or_else(|e| panic!("edge SDP: {e}\n{}", String::from_utf8_lossy(sdp)));
        let ip = s.connection(0).expect("c= line");
        let m = &s.media[0];
        let rtcp = m.rtcp().map_or(m.port + 1, |(p, _)| p);
        (SocketAddr::new(ip, m.port), SocketAddr::new(ip, rtcp))
    }

    fn metric(edge: &Edge, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&scrape(edge.metrics_addr()), name, labels).unwrap_or(0.0)
    }

    fn dropped(edge: &Edge, reason: &str) -> f64 {
        metric(edge, "tollgate_media_dropped_total", &[("reason", reason)])
    }

    /// Waits until the edge counted `n` more drops for `reason` than `from`.
    fn await_dropped(edge: &Edge, reason: &str, from: f64, n: f64, what: &str) {
        let ok = poll(Duration::from_secs(10), || {
            (dropped(edge, reason) - from >= n).then_some(())
        });
        assert!(
            ok.is_some(),
            "{what}: tollgate_media_dropped_total{{reason=\"{reason}\"}} went {from} -> {} \
             (want +{n}): the edge took or sent on a packet it must drop",
            dropped(edge, reason)
        );
    }

    /// An answered call through the edge, with leg A's media where its SDP
    /// says (`sdp_ip`, and the ports of `sdp_at`), and leg B at `dest`.
    struct Call {
        ua: UdpUa,
        invite: Req,
        ok: SipMsg,
        /// The edge's ports toward leg A and toward leg B: (RTP, RTCP).
        edge_a: (SocketAddr, SocketAddr),
        edge_b: (SocketAddr, SocketAddr),
        /// The edge's key toward leg A (SRTP calls).
        edge_key: Option<Crypto>,
    }

    impl Call {
        fn place(
            edge: &Edge,
            dest: &Dest,
            sdp_ip: &str,
            sdp_at: (u16, u16),
            key: Option<&Crypto>,
        ) -> Call {
            // RTCP on the RTP port means rtcp-mux (RFC 5761).
            let mux = if sdp_at.0 == sdp_at.1 {
                "a=rtcp-mux\r\n"
            } else {
                ""
            };
            let (proto, crypto) = match key {
                Some(c) => ("RTP/SAVP", format!("a={}\r\n", c.to_attribute())),
                None => ("RTP/AVP", String::new()),
            };
            let sdp = format!(
                "v=0\r\no=alice 1 1 IN IP4 {sdp_ip}\r\ns=-\r\nc=IN IP4 {sdp_ip}\r\nt=0 0\r\n\
                 m=audio {} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\na=rtcp:{}\r\n{mux}{crypto}a=sendrecv\r\n",
                sdp_at.0, sdp_at.1
            );
            let now = now_unix();
            let token = jwt_for(&edge.first_key(), &claims(now, now + 600, SERVICE, "alice"));
            let mut invite = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&token);
            invite.body = sdp.into_bytes();
            let mut ua = UdpUa::new(edge.sip_udp);
            let ok = ua.call(&invite);
            assert_eq!(
                ok.code(),
                Some(200),
                "call through the edge:\n{}",
                ok.text()
            );
            ua.send(&invite.in_dialog(&ok, "ACK", invite.cseq));
            let offer = dest
                .offers
                .recv_timeout(Duration::from_secs(5))
                .expect("leg B got the INVITE");
            let edge_key = key.map(|_| {
                let s = SessionDescription::parse(&ok.body).unwrap();
                s.media[0]
                    .cryptos()
                    .pop()
                    .expect("the edge's key for leg A")
            });
            Call {
                edge_a: edge_ports(&ok.body),
                edge_b: edge_ports(offer.as_bytes()),
                ua,
                invite,
                ok,
                edge_key,
            }
        }

        fn hang_up(mut self) {
            let bye = self.invite.in_dialog(&self.ok, "BYE", self.invite.cseq + 1);
            let code = self
                .ua
                .transact(&bye, Duration::from_secs(10))
                .map(|o| o.fin.code());
            assert_eq!(code, Some(Some(200)), "BYE through the edge");
        }
    }

    fn edge_to(dest: &Dest, media_ports: &str) -> Edge {
        Edge::start(EdgeConfig {
            tcp: false,
            extra_args: vec!["--media-ports".into(), media_ports.into()],
            // Leg A may use SDES over this loopback UDP signaling.
            extra_toml: format!(
                "[[routes]]\ntarget = \"sip:service@{}\"\nmedia = \"rtp\"\nsdes_over_cleartext = true\n",
                dest.addr
            ),
            ..Default::default()
        })
    }

    /// The strangers: another port of the caller's (and the destination's)
    /// host, and another host.
    fn strangers() -> [Endpoint; 2] {
        [Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.3")]
    }

    /// Every stranger sends `rtp` to the edge's RTP port and an RTCP RR to
    /// its RTCP port, on both legs: 4 packets each.
    fn strangers_send(strangers: &[Endpoint; 2], call: &Call, rtp: &[u8]) {
        for s in strangers {
            for (to_rtp, to_rtcp) in [call.edge_a, call.edge_b] {
                s.rtp.send_to(rtp, to_rtp).unwrap();
                s.rtcp.send_to(&rtcp_rr(SSRC_STRANGER), to_rtcp).unwrap();
            }
        }
    }

    fn assert_strangers_got_nothing(strangers: &[Endpoint; 2], when: &str) {
        for s in strangers {
            let got = s.received();
            assert!(
                got.is_empty(),
                "{when}: a stranger at {} received {} packets from the edge (SSRCs {:x?})",
                s.rtp.local_addr().unwrap(),
                got.len(),
                got.iter().map(|p| ssrc(p)).collect::<Vec<_>>()
            );
        }
    }

    /// What `leg` received within [`QUIET`] is `n` packets, all from `ssrc`.
    fn assert_only_from(leg: &Endpoint, ssrc_want: u32, n: usize, what: &str) -> Vec<Vec<u8>> {
        let got = leg.received();
        let ssrcs: Vec<u32> = got.iter().map(|p| ssrc(p)).collect();
        assert!(
            ssrcs.iter().all(|&s| s == ssrc_want) && got.len() == n,
            "{what}: want {n} packets from SSRC {ssrc_want:x}, got SSRCs {ssrcs:x?} \
             ({:x} is a stranger's)",
            SSRC_STRANGER
        );
        got
    }

    /// RTP bleed on a plain RTP call (CVE-2017-14114 class): strangers on
    /// the caller's host (another port) and on another host send RTP and
    /// RTCP to both of the edge's legs before the call's streams start,
    /// during them and after the caller stopped; they get no packet, and
    /// none of theirs reaches either leg.
    #[test]
    fn rtp_bleed_strangers_before_during_after_get_nothing_and_relay_nothing() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15000-15099");
        let call = Call::place(&edge, &dest, "127.0.0.1", a.ports(), None);
        let strangers = strangers();

        // Before either stream: 16 packets from strangers, all dropped.
        let d0 = dropped(&edge, "source");
        for seq in 0..2 {
            strangers_send(&strangers, &call, &rtp(100 + seq, SSRC_STRANGER));
        }
        await_dropped(&edge, "source", d0, 16.0, "strangers before the streams");
        // B's stream starts first: it reaches A's SDP address, nobody else.
        for seq in 0..3 {
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        b.rtcp.send_to(&rtcp_rr(SSRC_B), call.edge_b.1).unwrap();
        assert_only_from(&a, SSRC_B, 4, "leg A, B's stream first");
        assert_strangers_got_nothing(&strangers, "before A's stream");
        // A's stream: reaches B only.
        for seq in 0..3 {
            a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
        }
        assert_only_from(&b, SSRC_A, 3, "leg B, A's stream");

        // During both streams.
        let d1 = dropped(&edge, "source");
        for seq in 3..6 {
            a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
            strangers_send(&strangers, &call, &rtp(200 + seq, SSRC_STRANGER));
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        a.rtcp.send_to(&rtcp_rr(SSRC_A), call.edge_a.1).unwrap();
        await_dropped(&edge, "source", d1, 24.0, "strangers during the streams");
        assert_only_from(&b, SSRC_A, 4, "leg B during");
        assert_only_from(&a, SSRC_B, 3, "leg A during");
        assert_strangers_got_nothing(&strangers, "during the streams");

        // The caller stopped; B goes on.
        let d2 = dropped(&edge, "source");
        for seq in 6..9 {
            strangers_send(&strangers, &call, &rtp(300 + seq, SSRC_STRANGER));
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        await_dropped(
            &edge,
            "source",
            d2,
            24.0,
            "strangers after the caller stopped",
        );
        assert_only_from(&a, SSRC_B, 3, "leg A after it stopped");
        assert_only_from(&b, SSRC_A, 0, "leg B after A stopped");
        assert_strangers_got_nothing(&strangers, "after the caller stopped");
        call.hang_up();
    }

    /// An answered call from an SRTP caller (its SDP naming `sdp_ip` and
    /// `ports`), and the caller's contexts: what it sends, with its own key,
    /// and what it receives, with the edge's.
    fn srtp_call(
        edge: &Edge,
        dest: &Dest,
        sdp_ip: &str,
        ports: (u16, u16),
    ) -> (Call, Box<dyn SrtpTransform>, Box<dyn SrtpTransform>) {
        let a_key = Crypto {
            tag: 1,
            suite: SUITE,
            keys: SrtpKeys::generate(SUITE).unwrap(),
        };
        let call = Call::place(edge, dest, sdp_ip, ports, Some(&a_key));
        let edge_key = call.edge_key.clone().unwrap();
        let tx = new_context(SUITE, &a_key.keys, Direction::Outbound).unwrap();
        let rx = new_context(SUITE, &edge_key.keys, Direction::Inbound).unwrap();
        (call, tx, rx)
    }

    fn auth_failures(edge: &Edge) -> f64 {
        metric(edge, "tollgate_srtp_auth_failures_total", &[])
    }

    /// RTP bleed through rtcp-mux (RFC 5761): on a muxed caller leg,
    /// strangers send RTP and RTCP to the edge's muxed port and to the RTCP
    /// port it did not advertise, before and during the call's streams;
    /// they get nothing, and leg B gets only the caller's RTP and RTCP.
    #[test]
    fn rtcp_mux_strangers_on_the_muxed_and_the_hidden_rtcp_port_get_nothing() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15400-15499");
        let muxed = a.ports().0;
        let call = Call::place(&edge, &dest, "127.0.0.1", (muxed, muxed), None);
        assert_eq!(call.edge_a.0, call.edge_a.1, "the edge muxes toward A");
        let hidden = SocketAddr::new(call.edge_a.0.ip(), call.edge_a.0.port() + 1);
        let strangers = strangers();
        for (i, seq) in [(0, 1u16), (1, 2)] {
            let what = ["before the streams", "during the streams"][i];
            let d = dropped(&edge, "source");
            // 8 to the muxed port and leg B (RTP and RTCP), 2 to the
            // hidden RTCP port, per stranger.
            strangers_send(&strangers, &call, &rtp(100 + seq, SSRC_STRANGER));
            for s in &strangers {
                s.rtcp.send_to(&rtcp_rr(SSRC_STRANGER), hidden).unwrap();
                s.rtp
                    .send_to(&rtp(200 + seq, SSRC_STRANGER), hidden)
                    .unwrap();
            }
            await_dropped(&edge, "source", d, 12.0, what);
            // B's RTP and RTCP reach A's one port; A's reach B.
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
            b.rtcp.send_to(&rtcp_rr(SSRC_B), call.edge_b.1).unwrap();
            assert_only_from(&a, SSRC_B, 2, what);
            if i == 1 {
                a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
                a.rtp.send_to(&rtcp_rr(SSRC_A), call.edge_a.0).unwrap();
                assert_only_from(&b, SSRC_A, 2, what);
            }
            assert_strangers_got_nothing(&strangers, what);
        }
        call.hang_up();
    }

    fn protect(tx: &mut dyn SrtpTransform, p: BytesMut) -> BytesMut {
        let mut p = p;
        tx.protect_rtp(&mut p).unwrap();
        p
    }

    fn bad_tag(mut p: BytesMut) -> BytesMut {
        let n = p.len();
        p[n - 1] ^= 0x55;
        p
    }

    /// Media hijack on an SRTP leg (CVE-2025-53399 class): strangers on the
    /// caller's host and on another host send properly protected SRTP (a
    /// captured packet sent on from elsewhere) and SRTP with a forged tag,
    /// before the caller's stream, during and after it; none latches, none
    /// is relayed, they get nothing (and they are dropped before
    /// authentication: the SDP address is the caller's signaling host).
    #[test]
    fn srtp_leg_captured_and_forged_packets_from_strangers_never_latch() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15100-15199");
        let (call, mut a_tx, mut a_rx) = srtp_call(&edge, &dest, "127.0.0.1", a.ports());
        let strangers = strangers();
        let auth0 = auth_failures(&edge);

        let mut seq = 0u16;
        let mut phase = |what: &str, caller_talks: bool| {
            let d = dropped(&edge, "source");
            for _ in 0..2 {
                seq += 1;
                // A packet the caller's key protects, but sent by strangers
                // (captured, or replayed ahead of the caller), and a forged one.
                let captured = protect(a_tx.as_mut(), rtp(seq, SSRC_STRANGER));
                let forged = bad_tag(captured.clone());
                for s in &strangers {
                    s.rtp.send_to(&captured, call.edge_a.0).unwrap();
                    s.rtp.send_to(&forged, call.edge_a.0).unwrap();
                }
            }
            await_dropped(&edge, "source", d, 8.0, what);
            if caller_talks {
                seq += 1;
                let p = protect(a_tx.as_mut(), rtp(seq, SSRC_A));
                a.rtp.send_to(&p, call.edge_a.0).unwrap();
                assert_only_from(&b, SSRC_A, 1, what);
            } else {
                assert_only_from(&b, SSRC_A, 0, what);
            }
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
            let got = assert_only_from(&a, SSRC_B, 1, what);
            let mut p = BytesMut::from(&got[0][..]);
            a_rx.unprotect_rtp(&mut p)
                .expect("the caller's SRTP from the edge");
            assert_eq!(p, rtp(seq, SSRC_B), "{what}: B's packet, decrypted");
            assert_strangers_got_nothing(&strangers, what);
        };
        phase("before the caller's stream", false);
        phase("during the caller's stream", true);
        phase("after the caller stopped", false);
        assert_eq!(
            auth_failures(&edge),
            auth0,
            "strangers are dropped before authentication"
        );
        call.hang_up();
    }

    /// A NATed SRTP caller whose SDP names a private address on this host
    /// (127.0.0.9, not its signaling IP 127.0.0.1): a stranger on the
    /// signaling IP sending SRTP with a forged tag must not latch the leg;
    /// until the caller's own authenticated packet latched it the edge
    /// sends the leg nothing (not even to the SDP's private address); then
    /// the call works both ways, and strangers get nothing.
    #[test]
    fn srtp_leg_behind_nat_forged_tag_from_the_signaling_ip_never_latches() {
        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let private = Endpoint::on("127.0.0.9");
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15200-15299");
        let (call, mut a_tx, mut a_rx) = srtp_call(&edge, &dest, "127.0.0.9", private.ports());
        let strangers = strangers();
        let auth = auth_failures;

        // Forged tags from the signaling IP (another port) are authenticated
        // and fail; from another host they are dropped before that.
        let (auth0, d0) = (auth(&edge), dropped(&edge, "source"));
        for seq in 1..=3 {
            let forged = bad_tag(protect(a_tx.as_mut(), rtp(seq, SSRC_STRANGER)));
            for s in &strangers {
                s.rtp.send_to(&forged, call.edge_a.0).unwrap();
            }
        }
        let ok = poll(Duration::from_secs(10), || {
            (auth(&edge) - auth0 >= 3.0).then_some(())
        });
        assert!(
            ok.is_some(),
            "3 forged tags from 127.0.0.1: auth failures {auth0} -> {}",
            auth(&edge)
        );
        await_dropped(&edge, "source", d0, 3.0, "forged tags from 127.0.0.3");
        // B talks: the unlatched NAT leg is sent nothing.
        let u0 = dropped(&edge, "unlatched");
        for seq in 1..=3 {
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
        }
        await_dropped(&edge, "unlatched", u0, 3.0, "B's media before A latched");
        assert_strangers_got_nothing(&strangers, "forged tags");
        assert_only_from(&a, SSRC_B, 0, "leg A before it latched");
        assert_only_from(&private, SSRC_B, 0, "the SDP's private address");

        // The caller's own packet, through its "NAT" (another port than its
        // SDP's, on its signaling IP), latches the leg.
        let p = protect(a_tx.as_mut(), rtp(10, SSRC_A));
        a.rtp.send_to(&p, call.edge_a.0).unwrap();
        assert_only_from(&b, SSRC_A, 1, "leg B, A's first packet");
        b.rtp.send_to(&rtp(10, SSRC_B), call.edge_b.0).unwrap();
        let got = assert_only_from(&a, SSRC_B, 1, "leg A once latched");
        let mut p = BytesMut::from(&got[0][..]);
        a_rx.unprotect_rtp(&mut p).expect("SRTP from the edge");
        assert_eq!(p, rtp(10, SSRC_B));
        // Now even a correctly protected packet from the signaling IP's
        // other port is a stranger's.
        let d1 = dropped(&edge, "source");
        let captured = protect(a_tx.as_mut(), rtp(11, SSRC_STRANGER));
        for s in &strangers {
            s.rtp.send_to(&captured, call.edge_a.0).unwrap();
        }
        await_dropped(&edge, "source", d1, 2.0, "strangers after the latch");
        b.rtp.send_to(&rtp(12, SSRC_B), call.edge_b.0).unwrap();
        assert_only_from(&a, SSRC_B, 1, "leg A after strangers");
        assert_only_from(&b, SSRC_A, 0, "leg B after strangers");
        assert_strangers_got_nothing(&strangers, "after the latch");
        assert_only_from(&private, SSRC_B, 0, "the SDP's private address, at the end");
        call.hang_up();
    }

    /// Set in the inner run of [`nat_caller_with_a_private_sdp_address_talks_both_ways`].
    const INNER: &str = "TOLLGATE_TEST_IN_NETNS";

    /// NAT: a caller whose SDP says `c=IN IP4 10.0.0.7` but whose packets
    /// come from its signaling address (127.0.0.1, another port) gets a
    /// working call both ways, and the edge never sends to 10.0.0.7.
    ///
    /// A bug here would send packets to 10.0.0.7, so the test runs itself
    /// again inside a fresh network namespace (`unshare -n`) where only
    /// loopback exists: nothing sent to 10.0.0.7 can leave the machine
    /// (there is no route; the inner run checks that first).
    #[test]
    fn nat_caller_with_a_private_sdp_address_talks_both_ways() {
        if std::env::var_os(INNER).is_none() {
            let name = "nat_caller_with_a_private_sdp_address_talks_both_ways";
            let path = module_path!()
                .split_once("::")
                .map_or(String::new(), |(_, m)| format!("{m}::{name}"));
            let out = std::process::Command::new("unshare")
                .arg("-n")
                .arg(std::env::current_exe().unwrap())
                .args(["--exact", &path, "--nocapture", "--test-threads=1"])
                .env(INNER, "1")
                .output()
                .expect("run unshare -n (needs root or user namespaces)");
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && text.contains("1 passed"),
                "inner run in a network namespace failed ({}):\n{text}",
                out.status
            );
            return;
        }
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(up.success(), "ip link set lo up");
        // No route off loopback here (connect() on UDP sends nothing).
        let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
        assert!(
            probe.connect("10.0.0.7:4000").is_err(),
            "10.0.0.7 is reachable from this namespace: refusing to run"
        );

        let (a, b) = (Endpoint::on("127.0.0.1"), Endpoint::on("127.0.0.1"));
        let dest = Dest::start(b.ports().0, b.ports().1);
        let edge = edge_to(&dest, "15300-15399");
        let call = Call::place(&edge, &dest, "10.0.0.7", (4000, 4001), None);
        assert_eq!(call.edge_a.0.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        // B first: nothing goes to the NAT leg yet (not to 10.0.0.7).
        let (u0, s0) = (dropped(&edge, "unlatched"), dropped(&edge, "send"));
        b.rtp.send_to(&rtp(1, SSRC_B), call.edge_b.0).unwrap();
        await_dropped(&edge, "unlatched", u0, 1.0, "B's media before A latched");
        // The caller talks from 127.0.0.1 (its NAT's port): both ways work.
        for seq in 2..6 {
            a.rtp.send_to(&rtp(seq, SSRC_A), call.edge_a.0).unwrap();
            assert_only_from(&b, SSRC_A, 1, "leg B hears the NATed caller");
            b.rtp.send_to(&rtp(seq, SSRC_B), call.edge_b.0).unwrap();
            assert_only_from(&a, SSRC_B, 1, "the NATed caller hears B");
        }
        a.rtcp.send_to(&rtcp_rr(SSRC_A), call.edge_a.1).unwrap();
        assert_only_from(&b, SSRC_A, 1, "leg B gets the NATed caller's RTCP");
        b.rtcp.send_to(&rtcp_rr(SSRC_B), call.edge_b.1).unwrap();
        assert_only_from(&a, SSRC_B, 1, "the NATed caller gets B's RTCP");
        // A stranger on another host cannot take the latch.
        let d0 = dropped(&edge, "source");
        let s = Endpoint::on("127.0.0.3");
        s.rtp
            .send_to(&rtp(7, SSRC_STRANGER), call.edge_a.0)
            .unwrap();
        await_dropped(&edge, "source", d0, 1.0, "a stranger after the latch");
        b.rtp.send_to(&rtp(8, SSRC_B), call.edge_b.0).unwrap();
        assert_only_from(&a, SSRC_B, 1, "the NATed caller after the stranger");
        assert!(s.received().is_empty(), "the stranger got nothing");
        assert_eq!(
            dropped(&edge, "send"),
            s0,
            "no send failed (a send to 10.0.0.7 would fail here: no route)"
        );
        call.hang_up();
    }
}
