//! The benchmark's cluster: N dual-stack Services x 10 endpoints, written as
//! `lb` manifests, as kube-proxy's nftables-mode ruleset and as its
//! iptables-mode ruleset.
//!
//! Address plan (everything routed is inside 198.18.0.0/15 and `fd00::/8`,
//! and only ever routed between namespaces the benchmark creates):
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | client <-> node K link | 198.18.(16+K).0/24 | `fd00:1K::/64` |
//! | node K <-> backend link | 198.18.(32+K).0/24 | `fd00:2K::/64` |
//! | the 10 real endpoints (backend `lo`) | 198.18.2.2-11 | `fd00:2::2-b` |
//! | VIPs of `lb` / nftables / iptables | 198.18.64.0/18, .128.0/18, .192.0/18 (16k each; beyond, `lb`'s run on into the others: control plane only) | `fd00:96:1::/64`, `:2::`, `:3::` |
//! | endpoints of the other Services (never reached, never routed) | 100.64.0.0/10 (unique up to 400k Services) | `fd00:64::/64` (unique) |
//! | endpoint addresses set by the change test | 198.18.3.0/24 | |
//!
//! The measured Service is the last one: the worst case for iptables' linear
//! `KUBE-SERVICES` list. It has `http` 80 -> 8080 (nginx) and `iperf`
//! 5201 -> 5201 (iperf3); every other Service has `http` only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

/// Endpoints per Service.
pub const ENDPOINTS: u32 = 10;
pub const HTTP_PORT: u16 = 80;
pub const HTTP_TARGET: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
/// Services per manifest file.
pub const SERVICES_PER_FILE: u32 = 500;
/// Pod CIDRs as kube-proxy's `--cluster-cidr` (clients inside are not masqueraded).
pub const CLUSTER_CIDR4: &str = "198.18.0.0/15";
pub const CLUSTER_CIDR6: &str = "fd00::/8";

/// Who translates the service address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Contender {
    /// No load balancer: the client connects to an endpoint address.
    Direct,
    /// `lb`'s TC program.
    Lb,
    /// kube-proxy's nftables-mode rules.
    Nftables,
    /// kube-proxy's iptables-mode rules (`iptables-restore`).
    Iptables,
}

impl Contender {
    pub const ALL: [Self; 4] = [Self::Direct, Self::Lb, Self::Nftables, Self::Iptables];

    /// Index K in the address plan.
    pub fn index(self) -> u8 {
        match self {
            Self::Direct => 0,
            Self::Lb => 1,
            Self::Nftables => 2,
            Self::Iptables => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Lb => "lb",
            Self::Nftables => "nftables",
            Self::Iptables => "iptables",
        }
    }
}

/// IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Self; 2] = [Self::V4, Self::V6];

    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

/// Service VIP of contender C (lb, nftables or iptables).
pub fn vip(contender: Contender, family: Family, i: u32) -> IpAddr {
    let k = contender.index();
    match family {
        Family::V4 => {
            let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + u32::from(k) * 64 * 256;
            IpAddr::V4(Ipv4Addr::from(base + i + 1))
        }
        Family::V6 => {
            let base = u128::from(Ipv6Addr::new(0xfd00, 0x96, u16::from(k), 0, 0, 0, 0, 0));
            IpAddr::V6(Ipv6Addr::from(base + u128::from(i) + 1))
        }
    }
}

/// Endpoint B (0..10) of the measured Service: the backend namespace's addresses.
pub fn real_endpoint(family: Family, b: u32) -> IpAddr {
    let host = u8::try_from(b + 2).expect("10 endpoints");
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 18, 2, host)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, u16::from(host))),
    }
}

/// A cluster of `count` Services; the last is the measured one.
pub struct Cluster {
    pub count: u32,
    /// Endpoint 0 (IPv4) replaced by the change test, by Service index.
    pub overrides: BTreeMap<u32, Ipv4Addr>,
    /// Whose VIP range the Services take (`lb`'s; the forwarding A/B
    /// runs a second agent in the nftables contender's node namespace).
    pub vips: Contender,
}

impl Cluster {
    pub fn new(count: u32) -> Self {
        Self {
            count,
            overrides: BTreeMap::new(),
            vips: Contender::Lb,
        }
    }

    pub fn last(&self) -> u32 {
        self.count - 1
    }

    pub fn endpoint(&self, family: Family, i: u32, b: u32) -> IpAddr {
        if i == self.last() {
            return real_endpoint(family, b);
        }
        match family {
            Family::V4 => {
                if b == 0
                    && let Some(addr) = self.overrides.get(&i)
                {
                    return IpAddr::V4(*addr);
                }
                // Distinct per endpoint, as IPv6: 1M endpoints at 100k
                // Services are 1M backends of each family.
                let offset = (i * ENDPOINTS + b) % (1 << 22);
                IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(100, 64, 0, 0)) + offset,
                ))
            }
            Family::V6 => IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0x64,
                0,
                0,
                0,
                u16::try_from(i >> 16).unwrap_or(u16::MAX),
                (i & 0xffff) as u16,
                u16::try_from(b).unwrap_or(0) + 1,
            )),
        }
    }

    /// (port name, port, target port) of Service I.
    pub fn ports(&self, i: u32) -> &'static [(&'static str, u16, u16)] {
        if i == self.last() {
            &[
                ("http", HTTP_PORT, HTTP_TARGET),
                ("iperf", IPERF_PORT, IPERF_PORT),
            ]
        } else {
            &[("http", HTTP_PORT, HTTP_TARGET)]
        }
    }

    // -----------------------------------------------------------------
    // lb: manifests
    // -----------------------------------------------------------------

    /// Number of manifest files.
    pub fn files(&self) -> u32 {
        self.count.div_ceil(SERVICES_PER_FILE)
    }

    /// File name of chunk F.
    pub fn file_name(f: u32) -> String {
        format!("svc-{f:05}.json")
    }

    /// Chunk F: a `kind: List` of its Services and their `EndpointSlices`,
    /// as `kubectl get svc,endpointslices -o json` prints them.
    pub fn manifest_file(&self, f: u32) -> String {
        let first = f * SERVICES_PER_FILE;
        let end = (first + SERVICES_PER_FILE).min(self.count);
        let mut items = Vec::new();
        for i in first..end {
            items.push(self.service_json(i));
            for family in Family::BOTH {
                items.push(self.slice_json(i, family));
            }
        }
        serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
            .unwrap_or_default()
    }

    pub fn service_json(&self, i: u32) -> Value {
        let v4 = vip(self.vips, Family::V4, i).to_string();
        let v6 = vip(self.vips, Family::V6, i).to_string();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": v4,
                "clusterIPs": [v4, v6],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "RequireDualStack",
                "ports": self.ports(i).iter().map(|(name, port, target)| json!({
                    "name": name, "port": port, "protocol": "TCP", "targetPort": target,
                })).collect::<Vec<_>>(),
            },
        })
    }

    pub fn slice_json(&self, i: u32, family: Family) -> Value {
        let (suffix, kind) = match family {
            Family::V4 => ("v4", "IPv4"),
            Family::V6 => ("v6", "IPv6"),
        };
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("svc-{i}-{suffix}"),
                "namespace": "bench",
                "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
            },
            "addressType": kind,
            "endpoints": (0..ENDPOINTS).map(|b| json!({
                "addresses": [self.endpoint(family, i, b).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
            })).collect::<Vec<_>>(),
            "ports": self.ports(i).iter().map(|(name, _, target)| json!({
                "name": name, "port": target, "protocol": "TCP",
            })).collect::<Vec<_>>(),
        })
    }

    // -----------------------------------------------------------------
    // kube-proxy nftables mode
    // -----------------------------------------------------------------

    /// kube-proxy's nftables-mode NAT ruleset for FAMILY, as the `add`
    /// commands it sends to `nft -f` (pkg/proxy/nftables: `services` chain
    /// with the `service-ips` verdict map, one chain per Service port with
    /// a `numgen random` verdict map, one chain per endpoint with the DNAT).
    /// Only the NAT path is written: the filter chains kube-proxy also adds
    /// (`filter-forward` with its conntrack checks, firewall checks) would
    /// only add cost to this contender.
    pub fn nft_ruleset(&self, family: Family) -> String {
        let (fam, addr_type, ip, cidr) = match family {
            Family::V4 => ("ip", "ipv4_addr", "ip", CLUSTER_CIDR4),
            Family::V6 => ("ip6", "ipv6_addr", "ip6", CLUSTER_CIDR6),
        };
        let t = format!("{fam} kube-proxy");
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
        ));
        for (chain, hook, prio) in [
            ("nat-prerouting", "prerouting", "-100"),
            ("nat-output", "output", "-100"),
            ("nat-postrouting", "postrouting", "100"),
        ] {
            line(format!(
                "add chain {t} {chain} {{ type nat hook {hook} priority {prio} ; }}"
            ));
        }
        for chain in ["mark-for-masquerade", "masquerading", "services"] {
            line(format!("add chain {t} {chain}"));
        }
        line(format!(
            "add map {t} service-ips {{ type {addr_type} . inet_proto . inet_service : verdict ; \
             comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
        ));
        line(format!("add rule {t} nat-prerouting jump services"));
        line(format!("add rule {t} nat-output jump services"));
        line(format!("add rule {t} nat-postrouting jump masquerading"));
        line(format!(
            "add rule {t} mark-for-masquerade mark set mark or 0x4000"
        ));
        line(format!(
            "add rule {t} masquerading mark and 0x4000 == 0 return"
        ));
        line(format!(
            "add rule {t} masquerading mark set mark xor 0x4000"
        ));
        line(format!("add rule {t} masquerading masquerade fully-random"));
        line(format!(
            "add rule {t} services {ip} daddr . meta l4proto . th dport vmap @service-ips"
        ));
        let mut elements = Vec::new();
        for i in 0..self.count {
            let vip = vip(Contender::Nftables, family, i);
            for (port_name, port, target) in self.ports(i) {
                let svc = format!("bench/svc-{i}/tcp/{port_name}");
                let svc_chain = format!("service-{}-{svc}", hash_name(&svc));
                line(format!("add chain {t} {svc_chain}"));
                let mut vmap = Vec::new();
                for b in 0..ENDPOINTS {
                    let ep = self.endpoint(family, i, b);
                    let ep_port = bracketed(ep, *target);
                    let ep_chain = format!(
                        "endpoint-{}-{svc}__{}/{target}",
                        hash_name(&format!("{svc}{ep_port}")),
                        // As kube-proxy: `:` cannot appear in a chain name.
                        ep.to_string().replace(':', ".")
                    );
                    line(format!("add chain {t} {ep_chain}"));
                    line(format!(
                        "add rule {t} {ep_chain} {ip} saddr {ep} jump mark-for-masquerade"
                    ));
                    line(format!(
                        "add rule {t} {ep_chain} meta l4proto tcp dnat to {ep_port}"
                    ));
                    vmap.push(format!("{b} : goto {ep_chain}"));
                }
                line(format!(
                    "add rule {t} {svc_chain} {ip} daddr {vip} tcp dport {port} \
                     {ip} saddr != {cidr} jump mark-for-masquerade"
                ));
                line(format!(
                    "add rule {t} {svc_chain} numgen random mod {ENDPOINTS} vmap {{ {} }}",
                    vmap.join(" , ")
                ));
                elements.push(format!(
                    "add element {t} service-ips {{ {vip} . tcp . {port} : goto {svc_chain} }}"
                ));
            }
        }
        for element in elements {
            line(element);
        }
        out
    }

    // -----------------------------------------------------------------
    // kube-proxy iptables mode
    // -----------------------------------------------------------------

    /// kube-proxy's iptables-mode `nat` table for FAMILY, as the input it
    /// gives `iptables-restore` (pkg/proxy/iptables: `KUBE-SERVICES` with one
    /// rule per Service port, `KUBE-SVC-*` with `statistic --mode random`
    /// per endpoint, `KUBE-SEP-*` with the DNAT). The measured Service is
    /// the last rule before the `KUBE-NODEPORTS` jump. Only the `nat` table
    /// is written (see [`Self::nft_ruleset`]).
    pub fn iptables_restore(&self, family: Family) -> String {
        let (cidr, host) = match family {
            Family::V4 => (CLUSTER_CIDR4, "/32"),
            Family::V6 => (CLUSTER_CIDR6, "/128"),
        };
        let mut chains = String::from(
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
             :KUBE-NODEPORTS - [0:0]\n",
        );
        let mut rules = String::from(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
             -j MASQUERADE --random-fully\n",
        );
        let mut services = String::new();
        let mut per_service = String::new();
        for i in 0..self.count {
            let vip = vip(Contender::Iptables, family, i);
            for (port_name, port, target) in self.ports(i) {
                let svc = format!("bench/svc-{i}:{port_name}");
                let svc_chain = format!("KUBE-SVC-{}", hash_name(&format!("{svc}{family:?}")));
                let _ = writeln!(chains, ":{svc_chain} - [0:0]");
                let _ = writeln!(
                    services,
                    "-A KUBE-SERVICES -d {vip}{host} -p tcp -m comment --comment \"{svc} cluster IP\" \
                     -m tcp --dport {port} -j {svc_chain}"
                );
                let _ = writeln!(
                    per_service,
                    "-A {svc_chain} ! -s {cidr} -d {vip}{host} -p tcp -m comment --comment \"{svc} cluster IP\" \
                     -m tcp --dport {port} -j KUBE-MARK-MASQ"
                );
                for b in 0..ENDPOINTS {
                    let ep = self.endpoint(family, i, b);
                    let ep_port = bracketed(ep, *target);
                    let sep_chain = format!("KUBE-SEP-{}", hash_name(&format!("{svc}{ep_port}")));
                    let _ = writeln!(chains, ":{sep_chain} - [0:0]");
                    let left = ENDPOINTS - b;
                    if left > 1 {
                        let _ = writeln!(
                            per_service,
                            "-A {svc_chain} -m comment --comment \"{svc} -> {ep_port}\" -m statistic \
                             --mode random --probability {:.11} -j {sep_chain}",
                            1.0 / f64::from(left)
                        );
                    } else {
                        let _ = writeln!(
                            per_service,
                            "-A {svc_chain} -m comment --comment \"{svc} -> {ep_port}\" -j {sep_chain}"
                        );
                    }
                    let _ = writeln!(
                        per_service,
                        "-A {sep_chain} -s {ep}{host} -m comment --comment \"{svc}\" -j KUBE-MARK-MASQ\n\
                         -A {sep_chain} -p tcp -m comment --comment \"{svc}\" -m tcp -j DNAT \
                         --to-destination {ep_port}"
                    );
                }
            }
        }
        rules.push_str(&services);
        rules.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
             the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
        rules.push_str(&per_service);
        chains + &rules + "COMMIT\n"
    }
}

/// `addr:port` with brackets for IPv6.
pub fn bracketed(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A 16-character `[A-Z2-7]` name hash, like kube-proxy's chain suffixes.
fn hash_name(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in input.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut h2 = h.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = String::with_capacity(16);
    for k in 0..16 {
        let word = if k < 12 { &mut h } else { &mut h2 };
        out.push(char::from(ALPHABET[(*word & 31) as usize]));
        *word >>= 5;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_benchmark_ranges() {
        let cluster = Cluster::new(10_000);
        for contender in [Contender::Lb, Contender::Nftables, Contender::Iptables] {
            let IpAddr::V4(last) = vip(contender, Family::V4, 9_999) else {
                unreachable!()
            };
            assert_eq!(last.octets()[..2], [198, 18]);
            assert!(last.octets()[2] >= 64);
        }
        // The measured Service's endpoints are routed (198.18.0.0/15); the
        // others' are never reached, each its own address in 100.64.0.0/10.
        let mut seen = std::collections::BTreeSet::new();
        for i in [0, 5_000, 9_998, 9_999] {
            for b in 0..ENDPOINTS {
                match cluster.endpoint(Family::V4, i, b) {
                    IpAddr::V4(a) if i == cluster.last() => {
                        assert!(a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18);
                    }
                    IpAddr::V4(a) => {
                        assert!(a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64, "{a}");
                        assert!(seen.insert(a), "{a} twice");
                    }
                    IpAddr::V6(_) => unreachable!(),
                }
                assert!(
                    cluster
                        .endpoint(Family::V6, i, b)
                        .to_string()
                        .starts_with("fd00:")
                );
            }
        }
    }

    #[test]
    fn rulesets_name_every_endpoint_of_the_measured_service() {
        let cluster = Cluster::new(3);
        let nft = cluster.nft_ruleset(Family::V4);
        assert!(nft.contains("dnat to 198.18.2.11:8080"));
        assert!(nft.contains("198.18.128.3 . tcp . 5201"));
        let ipt = cluster.iptables_restore(Family::V6);
        assert!(ipt.contains("--to-destination [fd00:2::b]:8080"));
        assert!(ipt.ends_with("COMMIT\n"));
        let manifests = cluster.manifest_file(0);
        assert!(manifests.contains("198.18.64.3"));
    }
}
