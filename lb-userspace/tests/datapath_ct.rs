//! Datapath tests (root): the real TC program run with `BPF_PROG_TEST_RUN` on
//! crafted IPv4/IPv6 frames (see `support::prog_test` and `support::frames`).
//!
//! This file: the life of a conntrack entry (issue 9, items 4 to 6). Two
//! frontends reached from one client port keep a reply entry each; a
//! closing flow stays closing; a flow keeps its SNAT port when its service
//! entry goes first; an unanswered TCP flow lives 60 s; segments that cannot
//! open a connection create no state; a SYN flood larger than the maps
//! does not evict answered flows; a direct connection to a backend from
//! the port of a closing flow to it ends that flow; source NAT keeps a
//! lately closed flow's tuple from new flows for the backend's
//! `TIME_WAIT`, and gives a flow unconfirmed for a second's to a new flow
//! that has no other. Time is moved by rewriting the entries' `last_seen_ns` in
//! the pinned maps.

mod support;

use std::net::SocketAddr;

use lb_common::{ct_dir, limits};
use lb_userspace::datapath::loader::Capacities;
use lb_userspace::model::{Frontend, FrontendKind, Protocol};

use support::frames::{
    Frame, SCTP_INIT, SCTP_INIT_ACK, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, verify_checksums,
};
use support::prog_test::{
    BACKENDS4, BACKENDS6, CtView, Fixture, NODE4, NODE6, TC_ACT_OK, TC_ACT_SHOT, VIP4, VIP6, addrs,
    frontend, node_config, refused, snat_candidate, spec, translated,
};

/// The families: service address, a second service address, client, backend.
const FAMILIES: [(&str, &str, &str, &str); 2] = [
    (VIP4, "198.19.0.11", "198.18.1.2", BACKENDS4[0]),
    (VIP6, "fd00:96::11", "fd00:1::2", BACKENDS6[0]),
];

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The first packet of a flow from `client` to `frontend`: a SYN, or a
/// datagram.
fn first(client: SocketAddr, frontend: &Frontend) -> Frame {
    let dst = SocketAddr::new(frontend.addr, frontend.port).to_string();
    match frontend.proto {
        Protocol::Tcp => Frame::tcp(&client.to_string(), &dst, TCP_SYN),
        Protocol::Udp => Frame::udp(&client.to_string(), &dst),
        Protocol::Sctp => Frame::sctp(&client.to_string(), &dst, SCTP_INIT),
    }
}

/// `frame` with other TCP flags.
fn flags(frame: &Frame, tcp_flags: u8) -> Frame {
    let mut frame = frame.clone();
    frame.tcp_flags = tcp_flags;
    frame
}

/// Runs `frame` (from a client); asserts it went to `backend` and returns
/// the source it got there (the client's own, or a NAT address and port).
fn to_backend(fx: &mut Fixture, frame: &Frame, backend: SocketAddr, what: &str) -> SocketAddr {
    let (verdict, out) = fx.run(&frame.bytes());
    assert_eq!(verdict, TC_ACT_OK, "{what}: not translated");
    let (src, dst) = verify_checksums(&out);
    assert_eq!(dst, backend, "{what}: backend");
    assert_eq!(
        out,
        frame.with_dst(backend).with_src(src).bytes(),
        "{what}: only the addresses and ports changed"
    );
    src
}

/// Runs the backend's answer `reply` (from the backend to `seen`, the
/// source the backend saw); asserts the client got it from `service` at
/// `client`.
fn reply_restored(
    fx: &mut Fixture,
    reply: &Frame,
    service: SocketAddr,
    client: SocketAddr,
    what: &str,
) {
    let (verdict, out) = fx.run(&reply.bytes());
    assert_eq!(verdict, TC_ACT_OK, "{what}: reply not translated");
    assert_eq!(verify_checksums(&out), (service, client), "{what}: reply");
    assert_eq!(
        out,
        reply.with_src(service).with_dst(client).bytes(),
        "{what}: reply bytes"
    );
}

/// The answer of `backend` to `seen`: a SYN+ACK, or a datagram.
fn answer(backend: SocketAddr, seen: SocketAddr, proto: Protocol) -> Frame {
    match proto {
        Protocol::Tcp => Frame::tcp(&backend.to_string(), &seen.to_string(), TCP_SYN | TCP_ACK),
        Protocol::Udp => Frame::udp(&backend.to_string(), &seen.to_string()),
        Protocol::Sctp => Frame::sctp(&backend.to_string(), &seen.to_string(), SCTP_INIT_ACK),
    }
}

/// Every conntrack entry (any map, any direction).
fn any(_: &CtView) -> bool {
    true
}

/// Item 4: one client port reaching one backend through two frontends
/// (a `ClusterIP` and a second address of the Service): both flows keep a
/// reply entry, the second one by a remapped source port, and each reply
/// comes back from its own frontend to the client's own port.
#[test]
fn two_frontends_one_client_port_coexist_and_both_replies_are_restored() {
    let Some(mut fx) = Fixture::new("two_frontends_one_client_port_coexist") else {
        return;
    };
    for (vip, vip2, client, backend) in FAMILIES {
        let backend: SocketAddr = backend.parse().unwrap();
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let what = format!("{vip} {proto}");
            let (a, b) = (frontend(vip, 80, proto), frontend(vip2, 80, proto));
            // The backend is on this node, so external traffic keeps its
            // source (no node SNAT hides the clash).
            let mut local = spec(FrontendKind::LoadBalancer, &[backend]);
            local.backends[0].node_local = true;
            fx.set_specs(&[(a, spec(FrontendKind::ClusterIp, &[backend])), (b, local)]);
            let client = sock(client, 45000);
            let to_a = first(client, &a);
            let seen_a = to_backend(&mut fx, &to_a, backend, &format!("{what}: A"));
            assert_eq!(seen_a, client, "{what}: A keeps the client's source");
            let to_b = first(client, &b);
            let seen_b = to_backend(&mut fx, &to_b, backend, &format!("{what}: B"));
            assert_eq!(
                seen_b.ip(),
                client.ip(),
                "{what}: B keeps the client address"
            );
            assert_ne!(seen_b.port(), client.port(), "{what}: B's port is remapped");
            let reply_entries = fx
                .conntrack()
                .iter()
                .filter(|r| r.direction == "reply" && r.source == backend)
                .count();
            assert_eq!(reply_entries, 2, "{what}: a reply entry per flow");
            // Each reply comes back from its own frontend, to the client's
            // own port; in either order, several times.
            for _ in 0..2 {
                let from_a = answer(backend, seen_a, proto);
                reply_restored(&mut fx, &from_a, to_a.dst, client, &format!("{what}: A"));
                let from_b = answer(backend, seen_b, proto);
                reply_restored(&mut fx, &from_b, to_b.dst, client, &format!("{what}: B"));
            }
            // The flows go on where they are.
            let data = if proto == Protocol::Tcp {
                TCP_ACK | TCP_PSH
            } else {
                0
            };
            let again = to_backend(&mut fx, &flags(&to_b, data), backend, &what);
            assert_eq!(again, seen_b, "{what}: B's flow kept its port");
            let again = to_backend(&mut fx, &flags(&to_a, data), backend, &what);
            assert_eq!(again, seen_a, "{what}: A's flow kept its source");
            fx.set_specs(&[]);
            fx.edit_conntrack(&any, &|_| None);
            fx.edit_conntrack(&any, &|_| None);
        }
    }
}

/// Item 5: a FIN from the server marks both entries closing at once, and
/// the client's packets, which refresh the reply entry about once a
/// second, keep it closing (the old refresh rebuilt it without flags and
/// held the tuple for 6 h).
#[test]
fn closing_flag_is_sticky_on_both_entries_across_a_refresh() {
    let Some(mut fx) = Fixture::new("closing_flag_is_sticky_on_both_entries") else {
        return;
    };
    for (vip, _, client, backend) in FAMILIES {
        let backend: SocketAddr = backend.parse().unwrap();
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &[backend]))]);
        let client = sock(client, 46000);
        let syn = first(client, &fe);
        to_backend(&mut fx, &syn, backend, vip);
        reply_restored(
            &mut fx,
            &answer(backend, client, Protocol::Tcp),
            syn.dst,
            client,
            vip,
        );
        let ack = flags(&syn, TCP_ACK);
        to_backend(&mut fx, &ack, backend, vip);
        let of_flow = |r: &lb_userspace::datapath::maps::CtRecord| {
            (r.direction == "service" && r.source == client)
                || (r.direction == "reply" && r.destination == client)
        };
        let states = |fx: &Fixture| -> Vec<(&'static str, bool, bool)> {
            fx.conntrack()
                .iter()
                .filter(|r| of_flow(r))
                .map(|r| (r.direction, r.answered, r.closing))
                .collect()
        };
        assert_eq!(
            states(&fx),
            [("service", true, false), ("reply", true, false)],
            "{vip}: both entries answered, open"
        );
        // The server closes.
        let fin = Frame::tcp(&backend.to_string(), &client.to_string(), TCP_FIN | TCP_ACK);
        reply_restored(&mut fx, &fin, syn.dst, client, vip);
        assert_eq!(
            states(&fx),
            [("service", true, true), ("reply", true, true)],
            "{vip}: a FIN from the server marks both entries"
        );
        // A second later the client's ACK refreshes the reply entry.
        let aged = fx.age_conntrack(&any, 2);
        assert!(aged >= 2, "{vip}: {aged} entries aged");
        to_backend(&mut fx, &ack, backend, vip);
        assert_eq!(
            states(&fx),
            [("service", true, true), ("reply", true, true)],
            "{vip}: the refresh kept the closing flag"
        );
        // The client reuses its port at once: a bare SYN starts a new flow,
        // unanswered until the SYN+ACK, then open, not closing.
        let new_flows = fx.reason("nat_new");
        to_backend(&mut fx, &syn, backend, vip);
        assert_eq!(fx.reason("nat_new"), new_flows + 1, "{vip}: port reuse");
        assert_eq!(
            states(&fx),
            [("service", false, false), ("reply", false, false)],
            "{vip}: the reused port's flow waits for its answer, nothing of the old one left"
        );
        reply_restored(
            &mut fx,
            &answer(backend, client, Protocol::Tcp),
            syn.dst,
            client,
            vip,
        );
        assert_eq!(
            states(&fx),
            [("service", false, false), ("reply", false, false)],
            "{vip}: answered, but not established before the client's ACK"
        );
        to_backend(&mut fx, &ack, backend, vip);
        assert_eq!(
            states(&fx),
            [("service", true, false), ("reply", true, false)],
            "{vip}: the new flow is established and open"
        );
        reply_restored(&mut fx, &fin, syn.dst, client, vip);
        // Closing entries live 10 s: after that the client's segment
        // belongs to no flow (a reset) and the backend's to none either.
        fx.age_conntrack(&any, 11);
        refused(&mut fx, &ack, &format!("{vip}: after the closing timeout"));
        let (verdict, out) = fx.run(&fin.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out,
            fin.bytes(),
            "{vip}: a dead flow's reply is not translated"
        );
        fx.set_specs(&[]);
        fx.edit_conntrack(&any, &|_| None);
    }
}

/// A client reusing the port of a closing Service flow for a direct
/// connection to the same backend (no Service involved; found by
/// `lb-bench socklb`): its SYN ends the old flow, in whichever map it is,
/// so the backend's SYN+ACK and what follows reach the client untouched
/// instead of coming back from the Service. A dry run of that SYN changes
/// nothing; a live flow on the tuple is left alone and goes on (README
/// "Known deviations").
#[test]
fn direct_syn_reusing_a_closing_flows_port_ends_it() {
    let Some(mut fx) = Fixture::new("direct_syn_reusing_a_closing_flows_port") else {
        return;
    };
    for (vip, _, client, backend) in FAMILIES {
        let backend: SocketAddr = backend.parse().unwrap();
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &[backend]))]);
        let client = sock(client, 48000);
        let syn = first(client, &fe);
        let states = |fx: &Fixture| -> Vec<(&'static str, bool, bool)> {
            fx.conntrack()
                .iter()
                .filter(|r| {
                    (r.direction == "service" && r.source == client)
                        || (r.direction == "reply" && r.destination == client)
                })
                .map(|r| (r.direction, r.answered, r.closing))
                .collect()
        };
        let untouched = |fx: &mut Fixture, frame: &Frame, what: &str| {
            let (verdict, out) = fx.run(&frame.bytes());
            assert_eq!(verdict, TC_ACT_OK, "{vip}: {what}: verdict");
            assert_eq!(out, frame.bytes(), "{vip}: {what}: not translated");
        };
        let (c, b) = (client.to_string(), backend.to_string());
        let direct = Frame::tcp(&c, &b, TCP_SYN);
        let direct_answer = Frame::tcp(&b, &c, TCP_SYN | TCP_ACK);
        let direct_data = Frame::tcp(&b, &c, TCP_ACK | TCP_PSH);

        // A live flow: the direct SYN clashes with it at the backend (one
        // tuple there); the flow keeps its entries and goes on.
        to_backend(&mut fx, &syn, backend, vip);
        reply_restored(&mut fx, &direct_answer, syn.dst, client, vip);
        to_backend(&mut fx, &flags(&syn, TCP_ACK), backend, vip);
        let open = [("service", true, false), ("reply", true, false)];
        assert_eq!(states(&fx), open, "{vip}: established");
        untouched(&mut fx, &direct, "a direct SYN on a live flow's tuple");
        assert_eq!(states(&fx), open, "{vip}: the live flow is left alone");
        to_backend(&mut fx, &flags(&syn, TCP_ACK | TCP_PSH), backend, vip);
        reply_restored(&mut fx, &direct_data, syn.dst, client, vip);

        // The client closes; a dry run of the direct SYN changes nothing.
        to_backend(&mut fx, &flags(&syn, TCP_FIN | TCP_ACK), backend, vip);
        let closing = [("service", true, true), ("reply", true, true)];
        assert_eq!(states(&fx), closing, "{vip}: closing");
        let (verdict, out) = fx.run_dry(&direct.bytes());
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, direct.bytes()),
            "{vip}: dry run"
        );
        assert_eq!(states(&fx), closing, "{vip}: a dry run deletes nothing");

        // The direct SYN ends the closing flow (main map): its answer and
        // the data after it are not translated, and no entry comes back.
        let passed = fx.reason("pass_no_service");
        untouched(&mut fx, &direct, "a direct SYN on a closing flow's tuple");
        assert_eq!(fx.reason("pass_no_service"), passed + 1, "{vip}: passed");
        assert_eq!(states(&fx), [], "{vip}: the old flow's entries are gone");
        untouched(&mut fx, &direct_answer, "the direct connection's SYN+ACK");
        untouched(&mut fx, &flags(&direct, TCP_ACK), "the client's ACK");
        untouched(&mut fx, &direct_data, "the backend's data");
        assert_eq!(states(&fx), [], "{vip}: no entry for the direct connection");

        // A flow the backend refused (its RST) is closing in the map of
        // new flows: the direct SYN ends it there.
        to_backend(&mut fx, &syn, backend, vip);
        let reset = Frame::tcp(&b, &c, TCP_RST | TCP_ACK);
        reply_restored(&mut fx, &reset, syn.dst, client, vip);
        let refused_flow = [("service", false, true), ("reply", false, true)];
        assert_eq!(states(&fx), refused_flow, "{vip}: refused, closing");
        untouched(&mut fx, &direct, "a direct SYN on a refused flow's tuple");
        assert_eq!(
            states(&fx),
            [],
            "{vip}: the refused flow's entries are gone"
        );
        untouched(&mut fx, &direct_answer, "the direct connection's SYN+ACK");
        fx.set_specs(&[]);
        fx.edit_conntrack(&any, &|_| None);
    }
}

/// Item 5: a flow source-NATed to the node keeps its port when its service
/// entry goes first (evicted, expired): the next datagram, or a SYN
/// retransmitted before the answer, finds the same candidate port held by
/// its own reply entry and takes it again.
#[test]
fn snat_port_stays_with_its_flow_after_the_service_entry_is_gone() {
    let Some(mut fx) = Fixture::new("snat_port_stays_with_its_flow") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for ((node, _, client, backend), node_addr) in FAMILIES.iter().zip([NODE4, NODE6]) {
        let backend: SocketAddr = backend.parse().unwrap();
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let what = format!("{node} {proto}");
            let fe = frontend(node_addr, 30080, proto);
            fx.set_specs(&[(fe, spec(FrontendKind::NodePort, &[backend]))]);
            let client = sock(client, 47000);
            let syn = first(client, &fe);
            let seen = to_backend(&mut fx, &syn, backend, &what);
            assert_eq!(seen.ip(), fe.addr, "{what}: source NAT to the node");
            if proto == Protocol::Udp {
                // Answered: the flow is in the main map.
                let reply = answer(backend, seen, proto);
                reply_restored(&mut fx, &reply, syn.dst, client, &what);
            }
            // The service entry goes (an eviction).
            let gone = fx
                .edit_conntrack(&|v| v.dir == ct_dir::SERVICE && v.source == client, &|_| {
                    None
                });
            assert_eq!(gone, 1, "{what}: the service entry");
            // UDP: the next datagram; TCP: the SYN again (retransmitted).
            let again = to_backend(&mut fx, &syn, backend, &format!("{what}: again"));
            assert_eq!(again, seen, "{what}: the flow got another SNAT port");
            let reply = answer(backend, seen, proto);
            reply_restored(&mut fx, &reply, syn.dst, client, &format!("{what}: again"));
            let entries = fx
                .conntrack()
                .iter()
                .filter(|r| r.source == client || r.destination == seen)
                .count();
            assert_eq!(entries, 2, "{what}: one service and one reply entry");
            fx.set_specs(&[]);
            fx.edit_conntrack(&any, &|_| None);
            fx.edit_conntrack(&any, &|_| None);
        }
    }
}

/// A client, other than those in `used`, whose first source NAT candidate
/// to `np` is `port` (addresses after `near`'s, same family).
fn client_with_first_candidate(
    seed: u32,
    near: SocketAddr,
    np: SocketAddr,
    port: u16,
    used: &[SocketAddr],
) -> SocketAddr {
    let hosts = (1..=64u8).map(|host| match near.ip() {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            std::net::IpAddr::from([a, b, c, host])
        }
        std::net::IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[15] = host;
            std::net::IpAddr::from(octets)
        }
    });
    hosts
        .flat_map(|ip| (1024..=u16::MAX).map(move |p| SocketAddr::new(ip, p)))
        .find(|c| !used.contains(c) && snat_candidate(seed, *c, np, 0) == port)
        .expect("a client with that first candidate")
}

/// A TCP connection from `client` through the `NodePort` `fe` to
/// `backend`, source-NATed to the node: handshake, then both FINs and the
/// last ACK. Returns the source the backend saw.
fn connect_and_close(
    fx: &mut Fixture,
    client: SocketAddr,
    fe: &Frontend,
    backend: SocketAddr,
    what: &str,
) -> SocketAddr {
    let syn = first(client, fe);
    let seen = to_backend(fx, &syn, backend, what);
    reply_restored(
        fx,
        &answer(backend, seen, Protocol::Tcp),
        syn.dst,
        client,
        what,
    );
    to_backend(fx, &flags(&syn, TCP_ACK), backend, what);
    to_backend(fx, &flags(&syn, TCP_FIN | TCP_ACK), backend, what);
    let fin = Frame::tcp(&backend.to_string(), &seen.to_string(), TCP_FIN | TCP_ACK);
    reply_restored(fx, &fin, syn.dst, client, what);
    to_backend(fx, &flags(&syn, TCP_ACK), backend, what);
    seen
}

/// Issue 13 (new TCP connections/s through a `NodePort` at a third of the
/// direct path's, ~0.6% of them 1 s late): source NAT does not give the
/// tuple of a flow that closed less than 66 s ago to a new flow. The
/// backend holds that tuple in `TIME_WAIT`; the new connection's SYN
/// carries timestamps of another clock (Linux offsets them per 4-tuple),
/// PAWS answers it with a bare ACK instead of a SYN+ACK half of the time,
/// and the client retransmits 1 s later. The new flow takes its next
/// candidate; after `TIME_WAIT` the tuple is free again; when none of a
/// flow's candidates is free, a lately closed one is still taken (as
/// before, rather than a drop).
#[test]
fn snat_keeps_a_lately_closed_tuple_from_new_flows() {
    let Some(mut fx) = Fixture::new("snat_keeps_a_lately_closed_tuple") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    // A fixed seed: the candidates below are then the same every run (none
    // of them a `NodePort`, which source NAT skips).
    let seed = 0x5eed_0013;
    fx.set_snat_seed(seed);
    for ((_, _, client, backend), node_addr) in FAMILIES.iter().zip([NODE4, NODE6]) {
        let backend: SocketAddr = backend.parse().unwrap();
        let fe = frontend(node_addr, 30080, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::NodePort, &[backend]))]);
        let np = SocketAddr::new(fe.addr, fe.port);
        let a = sock(client, 46000);
        let what = format!("{node_addr} A");
        let seen_a = connect_and_close(&mut fx, a, &fe, backend, &what);
        assert_eq!(seen_a.ip(), fe.addr, "{what}: source NAT to the node");
        let port = seen_a.port();
        assert_eq!(
            port,
            snat_candidate(seed, a, np, 0),
            "{what}: the test's replica of the candidates is the datapath's"
        );

        // 60 s later (the backend's TIME_WAIT, whose timer may fire 4 s
        // late), B, whose first candidate is A's closed tuple, gets its
        // second.
        fx.age_conntrack(&any, 60);
        let b = client_with_first_candidate(seed, a, np, port, &[a]);
        let what = format!("{node_addr} B {b}");
        let seen_b = to_backend(&mut fx, &first(b, &fe), backend, &what);
        assert_ne!(
            seen_b.port(),
            port,
            "{what}: got the tuple the backend holds in TIME_WAIT"
        );
        assert_eq!(seen_b.port(), snat_candidate(seed, b, np, 1), "{what}");
        // A reopening its own port is a new connection too. (A first
        // candidate decides the whole sequence: B holds A's second.)
        let what = format!("{node_addr} A again");
        let again = to_backend(&mut fx, &first(a, &fe), backend, &what);
        assert_eq!(again.port(), snat_candidate(seed, a, np, 2), "{what}");

        // 67 s after A closed the backend's TIME_WAIT is over: C, whose
        // first candidate it is too, gets it.
        fx.edit_conntrack(&|v| v.source == a || v.destination == again, &|_| None);
        fx.edit_conntrack(&|v| v.source == b || v.destination == seen_b, &|_| None);
        fx.age_conntrack(&any, 7);
        let c = client_with_first_candidate(seed, a, np, port, &[a, b]);
        let what = format!("{node_addr} C {c}");
        let seen_c = connect_and_close(&mut fx, c, &fe, backend, &what);
        assert_eq!(seen_c.port(), port, "{what}: free after TIME_WAIT");

        // D: C's tuple closed just now, all of D's other candidates are
        // held by live flows: D still gets C's tuple.
        let d = client_with_first_candidate(seed, a, np, port, &[a, b, c]);
        let mut used = vec![a, b, c, d];
        for attempt in 1..32 {
            let held = snat_candidate(seed, d, np, attempt);
            let holder = client_with_first_candidate(seed, a, np, held, &used);
            used.push(holder);
            let what = format!("{node_addr} holder of candidate {attempt}");
            let source = to_backend(&mut fx, &first(holder, &fe), backend, &what);
            assert_eq!(source.port(), held, "{what}");
        }
        let what = format!("{node_addr} D {d}");
        let took = took_unconfirmed(&fx);
        let seen_d = to_backend(&mut fx, &first(d, &fe), backend, &what);
        assert_eq!(
            seen_d.port(),
            port,
            "{what}: no free candidate: the closed one"
        );
        assert_eq!(took_unconfirmed(&fx), took, "{what}: no flow ended");
        fx.set_specs(&[]);
        fx.edit_conntrack(&any, &|_| None);
        fx.edit_conntrack(&any, &|_| None);
    }
}

/// A spoofed SYN flood through a `NodePort` held a source port per
/// flooded flow for a minute and left new connections none
/// (`harness_lifecycle_flood` failed on a faster machine): source NAT now
/// gives a new flow none of whose candidates is free the tuple of a TCP
/// flow its client has not confirmed for a second
/// (`ct_timeout::TCP_UNCONFIRMED_HOLD_NS`), answered by the backend or
/// not, and that flow ends: its entries go, so that a late segment of its
/// client is refused rather than sent on the new flow's tuple; each take
/// is counted (`snat_took_unconfirmed`). A younger unconfirmed flow keeps
/// its tuple (the new flow is dropped, as before), and so does a confirmed
/// one (two seconds old here).
#[test]
fn snat_takes_the_tuple_of_a_flow_unconfirmed_for_a_second() {
    let Some(mut fx) = Fixture::new("snat_takes_unconfirmed_tuple") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    let snat_seed = 0x5eed_0014;
    fx.set_snat_seed(snat_seed);
    for ((_, _, client, backend), node_addr) in FAMILIES.iter().zip([NODE4, NODE6]) {
        let backend: SocketAddr = backend.parse().unwrap();
        let fe = frontend(node_addr, 30080, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::NodePort, &[backend]))]);
        let np = SocketAddr::new(fe.addr, fe.port);
        let d = sock(client, 47000);
        // Each of D's 32 candidates held by a flow of its own: the first
        // confirmed (SYN, SYN+ACK, ACK), the second answered by the
        // backend but never confirmed (a spoofed SYN's fate), the rest
        // unanswered.
        let mut holders = Vec::new();
        for attempt in 0..32 {
            let held = snat_candidate(snat_seed, d, np, attempt);
            let holder = client_with_first_candidate(snat_seed, d, np, held, &holders);
            let what = format!("{node_addr} holder of candidate {attempt}");
            let syn = first(holder, &fe);
            let seen = to_backend(&mut fx, &syn, backend, &what);
            assert_eq!(seen.port(), held, "{what}");
            if attempt < 2 {
                let syn_ack = answer(backend, seen, Protocol::Tcp);
                reply_restored(&mut fx, &syn_ack, np, holder, &what);
            }
            if attempt == 0 {
                to_backend(&mut fx, &flags(&syn, TCP_ACK), backend, &what);
            }
            holders.push(holder);
        }
        let entries_of =
            |fx: &Fixture, client: SocketAddr| fx.edit_conntrack(&|v| v.source == client, &Some);

        // Just opened: none is taken, D is dropped.
        let exhausted = fx.reason("drop_snat_exhausted");
        let took = took_unconfirmed(&fx);
        let (verdict, _) = fx.run(&first(d, &fe).bytes());
        assert_eq!(verdict, TC_ACT_SHOT, "{node_addr} D: dropped");
        assert_eq!(fx.reason("drop_snat_exhausted"), exhausted + 1);
        assert_eq!(took_unconfirmed(&fx), took, "{node_addr} D: nothing taken");

        // Two seconds later D gets its second candidate: the first is the
        // confirmed flow's.
        fx.age_conntrack(&any, 2);
        let what = format!("{node_addr} D {d}");
        let seen_d = to_backend(&mut fx, &first(d, &fe), backend, &what);
        assert_eq!(seen_d.port(), snat_candidate(snat_seed, d, np, 1), "{what}");
        assert_eq!(fx.reason("drop_snat_exhausted"), exhausted + 1, "{what}");
        assert_eq!(took_unconfirmed(&fx), took + 1, "{what}: counted once");
        reply_restored(
            &mut fx,
            &answer(backend, seen_d, Protocol::Tcp),
            np,
            d,
            &what,
        );
        assert_eq!(entries_of(&fx, holders[1]), 0, "{what}: holder 1 ended");
        assert_eq!(entries_of(&fx, holders[0]), 1, "{what}: confirmed kept");
        assert_eq!(entries_of(&fx, holders[2]), 1, "{what}: others kept");
        // The ended flow's late ACK opens nothing and does not reach the
        // backend on D's tuple: it is refused.
        let rejected = fx.reason("reject_no_flow");
        let late_ack = flags(&first(holders[1], &fe), TCP_ACK);
        refused(&mut fx, &late_ack, &format!("{what}: holder 1's late ACK"));
        assert_eq!(fx.reason("reject_no_flow"), rejected + 1, "{what}");
        // The confirmed flow goes on, on its own tuple.
        let what = format!("{node_addr} holder 0");
        let seen = to_backend(
            &mut fx,
            &flags(&first(holders[0], &fe), TCP_ACK),
            backend,
            &what,
        );
        assert_eq!(seen.port(), snat_candidate(snat_seed, d, np, 0), "{what}");
        // E has D's candidates (a first candidate decides them all): the
        // first is confirmed, the second D's young flow, the third an
        // unanswered flow two seconds old, which E takes.
        let mut used = holders.clone();
        used.push(d);
        let e = client_with_first_candidate(
            snat_seed,
            d,
            np,
            snat_candidate(snat_seed, d, np, 0),
            &used,
        );
        let what = format!("{node_addr} E {e}");
        let seen_e = to_backend(&mut fx, &first(e, &fe), backend, &what);
        assert_eq!(seen_e.port(), snat_candidate(snat_seed, d, np, 2), "{what}");
        assert_eq!(took_unconfirmed(&fx), took + 2, "{what}: counted");
        assert_eq!(entries_of(&fx, holders[2]), 0, "{what}: holder 2 ended");
        assert_eq!(entries_of(&fx, d), 1, "{what}: D kept");
        fx.set_specs(&[]);
        fx.edit_conntrack(&any, &|_| None);
    }
}

/// The `snat_took_unconfirmed` event counter.
fn took_unconfirmed(fx: &Fixture) -> u64 {
    let events = fx.maps.event_counts().expect("events");
    let found = events
        .iter()
        .find(|(name, _)| *name == "snat_took_unconfirmed");
    found.expect("the event is counted").1
}

/// Item 6: a TCP flow the backend has not answered lives 60 s after its
/// last packet; then its segments belong to no flow and its entries are
/// not used (the old program kept it 6 h).
#[test]
fn unanswered_tcp_flow_expires_after_60_seconds() {
    let Some(mut fx) = Fixture::new("unanswered_tcp_flow_expires_after_60_seconds") else {
        return;
    };
    for (vip, _, client, backend) in FAMILIES {
        let backend: SocketAddr = backend.parse().unwrap();
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &[backend]))]);
        let client = sock(client, 48000);
        let syn = first(client, &fe);
        to_backend(&mut fx, &syn, backend, vip);
        let records = fx.conntrack();
        assert!(
            records.iter().all(|r| !r.answered) && records.len() == 2,
            "{vip}: a SYN-only flow's two entries wait in the map of new flows: {records:?}"
        );
        // 59 s later the flow is still there.
        fx.age_conntrack(&any, 59);
        let ack = flags(&syn, TCP_ACK);
        translated(&mut fx, &ack, &format!("{vip}: at 59 s"));
        // 61 s after its last packet it is gone.
        fx.age_conntrack(&any, 61);
        refused(&mut fx, &ack, &format!("{vip}: at 61 s"));
        let late = answer(backend, client, Protocol::Tcp);
        let (verdict, out) = fx.run(&late.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, late.bytes(), "{vip}: a late SYN+ACK is not translated");
        // A new SYN starts a new flow.
        translated(&mut fx, &syn, &format!("{vip}: new SYN"));
        fx.set_specs(&[]);
        fx.edit_conntrack(&any, &|_| None);
    }
}

/// Item 6: a segment that cannot open a connection creates no state: an
/// ACK, a FIN or data is answered with a reset, a RST is dropped (a reset
/// is never answered), a SYN+ACK is answered with a reset too.
#[test]
fn stray_segments_create_no_entries() {
    let Some(mut fx) = Fixture::new("stray_segments_create_no_entries") else {
        return;
    };
    for (vip, _, client, backend) in FAMILIES {
        let backend: SocketAddr = backend.parse().unwrap();
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &[backend]))]);
        let syn = first(sock(client, 49000), &fe);
        let before = fx.reason("reject_no_flow");
        for (n, stray) in [
            TCP_ACK,
            TCP_ACK | TCP_PSH,
            TCP_FIN | TCP_ACK,
            TCP_SYN | TCP_ACK,
        ]
        .into_iter()
        .enumerate()
        {
            refused(
                &mut fx,
                &flags(&syn, stray),
                &format!("{vip}: flags {stray:#x}"),
            );
            assert_eq!(fx.reason("reject_no_flow"), before + n as u64 + 1);
        }
        let resets = fx.reason("drop_reset_unanswered");
        for rst in [TCP_RST, TCP_RST | TCP_ACK] {
            let (verdict, _) = fx.run(&flags(&syn, rst).bytes());
            assert_eq!(verdict, TC_ACT_SHOT, "{vip}: a stray reset is dropped");
        }
        assert_eq!(fx.reason("drop_reset_unanswered"), resets + 2);
        assert!(fx.conntrack().is_empty(), "{vip}: {:?}", fx.conntrack());
        assert_eq!(fx.reason("nat_new"), 0, "{vip}: no flow was opened");
        fx.set_specs(&[]);
        fx.edit_conntrack(&any, &|_| None);
    }
}

/// Item 6: a flood of SYNs from spoofed sources, four times the size of the
/// conntrack map, evicts no established flow: they go on to the same
/// backend with their replies restored. The backend answers every spoofed
/// SYN, as a listening server does: a flow becomes established only when
/// the client goes on after the answer (its ACK), which a spoofed source
/// never sends. Legitimate connections opened during the flood succeed
/// (their SYN+ACK and ACK find their entries).
#[test]
fn syn_flood_larger_than_the_maps_does_not_evict_answered_flows() {
    let capacities = Capacities {
        ct_entries: 4096,
        ..Capacities::default()
    };
    let Some(mut fx) = Fixture::with_capacities("syn_flood_does_not_evict", &capacities) else {
        return;
    };
    let flood = 4 * capacities.ct_entries;
    for (vip, _, client, _) in FAMILIES {
        let backends = addrs(if vip == VIP4 { &BACKENDS4 } else { &BACKENDS6 });
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &backends))]);
        // 64 answered flows.
        let handshake = |fx: &mut Fixture, client: SocketAddr| {
            let syn = first(client, &fe);
            let backend = translated(fx, &syn, vip);
            reply_restored(
                fx,
                &answer(backend, client, Protocol::Tcp),
                syn.dst,
                client,
                vip,
            );
            translated(fx, &flags(&syn, TCP_ACK), vip);
            (syn, backend)
        };
        let flows: Vec<(Frame, SocketAddr)> = (0..64)
            .map(|i| handshake(&mut fx, sock(client, 50000 + i)))
            .collect();
        // The flood, with a legitimate connection every 256 SYNs.
        let mut legitimate = 0;
        for i in 0..flood {
            let spoofed = spoofed_source(vip, i);
            let (_, to_endpoint) = fx.run(&first(spoofed, &fe).bytes());
            let (seen, backend) = verify_checksums(&to_endpoint);
            let (verdict, _) = fx.run(&answer(backend, seen, Protocol::Tcp).bytes());
            assert_eq!(verdict, TC_ACT_OK, "{vip}: the answer to a spoofed SYN");
            if i % 256 == 0 {
                let port = 20000 + u16::try_from(i / 256).unwrap();
                handshake(&mut fx, sock(client, port));
                legitimate += 1;
            }
        }
        assert!(
            legitimate >= 64,
            "{vip}: {legitimate} legitimate connections"
        );
        let records = fx.conntrack();
        for (syn, _) in &flows {
            let kept = records
                .iter()
                .filter(|r| r.answered && (r.source == syn.src || r.destination == syn.src))
                .count();
            assert_eq!(
                kept, 2,
                "{vip}: flow {} lost its entries to the flood",
                syn.src
            );
        }
        let new_flows = fx.reason("nat_new");
        let unanswered = fx.conntrack().iter().filter(|r| !r.answered).count();
        let limit = 2 * limits::ct_new_entries(capacities.ct_entries) as usize;
        assert!(
            unanswered <= limit,
            "{vip}: {unanswered} unanswered entries, more than the map of new flows holds"
        );
        for (syn, backend) in &flows {
            let data = flags(syn, TCP_ACK | TCP_PSH);
            let what = format!("{vip}: flow {} after the flood", syn.src);
            assert_eq!(translated(&mut fx, &data, &what), *backend, "{what}: moved");
            let reply = Frame::tcp(&backend.to_string(), &syn.src.to_string(), TCP_ACK);
            reply_restored(&mut fx, &reply, syn.dst, syn.src, &what);
        }
        assert_eq!(
            fx.reason("nat_new"),
            new_flows,
            "{vip}: flows were opened anew"
        );
        fx.set_specs(&[]);
        fx.edit_conntrack(&any, &|_| None);
    }
}

/// The `i`th spoofed source of a flood: addresses spread over a /16 (IPv4)
/// or a /96 (IPv6) outside the test's other addresses, ports over the
/// ephemeral range.
fn spoofed_source(vip: &str, i: u32) -> SocketAddr {
    let port = 32768 + u16::try_from(i % 28000).unwrap();
    let [_, _, hi, lo] = i.to_be_bytes();
    if vip == VIP4 {
        SocketAddr::new([10, 99, hi, lo].into(), port)
    } else {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[0xfd, 0x00, 0x99, 0x00]);
        addr[12..].copy_from_slice(&i.to_be_bytes());
        SocketAddr::new(addr.into(), port)
    }
}
