//! Datapath tests (root): the real TC program run with `BPF_PROG_TEST_RUN` on
//! crafted IPv4/IPv6 TCP/UDP frames (see `support::prog_test` and
//! `support::frames`). Each test asserts the verdict, the exact output bytes
//! (built independently with checksums computed from scratch), the
//! checksums themselves, and the conntrack/counter maps.
//!
//! This file: the node and external paths: `NodePort` source NAT and its
//! reversal, node-local backends keeping the client's source, hairpin,
//! load-balancer source ranges, and `--cluster-cidr`: off-cluster clients
//! of a `ClusterIP`.

mod support;

use std::net::{IpAddr, SocketAddr};

use lb_userspace::model::{FrontendKind, Protocol};

use support::frames::{Frame, TCP_ACK, TCP_SYN, verify_checksums};
use support::prog_test::{
    BACKENDS4, BACKENDS6, Fixture, NODE4, NODE6, TC_ACT_OK, TC_ACT_SHOT, VIP4, VIP6, addrs,
    flow_hash, frontend, node_config, snat_candidate, spec,
};

#[test]
fn node_port_to_a_remote_backend_is_source_nated_and_reversed() {
    let Some(mut fx) = Fixture::new("node_port_to_a_remote_backend_is_source_nated_and_reversed")
    else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for (node, client, backend) in [
        (NODE4, "198.18.9.2", "198.18.12.2:8080"),
        (NODE6, "fd00:9::2", "[fd00:12::2]:8080"),
    ] {
        let node_port = SocketAddr::new(node.parse().unwrap(), 30080);
        let fe = frontend(node, 30080, Protocol::Tcp);
        let backends = addrs(&[backend]);
        fx.set_specs(&[(fe, spec(FrontendKind::NodePort, &backends))]);
        let client = SocketAddr::new(client.parse().unwrap(), 45000);
        let syn = Frame::tcp(&client.to_string(), &node_port.to_string(), TCP_SYN);
        let (verdict, out) = fx.run(&syn.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (src, dst) = verify_checksums(&out);
        assert_eq!(dst, backends[0]);
        assert_eq!(src.ip(), node_port.ip(), "source NAT to the node address");
        let pool = lb_common::SNAT_PORT_MIN..lb_common::SNAT_PORT_MIN + lb_common::SNAT_PORT_COUNT;
        assert!(pool.contains(&src.port()), "port {}", src.port());
        let mut expected = syn.with_dst(backends[0]).with_src(src);
        expected.tcp_flags = TCP_SYN;
        assert_eq!(out, expected.bytes());

        // The backend answers the node; the client gets the NodePort back.
        let reply = Frame::tcp(
            &backends[0].to_string(),
            &src.to_string(),
            TCP_SYN | TCP_ACK,
        );
        let (verdict, out) = fx.run(&reply.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out), (node_port, client));
        assert_eq!(out, reply.with_src(node_port).with_dst(client).bytes());
    }
}

/// The source NAT port range (1024-32767) holds the `NodePort` range: a
/// flow whose first candidate port is the `NodePort` itself must take its
/// next one, since the backend's answer to node:30080 would meet the
/// frontend node:30080 and be refused as a stray packet to it (seen as a
/// lost connection in `harness_lifecycle`, about 1 in 30,000).
#[test]
fn source_nat_never_takes_a_frontends_port_on_the_node_address() {
    let Some(mut fx) = Fixture::new("source_nat_never_takes_a_frontends_port_on_the_node_address")
    else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for (node, client, backend) in [
        (NODE4, "198.18.9.2:45000", "198.18.12.2:8080"),
        (NODE6, "[fd00:9::2]:45000", "[fd00:12::2]:8080"),
    ] {
        let node_port = SocketAddr::new(node.parse().unwrap(), 30080);
        let fe = frontend(node, 30080, Protocol::Tcp);
        let backends = addrs(&[backend]);
        fx.set_specs(&[(fe, spec(FrontendKind::NodePort, &backends))]);
        let client: SocketAddr = client.parse().unwrap();
        // The seed that makes the flow's first candidate 30080 (`snat.rs`:
        // candidate i is MIN + (hash + seed + 7919 i) mod COUNT).
        let seed = (30080 - u32::from(lb_common::SNAT_PORT_MIN))
            .wrapping_sub(flow_hash(client, node_port, 6));
        assert_eq!(snat_candidate(seed, client, node_port, 0), 30080);
        fx.set_snat_seed(seed);
        let second = snat_candidate(seed, client, node_port, 1);

        let syn = Frame::tcp(&client.to_string(), &node_port.to_string(), TCP_SYN);
        let (verdict, out) = fx.run(&syn.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (src, dst) = verify_checksums(&out);
        assert_eq!(dst, backends[0]);
        assert_eq!(
            src,
            SocketAddr::new(node_port.ip(), second),
            "the NodePort's own port is skipped for the next candidate"
        );
        let reply = Frame::tcp(backend, &src.to_string(), TCP_SYN | TCP_ACK);
        let (verdict, out) = fx.run(&reply.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, reply.with_src(node_port).with_dst(client).bytes());
    }
}

#[test]
fn external_traffic_to_a_local_backend_keeps_its_source() {
    let Some(mut fx) = Fixture::new("external_traffic_to_a_local_backend_keeps_its_source") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    let backends = addrs(&["198.18.2.2:8080"]);
    let mut local = spec(FrontendKind::NodePort, &backends);
    local.backends[0].node_local = true;
    let mut etp_local = spec(FrontendKind::LoadBalancer, &addrs(&["198.18.3.2:8080"]));
    etp_local.external_local = true;
    fx.set_specs(&[
        (frontend(NODE4, 30080, Protocol::Tcp), local),
        (frontend("198.19.1.1", 80, Protocol::Tcp), etp_local),
    ]);
    for (dst, backend) in [
        ("198.18.0.1:30080", "198.18.2.2:8080"),
        ("198.19.1.1:80", "198.18.3.2:8080"),
    ] {
        let syn = Frame::tcp("198.18.9.2:45000", dst, TCP_SYN);
        let (_, out) = fx.run(&syn.bytes());
        assert_eq!(out, syn.with_dst(backend.parse().unwrap()).bytes());
    }
}

#[test]
fn hairpin_flow_is_source_nated_to_the_loopback_address() {
    let Some(mut fx) = Fixture::new("hairpin_flow_is_source_nated_to_the_loopback_address") else {
        return;
    };
    fx.maps.write_config(&node_config()).unwrap();
    for (vip, pod, loopback) in [
        (VIP4, "198.18.2.2", "169.254.42.1"),
        (VIP6, "fd00:2::2", "100::6c62:1"),
    ] {
        let backend = SocketAddr::new(pod.parse().unwrap(), 8080);
        fx.set_services(&[(frontend(vip, 80, Protocol::Tcp), &[backend])]);
        let client = SocketAddr::new(pod.parse().unwrap(), 41000);
        let service = SocketAddr::new(vip.parse().unwrap(), 80);
        let syn = Frame::tcp(&client.to_string(), &service.to_string(), TCP_SYN);
        let (_, out) = fx.run(&syn.bytes());
        let (src, dst) = verify_checksums(&out);
        assert_eq!(dst, backend);
        assert_eq!(src.ip(), loopback.parse::<IpAddr>().unwrap());
        // The pod answers the loopback address; it gets the service back.
        let reply = Frame::tcp(&backend.to_string(), &src.to_string(), TCP_SYN | TCP_ACK);
        let (_, out) = fx.run(&reply.bytes());
        assert_eq!(verify_checksums(&out), (service, client));
        assert_eq!(out, reply.with_src(service).with_dst(client).bytes());
    }
}

#[test]
fn source_ranges_admit_listed_clients_only() {
    let Some(mut fx) = Fixture::new("source_ranges_admit_listed_clients_only") else {
        return;
    };
    let mut lb4 = spec(FrontendKind::LoadBalancer, &addrs(&BACKENDS4));
    lb4.source_ranges = vec![("198.18.1.0".parse().unwrap(), 24)];
    let mut lb6 = spec(FrontendKind::LoadBalancer, &addrs(&BACKENDS6));
    lb6.source_ranges = vec![("fd00:1::".parse().unwrap(), 64)];
    fx.set_specs(&[
        (frontend("198.19.1.1", 80, Protocol::Tcp), lb4),
        (frontend("fd00:97::1", 80, Protocol::Tcp), lb6),
    ]);
    fx.maps.write_config(&node_config()).unwrap();
    for (allowed, denied, lb) in [
        ("198.18.1.7:40000", "198.18.9.7:40000", "198.19.1.1:80"),
        ("[fd00:1::7]:40000", "[fd00:9::7]:40000", "[fd00:97::1]:80"),
    ] {
        let (verdict, out) = fx.run(&Frame::tcp(allowed, lb, TCP_SYN).bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_ne!(verify_checksums(&out).1, lb.parse().unwrap(), "translated");
        let (verdict, _) = fx.run(&Frame::tcp(denied, lb, TCP_SYN).bytes());
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(fx.reason("drop_source_range"), 2);
}

/// `--cluster-cidr` (issue 10 section 3): a client outside the cluster
/// CIDRs reaching a `ClusterIP` (a static route to the Service range) with
/// an endpoint on another node gets the node's address as source, as with
/// kube-proxy's cluster-CIDR masquerade; a pod (inside them), a local
/// endpoint, or no `--cluster-cidr` at all keep the client's source.
#[test]
fn off_cluster_client_of_a_cluster_ip_is_source_nated_to_remote_endpoints() {
    let Some(mut fx) =
        Fixture::new("off_cluster_client_of_a_cluster_ip_is_source_nated_to_remote_endpoints")
    else {
        return;
    };
    let cidrs: Vec<(IpAddr, u8)> = vec![
        ("198.18.0.0".parse().unwrap(), 16),
        ("fd00::".parse().unwrap(), 16),
    ];
    fx.maps.write_cluster_cidrs(&cidrs).unwrap();
    let with_flag = lb_common::LbConfig {
        flags: lb_common::config_flags::CLUSTER_CIDR,
        ..node_config()
    };
    for (vip, node, pod, outside, backends) in [
        (VIP4, NODE4, "198.18.1.2", "203.0.113.9", &BACKENDS4),
        (VIP6, NODE6, "fd00:1::2", "2001:db8::9", &BACKENDS6),
    ] {
        let backends = addrs(backends);
        let fe = frontend(vip, 80, Protocol::Tcp);
        fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &backends))]);
        let service = SocketAddr::new(vip.parse().unwrap(), 80);
        let syn = |client: &str, port: u16| {
            Frame::tcp(
                &SocketAddr::new(client.parse().unwrap(), port).to_string(),
                &service.to_string(),
                TCP_SYN,
            )
        };

        // Without the flag in the configuration: no source NAT (as before).
        fx.maps.write_config(&node_config()).unwrap();
        let plain = syn(outside, 41_000);
        let (verdict, out) = fx.run(&plain.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (src, dst) = verify_checksums(&out);
        assert_eq!(src, plain.src, "no --cluster-cidr: source kept");
        assert!(backends.contains(&dst));

        fx.maps.write_config(&with_flag).unwrap();
        // A pod: inside the cluster CIDRs, source kept.
        let from_pod = syn(pod, 41_001);
        let (_, out) = fx.run(&from_pod.bytes());
        assert_eq!(
            verify_checksums(&out).0,
            from_pod.src,
            "a pod keeps its source"
        );

        // Off-cluster: the node's address and a port of the SNAT range.
        let client = SocketAddr::new(outside.parse().unwrap(), 41_002);
        let off = syn(outside, 41_002);
        let (verdict, out) = fx.run(&off.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        let (src, backend) = verify_checksums(&out);
        assert!(backends.contains(&backend));
        assert_eq!(
            src.ip(),
            node.parse::<IpAddr>().unwrap(),
            "source NAT to the node"
        );
        let pool = lb_common::SNAT_PORT_MIN..lb_common::SNAT_PORT_MIN + lb_common::SNAT_PORT_COUNT;
        assert!(pool.contains(&src.port()), "port {}", src.port());
        assert_eq!(out, off.with_dst(backend).with_src(src).bytes());
        // The backend answers the node; the client gets the ClusterIP back.
        let reply = Frame::tcp(&backend.to_string(), &src.to_string(), TCP_SYN | TCP_ACK);
        let (verdict, out) = fx.run(&reply.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(verify_checksums(&out), (service, client));

        // A local endpoint answers through this node anyway: source kept.
        let mut local = spec(FrontendKind::ClusterIp, &backends[..1]);
        local.backends[0].node_local = true;
        fx.set_specs(&[(fe, local)]);
        let to_local = syn(outside, 41_003);
        let (_, out) = fx.run(&to_local.bytes());
        assert_eq!(
            verify_checksums(&out),
            (to_local.src, backends[0]),
            "a local endpoint keeps the client's source"
        );
    }
    // Removing the CIDRs (an agent restarted without the flag) leaves
    // nothing of them in the map.
    fx.maps.write_cluster_cidrs(&[]).unwrap();
    fx.maps.write_config(&with_flag).unwrap();
    let fe = frontend(VIP4, 80, Protocol::Tcp);
    fx.set_specs(&[(fe, spec(FrontendKind::ClusterIp, &addrs(&BACKENDS4)))]);
    let from_pod = Frame::tcp("198.18.1.2:41004", "198.19.0.10:80", TCP_SYN);
    let (_, out) = fx.run(&from_pod.bytes());
    assert_eq!(
        verify_checksums(&out).0.ip(),
        NODE4.parse::<IpAddr>().unwrap(),
        "with the flag and no CIDRs every source is off-cluster"
    );
}
