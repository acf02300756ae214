//! Map keys, values, names and flags shared by the eBPF programs (`lb-ebpf`)
//! and the agent (`lb-userspace`).
//!
//! Rules for every type here: `#[repr(C)]`, `Copy`, explicit `_pad` fields so
//! that no byte is uninitialised (the kernel hashes whole keys), no `bool`,
//! `enum` or `Option`, and a size assertion. Addresses are byte arrays in
//! network order; ports carry their byte order in the field name (`_be`).
//! IPv4 and IPv6 types are one generic type over the address (`Addr4`,
//! `Addr6`), with the old per-family names as aliases.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding is public so both sides can build the types; `_pad` says it holds no data"
)]

use core::mem::size_of;

/// Map names. At most 15 characters: the kernel cuts object names at 16.
/// A layout change to a pinned map bumps the suffix so an old pin is not
/// reused with a new layout.
pub mod map_names {
    /// IPv4 services: `Lb4Key` -> `LbService` (V3: a frontend's first
    /// `limits::INLINE_SLOTS` slots are in its slot 0 entry).
    pub const SERVICES4: &str = "LB4_SVC_V3";
    /// IPv6 services: `Lb6Key` -> `LbService`.
    pub const SERVICES6: &str = "LB6_SVC_V3";
    /// IPv4 backends: an array of `Lb4Backend` indexed by the backend id
    /// (`backend_index`), mapped into the agent's memory (V3: a backend
    /// entry belongs to one frontend, `Backend::rev_nat_id`; V4: an array,
    /// not a hash map; an entry with rev-NAT id 0 is none).
    pub const BACKENDS4: &str = "LB4_BE_V4";
    /// IPv6 backends: an array of `Lb6Backend` (as `BACKENDS4`).
    pub const BACKENDS6: &str = "LB6_BE_V4";
    /// IPv4 reverse NAT: rev-NAT id -> `Lb4RevNat`.
    pub const REVNAT4: &str = "LB4_RNAT_V2";
    /// IPv6 reverse NAT: rev-NAT id -> `Lb6RevNat`.
    pub const REVNAT6: &str = "LB6_RNAT_V2";
    /// IPv4 connection tracking of answered flows (LRU; V4: common LRU
    /// lists, only answered flows): `Ct4Key` -> `CtEntry`.
    pub const CT4: &str = "LB4_CT_V4";
    /// IPv6 connection tracking of answered flows (as `CT4`).
    pub const CT6: &str = "LB6_CT_V4";
    /// IPv4 flows the backend has not answered yet (LRU, per-CPU lists):
    /// `Ct4Key` -> `CtEntry`. A flow starts here and moves to `CT4` on its
    /// first reply, so that a flood of new flows churns this map only and
    /// never evicts an answered flow.
    pub const CT_NEW4: &str = "LB4_CT_NEW_V1";
    /// IPv6 flows the backend has not answered yet (as `CT_NEW4`).
    pub const CT_NEW6: &str = "LB6_CT_NEW_V1";
    /// IPv4 session affinity (LRU): `Affinity4Key` -> `AffinityEntry` (V2:
    /// keyed by the Service port's affinity group, not the frontend).
    pub const AFFINITY4: &str = "LB4_AFF_V2";
    /// IPv6 session affinity (LRU): `Affinity6Key` -> `AffinityEntry` (V2:
    /// as `AFFINITY4`).
    pub const AFFINITY6: &str = "LB6_AFF_V2";
    /// IPv4 endpoint index: `Endpoint4Key` (frontend, endpoint) -> that
    /// frontend's backend id for the endpoint; how an affinity entry
    /// recorded through one frontend of a Service port is used by another.
    pub const ENDPOINTS4: &str = "LB4_EP_V1";
    /// IPv6 endpoint index: `Endpoint6Key` -> backend id (as `ENDPOINTS4`).
    pub const ENDPOINTS6: &str = "LB6_EP_V1";
    /// IPv4 allowed source ranges (LPM trie): `SourceRange4` -> `u8`.
    pub const SRC_RANGES4: &str = "LB4_SRC_V1";
    /// IPv6 allowed source ranges (LPM trie): `SourceRange6` -> `u8`.
    pub const SRC_RANGES6: &str = "LB6_SRC_V1";
    /// Node configuration (array of one `LbConfig`; V2: `flags`; V3:
    /// `snat_seed`).
    pub const CONFIG: &str = "LB_CONFIG_V3";
    /// Per-CPU packet/byte counters per frontend, indexed by rev-NAT id.
    pub const SVC_STATS: &str = "LB_SVC_STATS_V1";
    /// Attached interfaces: ifindex -> `iface_flags` (not pinned: written
    /// by the loader on every attach).
    pub const IFACES: &str = "LB_IFACE_V1";
    /// Per-CPU packet counters per verdict reason, indexed by `reason::*`
    /// (V2: the never emitted `drop_no_backend` was removed, which
    /// renumbered the reasons after it; V3: two more, `sock_translated` and
    /// `sock_refused`, so a V2 pin is too small; V4: more again,
    /// `drop_no_local_endpoint` and the topology ones from `pass_vlan` on;
    /// V5: `reject_no_flow` and `drop_snat_exhausted`; V6:
    /// `nat_icmp_error` and `pass_frag_untracked`).
    pub const REASONS: &str = "LB_REASONS_V6";
    /// Per-CPU counters of what a packet did beside its verdict, indexed
    /// by `event::*`.
    pub const EVENTS: &str = "LB_EVENTS_V1";
    /// Socket-level load balancing settings (array of one `SockConfig`).
    pub const SOCK_CONFIG: &str = "LB_SOCK_CFG_V1";
    /// IPv4 socket reverse translation (LRU): `SockRevNat4Key` ->
    /// `SockRevNat4`, what `getpeername()`/`recvmsg()` show instead of the
    /// backend a socket was sent to.
    pub const SOCK_REVNAT4: &str = "LB4_SK_RNAT_V1";
    /// IPv6 socket reverse translation (LRU): `SockRevNat6Key` -> `SockRevNat6`.
    pub const SOCK_REVNAT6: &str = "LB6_SK_RNAT_V1";
    /// Which released sockets may have a reverse entry to drop: an array
    /// of `u64` counters indexed by a hash of the socket cookie, counting
    /// the connected sockets with an entry whose cookie hashes there. A
    /// socket whose counter is 0 has none, and its release touches neither
    /// reverse-translation map.
    pub const SOCK_REVNAT_FILTER: &str = "LB_SK_RNAT_CNT_V1";
    /// IPv4 TCP socket slots: an array of `SockSlot4`, indexed by the
    /// socket cookie's low bits; where a translated TCP connection's
    /// reverse translation goes first (see `SockSlot`).
    pub const SOCK_SLOTS4: &str = "LB4_SK_SLOT_V1";
    /// IPv6 TCP socket slots: an array of `SockSlot6` (as `SOCK_SLOTS4`).
    pub const SOCK_SLOTS6: &str = "LB6_SK_SLOT_V1";
    /// Session affinity of the node's sockets (LRU), per network namespace:
    /// `SockAffinityKey` -> `AffinityEntry` (V2: keyed by the affinity
    /// group, as `AFFINITY4`).
    pub const SOCK_AFFINITY: &str = "LB_SK_AFF_V2";
    /// Maglev: rev-NAT id -> active table row + 1 (0: no table, the
    /// frontend's slots decide). Array of `u32`.
    pub const MAGLEV_REFS: &str = "LB_MGLV_REF_V1";
    /// Maglev tables: row `r` is entries `r * M .. (r + 1) * M` (M: the
    /// global `maglev::TABLE_SIZE_GLOBAL`), each a backend id. Array of `u32`.
    pub const MAGLEV_TABLES: &str = "LB_MGLV_TBL_V1";
    /// IPv4 fragments (LRU, not pinned: an entry lives as long as one
    /// datagram's fragments are on their way): `Frag4Key` -> `FragEntry`.
    pub const FRAG4: &str = "LB4_FRAG_V1";
    /// IPv6 fragments (LRU, not pinned): `Frag6Key` -> `FragEntry`.
    pub const FRAG6: &str = "LB6_FRAG_V1";
}

/// Maglev consistent hashing (`--lb-algorithm`, `--maglev-table-size`).
pub mod maglev {
    /// Name of the read-only global (a `u32` in the object's `.rodata`)
    /// the loader sets to the table size M; 0: Maglev off, no lookup.
    pub const TABLE_SIZE_GLOBAL: &str = "MAGLEV_TABLE_SIZE";
    /// Rows per table: the active one and the one the next table is
    /// written into before the frontend's row reference moves to it.
    pub const ROWS_PER_TABLE: u32 = 2;
}

/// Program names as they appear in the object file and in the kernel.
pub mod prog_names {
    /// TC program translating service traffic and its replies (ingress of
    /// Ethernet devices).
    pub const TC_LB: &str = "lb_tc";
    /// `TC_LB` for devices without an Ethernet header (IPIP, `ip6tnl`, GRE
    /// in L3 mode, `WireGuard`).
    pub const TC_LB_L3: &str = "lb_tc_l3";
    /// Reply translation at egress of Ethernet devices.
    pub const TC_LB_EGRESS: &str = "lb_tc_egress";
    /// Reply translation at egress of devices without an Ethernet header.
    pub const TC_LB_L3_EGRESS: &str = "lb_tc_l3_egress";
    /// Empty TC program: the measurement floor for benchmarks and tests.
    pub const TC_FLOOR: &str = "lb_floor";
    /// Socket-level load balancing (cgroup `sock_addr` programs): `connect()`.
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    /// `connect()` on IPv6 sockets (IPv4-mapped addresses included).
    pub const SOCK_CONNECT6: &str = "lb_sock_connect6";
    /// `sendmsg()` with an address on unconnected UDP sockets.
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    /// `sendmsg()` on unconnected IPv6 UDP sockets.
    pub const SOCK_SENDMSG6: &str = "lb_sock_sendmsg6";
    /// The source address `recvmsg()` reports, on UDP sockets.
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    /// The source address `recvmsg()` reports, on IPv6 UDP sockets.
    pub const SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
    /// The peer `getpeername()` reports.
    pub const SOCK_GETPEERNAME4: &str = "lb_sock_peer4";
    /// The peer `getpeername()` reports, on IPv6 sockets.
    pub const SOCK_GETPEERNAME6: &str = "lb_sock_peer6";
    /// Socket release (cgroup `sock` program): drops the socket's reverse
    /// translation entry.
    pub const SOCK_RELEASE: &str = "lb_sock_release";
    /// `bind()` to a `NodePort` on a node address: refused (`--socket-lb-bind-guard`).
    pub const SOCK_BIND4: &str = "lb_sock_bind4";
    /// `bind()` on IPv6 sockets.
    pub const SOCK_BIND6: &str = "lb_sock_bind6";
}

/// `SockConfig::flags` bits.
pub mod sock_flags {
    /// Socket-level load balancing is on; without it every socket program
    /// lets everything through untouched.
    pub const ENABLED: u32 = 1 << 0;
    /// Translate in every network namespace (`--socket-lb=all`); without
    /// it only sockets of the namespace `SockConfig::netns_cookie` names.
    pub const ALL_NETNS: u32 = 1 << 1;
    /// `bind()` to a `NodePort` on a node address fails with `EADDRINUSE`.
    pub const BIND_GUARD: u32 = 1 << 2;
}

/// Map creation flags.
pub mod map_flags {
    /// `BPF_F_NO_PREALLOC`: entries are allocated on insert, so a large
    /// capacity costs nothing until used (the service maps would otherwise
    /// pin hundreds of MiB of kernel memory at load).
    pub const NO_PREALLOC: u32 = 1;
    /// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists, no shared lock on insert.
    pub const NO_COMMON_LRU: u32 = 2;
    /// `BPF_F_MMAPABLE`: an array the agent maps into its memory and
    /// writes with plain stores (the backend arrays: no syscall per entry).
    pub const MMAPABLE: u32 = 1 << 10;
}

/// Id spaces and map capacities (entries). Frontends are VIP:port/proto
/// triples. The maps the agent writes are sized at load time by its flags
/// (`--max-services`, `--max-service-slots`, `--max-backends`,
/// `--ct-entries`); the `DEFAULT_*` values hold 100k dual-stack Services of
/// one port with 10 endpoints each (1M endpoints per family) with headroom.
/// The map definitions in the eBPF object use the defaults (or the id
/// spaces) and the loader overrides them.
pub mod limits {
    /// Largest rev-NAT id + 1, over both families: the id space, and the
    /// largest size of the per-service stats array (per CPU, preallocated:
    /// 16 bytes x CPUs x its entries). The agent sizes that array from
    /// `--max-services` (4 x it + 1 entries, see the loader) and keeps
    /// rev-NAT ids below its size. At most this - 1 frontends fit, IPv4
    /// and IPv6 together.
    pub const MAX_FRONTENDS: u32 = 1 << 18;
    /// Default rev-NAT map entries per family (`--max-services`): frontends
    /// (address, port, protocol) of one family. 100k dual-stack Services
    /// of one port take 100k per family.
    pub const DEFAULT_SERVICES: u32 = 1 << 17;
    /// Default service map entries per family (`--max-service-slots`): one
    /// per frontend, one per backend slot of each frontend beyond its
    /// first [`INLINE_SLOTS`] (those are in the frontend's own entry) and
    /// one per `ClusterIP` (its marker). 100k Services x (1 + 1) = 200k,
    /// with room for 1.8M slots of frontends with many backends.
    pub const MAX_SERVICE_SLOTS: u32 = 1 << 21;
    /// Backend slots held in a frontend's own service entry (slot 0,
    /// `LbService::slots`): a frontend with at most this many backends is
    /// one entry, and choosing its backend is no lookup of its own. At
    /// 100k Services x 10 endpoints that is 200k entries per family
    /// instead of 1.2M to write on a cold start (the kernel's per-element
    /// cost of a hash map, ~1-2 us, was the largest part of it).
    pub const INLINE_SLOTS: usize = 12;
    /// Bound of `--max-backends` (backend array entries per family).
    pub const MAX_BACKENDS: u32 = 1 << 22;
    /// The bit an IPv6 backend's id has and an IPv4 backend's has not:
    /// each family hands out its own ids, and an id's other bits are its
    /// entry's index in its family's backend array (`backend_index`).
    pub const BACKEND_ID_V6: u32 = 1 << 31;
    /// Default backend map entries per family (`--max-backends`): one per
    /// endpoint (address, port, protocol) of each frontend, so a `NodePort`
    /// Service takes one per endpoint for its `ClusterIP` and one for each
    /// node address (plus one in each array, recording the next id).
    pub const DEFAULT_BACKENDS: u32 = 1 << 21;
    /// Default conntrack entries per family (an LRU: the oldest go first).
    pub const DEFAULT_CT_ENTRIES: u32 = 1 << 18;
    /// Entries of the map of unanswered flows (`map_names::CT_NEW4`) for
    /// `ct_entries` answered ones: a quarter, at least 1024. A flow waits
    /// there one round trip; at a million spoofed SYNs a second a quarter
    /// of the default still keeps a legitimate SYN for tens of
    /// milliseconds.
    #[must_use]
    pub const fn ct_new_entries(ct_entries: u32) -> u32 {
        let quarter = ct_entries / 4;
        if quarter < 1024 { 1024 } else { quarter }
    }
    /// Session-affinity entries per family (an LRU).
    pub const AFFINITY_ENTRIES: u32 = 1 << 16;
    /// Socket reverse-translation entries per family (an LRU): one per
    /// socket and backend it was sent to; a connected socket's entry is
    /// removed when the socket is released.
    pub const SOCK_REVNAT_ENTRIES: u32 = 1 << 18;
    /// Counters of the socket reverse-entry filter (`SOCK_REVNAT_FILTER`),
    /// shared by both families: 256 KiB of `u64`, so that the filter stays
    /// in the CPU's caches where the reverse-translation maps (4 MiB of
    /// buckets each) do not.
    pub const SOCK_REVNAT_FILTER_SLOTS: u32 = 1 << 15;
    /// Slots of the TCP socket slot tables (`SOCK_SLOTS4`, `SOCK_SLOTS6`)
    /// per family: live translated TCP connections beyond this many use the
    /// reverse-translation map (1.5 MiB for IPv4, 3 MiB for IPv6).
    pub const SOCK_SLOTS: u32 = 1 << 16;
    /// The first slots of each table, tried first (`SockSlot`): 24 KiB
    /// (IPv4) and 48 KiB (IPv6), small enough to stay in the caches
    /// nearest the CPU (the first-level one holds the IPv4 slots), where a
    /// sweep over the whole table misses them on every new cache line
    /// (docs/benchmarks-journal.md, session 17).
    pub const SOCK_NEAR_SLOTS: u32 = 1 << 10;
    /// Source-range prefixes per family, over all frontends.
    pub const SOURCE_RANGES: u32 = 1 << 14;
    /// Fragmented datagrams tracked at once per family (an LRU, as
    /// Cilium's `CILIUM_IPV4_FRAG_MAP_MAX_ENTRIES`): an entry is needed only
    /// while one datagram's fragments cross the node (milliseconds), so
    /// 8192 datagrams in flight is far above what a node sees; the oldest
    /// go first. Preallocated: about 0.7 MiB (IPv4) and 0.9 MiB (IPv6),
    /// elements (72 and 96 bytes with the kernel's header) and buckets.
    pub const FRAG_ENTRIES: u32 = 8192;
    /// Highest backend slot number a service may use (slots 1..=this).
    pub const MAX_BACKENDS_PER_SERVICE: u16 = u16::MAX - 1;
}

/// IP protocol numbers carried in keys (raw numbers, as on the wire).
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// `ICMPv6`.
    pub const ICMPV6: u8 = 58;
    /// SCTP (RFC 9260).
    pub const SCTP: u8 = 132;
}

/// Service key scopes.
pub mod scope {
    /// Any frontend (the only scope used so far).
    pub const INTERNAL: u8 = 0;
}

/// `LbService::flags` bits (slot 0).
pub mod svc_flags {
    /// Frontend is a `ClusterIP`.
    pub const CLUSTER_IP: u16 = 1 << 0;
    /// Frontend is reached from outside (`NodePort`, `LoadBalancer`, external IP).
    pub const EXTERNAL: u16 = 1 << 1;
    /// External frontend with externalTrafficPolicy Local: never source-NAT.
    pub const EXT_LOCAL: u16 = 1 << 2;
    /// `ClientIP` session affinity (`LbService::affinity_timeout_s`).
    pub const AFFINITY: u16 = 1 << 3;
    /// Clients must match a prefix of this frontend in the source-range map.
    pub const SOURCE_RANGES: u16 = 1 << 4;
    /// Marker entry (port 0, protocol 0): the address is a service address,
    /// so TCP/UDP to a port it does not serve is rejected.
    pub const ADDRESS_MARKER: u16 = 1 << 5;
    /// No backend because a Local traffic policy left none on this node,
    /// while other nodes have some: new flows are dropped, not rejected
    /// (kube-proxy's `drop` verdict for that case).
    pub const NO_LOCAL_ENDPOINTS: u16 = 1 << 6;
    /// Never in the map: set by the datapath on its copy of a `ClusterIP`
    /// frontend when the packet's source is outside the cluster CIDRs
    /// (`config_flags::CLUSTER_CIDR`), so that a flow to an endpoint on
    /// another node is source-NATed as external traffic is.
    pub const OFF_CLUSTER_SOURCE: u16 = 1 << 15;
}

/// `Backend::flags` bits: the endpoint's state for its frontend.
pub mod backend_flags {
    /// No bits: an active backend on another node.
    pub const ACTIVE: u8 = 0;
    /// Backend takes no new flows (terminating, not ready, or left out by
    /// topology); its established flows go on. Also named by session
    /// affinity no more.
    pub const TERMINATING: u8 = 1 << 0;
    /// Backend runs on this node (external traffic to it keeps its source).
    pub const LOCAL: u8 = 1 << 1;
    /// With `TERMINATING`: the endpoint is not serving either. Its TCP flows
    /// go on (kube-proxy never clears TCP conntrack); its UDP flows move to
    /// a backend that takes new flows on their next datagram, when the
    /// frontend has one (kube-proxy's conntrack cleanup of UDP flows whose
    /// endpoint is not serving).
    pub const NOT_SERVING: u8 = 1 << 2;
    /// The agent's bookkeeping, not read by the datapath: the entry has an
    /// endpoint-index entry (`EndpointKey`), which only frontends with
    /// session affinity need (affinity recorded through another frontend
    /// of the Service port); at 100k Services the index for every backend
    /// was a third of the first sync's map writes.
    pub const INDEXED: u8 = 1 << 3;
}

/// Conntrack key directions (`CtKey::dir`).
pub mod ct_dir {
    /// Client -> service address; the entry names the chosen backend.
    pub const SERVICE: u8 = 0;
    /// Backend -> client; the entry names the frontend to restore.
    pub const REPLY: u8 = 1;
}

/// `CtEntry::flags` bits.
pub mod ct_flags {
    /// A TCP FIN or RST was seen: the entry gets the short timeout.
    pub const CLOSING: u32 = 1 << 0;
    /// The flow's source was translated too (`NodePort` to a remote backend,
    /// or hairpin, or a flow whose reply tuple another flow held: the
    /// client's own address with a remapped port): `nat_addr`/`nat_port_be`
    /// hold the other end of it.
    pub const SNAT: u32 = 1 << 1;
    /// The backend has answered: the entries moved from the map of new
    /// flows to the main conntrack map.
    pub const REPLIED: u32 = 1 << 2;
}

/// Conntrack lifetimes (nanoseconds since the last packet of the flow).
pub mod ct_timeout {
    /// Established TCP flow.
    pub const TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
    /// TCP flow after FIN or RST.
    pub const TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
    /// TCP flow the backend has not answered yet (SYN only), as the
    /// kernel's and Cilium's SYN timeouts.
    pub const TCP_UNANSWERED_NS: u64 = 60 * 1_000_000_000;
    /// UDP flow.
    pub const UDP_NS: u64 = 60 * 1_000_000_000;
    /// `last_seen_ns` is refreshed at most this often to save map writes.
    pub const REFRESH_NS: u64 = 1_000_000_000;
    /// How long after its last packet a closed TCP flow's reply tuple is
    /// not given to a new flow by source NAT (unless none of its candidate
    /// ports is free): the backend holds the tuple in `TIME_WAIT` that
    /// long (Linux: `TCP_TIMEWAIT_LEN`, 60 s, on a timer wheel level that
    /// fires up to 4 s late at HZ=1000; plus the refresh granularity
    /// above) and answers a new connection's SYN on it, whose timestamps
    /// are not the old connection's, with a bare ACK instead of a SYN+ACK
    /// half of the time (PAWS): a 1 s retransmission.
    pub const TCP_TIME_WAIT_NS: u64 = 66 * 1_000_000_000;
    /// How long after its first SYN a TCP (or SCTP) flow the client has
    /// not confirmed (no ACK from it: still in the map of new flows,
    /// answered by the backend or not) keeps its source-NAT tuple from a
    /// new flow none of whose candidates is free. After that the new flow
    /// takes the tuple and the old flow ends, as Linux's conntrack drops
    /// entries not yet assured first when its table is full
    /// (`early_drop`): else a spoofed SYN
    /// flood holds a port per flooded flow for the 60 s of
    /// `TCP_UNANSWERED_NS`, and new connections are dropped. A real client
    /// confirms within a round trip; one whose ACK was lost sends it again
    /// after the backend's SYN+ACK retransmission (1 s), and is reset if
    /// its tuple was taken meanwhile (docs/ARCHITECTURE.md).
    pub const TCP_UNCONFIRMED_HOLD_NS: u64 = 1_000_000_000;
}

/// Verdict reasons; index into the `REASONS` per-CPU array. A service
/// without backends is rejected (`REJECT`), never dropped: there is no
/// "no backend" drop.
pub mod reason {
    /// New flow to a service: backend chosen, destination translated.
    pub const NAT_NEW: u32 = 0;
    /// Packet of a tracked flow: destination translated.
    pub const NAT_ESTABLISHED: u32 = 1;
    /// Reply from a backend: source translated back to the service.
    pub const NAT_REPLY: u32 = 2;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
    pub const PASS_NOT_IP: u32 = 3;
    /// IP packet not for a service and not a reply: passed.
    pub const PASS_NO_SERVICE: u32 = 4;
    /// Header cut short at some layer: passed untouched.
    pub const PASS_TRUNCATED: u32 = 5;
    /// A fragment the datapath does not translate: of a protocol other
    /// than UDP, an IPv4 first fragment too short for the UDP header, an
    /// IPv6 fragment header after other extension headers: passed
    /// untouched (UDP fragments are translated, see `FragKey`).
    pub const PASS_FRAGMENT: u32 = 6;
    /// IPv6 extension header before L4: passed untouched.
    pub const PASS_EXT_HDR: u32 = 7;
    /// L4 protocol other than TCP/UDP (ICMP included, but for errors about
    /// translated flows: `NAT_ICMP_ERROR`): passed.
    pub const PASS_OTHER_PROTO: u32 = 8;
    /// IPv4 header with options (IHL > 5) or bad IHL: passed untouched.
    pub const PASS_IP_OPTIONS: u32 = 9;
    /// IPv6 UDP with a zero checksum (invalid, RFC 8200): passed untouched.
    pub const PASS_UDP6_ZERO_CSUM: u32 = 10;
    /// Slot points at a backend id missing from the backend map: dropped.
    pub const DROP_BACKEND_MISSING: u32 = 11;
    /// Conntrack insert failed: dropped.
    pub const DROP_CT_INSERT: u32 = 12;
    /// Packet rewrite (store or checksum helper) failed: dropped.
    pub const DROP_REWRITE: u32 = 13;
    /// No usable backend or unknown port of a service address: a TCP
    /// reset (TCP) or an ICMP port unreachable (UDP) sent back to the
    /// client.
    pub const REJECT: u32 = 14;
    /// Building the reject failed, or a refusal was due for an IPv6 first
    /// fragment (its port unreachable would have to quote the Fragment
    /// and UDP headers): dropped.
    pub const DROP_REJECT_FAILED: u32 = 15;
    /// Client outside the frontend's source ranges: dropped.
    pub const DROP_SOURCE_RANGE: u32 = 16;
    /// Source NAT needed but no node address of the family is configured,
    /// or no free port: dropped.
    pub const DROP_NO_SNAT: u32 = 17;
    /// A TCP reset where a reject was due: dropped, a reset is never
    /// answered.
    pub const DROP_RESET_UNANSWERED: u32 = 18;
    /// A socket's `connect()` or `sendmsg()` to a service was sent to a
    /// backend (socket-level load balancing; counted per call, not per packet).
    pub const SOCK_TRANSLATED: u32 = 19;
    /// A socket's `connect()` or `sendmsg()` to a service without usable
    /// endpoints (or to a port a `ClusterIP` does not serve) was refused
    /// with `ECONNREFUSED`.
    pub const SOCK_REFUSED: u32 = 20;
    /// A new flow to a frontend whose Local traffic policy left it no
    /// endpoint on this node (others have some): dropped, as kube-proxy.
    pub const DROP_NO_LOCAL_ENDPOINT: u32 = 21;
    /// VLAN-tagged frame (offloaded tag or 802.1Q / 802.1ad `EtherType`):
    /// passed untouched, its addresses belong to another network.
    pub const PASS_VLAN: u32 = 22;
    /// Frame addressed to another host's MAC (`PACKET_OTHERHOST`, seen in
    /// promiscuous mode): passed untouched, it is not ours to translate.
    pub const PASS_OTHER_HOST: u32 = 23;
    /// A refusal was due but its source must never be answered (multicast,
    /// broadcast, unspecified, loopback or martian source, a multicast or
    /// broadcast frame, a frame not addressed to this host): dropped.
    pub const DROP_REJECT_UNANSWERABLE: u32 = 24;
    /// A refusal was due but the interface's reply budget is spent
    /// (100/s, burst 1000, as Cilium's): dropped.
    pub const DROP_REJECT_RATE: u32 = 25;
    /// IPv4 total length, IPv6 payload length, TCP data offset or UDP
    /// length inconsistent with each other or with the packet (a zero IP
    /// length is BIG TCP's only on a GSO packet): passed untouched, no
    /// state created.
    pub const PASS_BAD_LENGTH: u32 = 26;
    /// A packet matching a reply entry came in on a pod-facing interface
    /// its source is not routed through (a pod spoofing a backend's
    /// address): dropped.
    pub const DROP_SPOOFED_SOURCE: u32 = 27;
    /// A TCP segment that cannot open a connection (no SYN, or an ACK
    /// with it) of a flow without conntrack entry: answered with a reset
    /// (RFC 9293), no state created. A reset is dropped instead
    /// (`DROP_RESET_UNANSWERED`).
    pub const REJECT_NO_FLOW: u32 = 28;
    /// Source NAT needed but every candidate port was taken: dropped (the
    /// agent logs it, `lb_snat_exhausted_total`).
    pub const DROP_SNAT_EXHAUSTED: u32 = 29;
    /// An ICMP / `ICMPv6` error (destination unreachable, fragmentation
    /// needed / packet too big, time exceeded, parameter problem) about a
    /// translated flow: its quoted packet and outer addresses translated
    /// back, so the host it reaches finds its socket (path-MTU discovery
    /// through a frontend).
    pub const NAT_ICMP_ERROR: u32 = 30;
    /// A UDP fragment other than the first of its datagram, whose first
    /// fragment was not translated on this device: not service traffic,
    /// or it overtook its first fragment, or its flow ended in between.
    /// Passed untouched, no state created (a non-first fragment carries no
    /// ports, so service traffic cannot be told from other traffic).
    pub const PASS_FRAG_UNTRACKED: u32 = 31;
    /// Number of reasons (size of the `REASONS` array).
    pub const COUNT: u32 = 32;

    /// Reason names for metrics and the CLI, indexed by reason number.
    pub const NAMES: [&str; COUNT as usize] = [
        "nat_new",
        "nat_established",
        "nat_reply",
        "pass_not_ip",
        "pass_no_service",
        "pass_truncated",
        "pass_fragment",
        "pass_ext_hdr",
        "pass_other_proto",
        "pass_ip_options",
        "pass_udp6_zero_csum",
        "drop_backend_missing",
        "drop_ct_insert",
        "drop_rewrite",
        "reject",
        "drop_reject_failed",
        "drop_source_range",
        "drop_no_snat",
        "drop_reset_unanswered",
        "sock_translated",
        "sock_refused",
        "drop_no_local_endpoint",
        "pass_vlan",
        "pass_other_host",
        "drop_reject_unanswerable",
        "drop_reject_rate",
        "pass_bad_length",
        "drop_spoofed_source",
        "reject_no_flow",
        "drop_snat_exhausted",
        "nat_icmp_error",
        "pass_frag_untracked",
    ];
}

/// What a packet did beside its verdict (a packet has one reason, and
/// `reason::*` counts each packet once); index into the `EVENTS` per-CPU
/// array.
pub mod event {
    /// A new flow's source NAT found none of its candidate ports free and
    /// took the tuple of a TCP flow its client had not confirmed for
    /// `ct_timeout::TCP_UNCONFIRMED_HOLD_NS`, and that flow ended (a SYN
    /// flood through a `NodePort` is the likely cause).
    pub const SNAT_TOOK_UNCONFIRMED: u32 = 0;
    /// Number of events (size of the `EVENTS` array).
    pub const COUNT: u32 = 1;
    /// Event names for metrics, indexed by event number.
    pub const NAMES: [&str; COUNT as usize] = ["snat_took_unconfirmed"];
}

/// An IPv4 address, network order.
pub type Addr4 = [u8; 4];
/// An IPv6 address, network order.
pub type Addr6 = [u8; 16];

/// The address types of the per-family maps: [`Addr4`] and [`Addr6`], and
/// nothing else (sealed): the layouts of the generic map types are asserted
/// for these two only.
pub trait MapAddr:
    Copy + Eq + Default + AsRef<[u8]> + AsMut<[u8]> + 'static + sealed::Sealed
{
}
impl MapAddr for Addr4 {}
impl MapAddr for Addr6 {}

mod sealed {
    /// Keeps [`super::MapAddr`] to the two address types.
    pub trait Sealed {}
    impl Sealed for super::Addr4 {}
    impl Sealed for super::Addr6 {}
}

/// Service key over an address `A` (`Addr4` or `Addr6`). Slot 0 is the
/// frontend; slots 1..=count hold backends.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbKey<A> {
    /// Service address (VIP), network order.
    pub addr: A,
    /// Service port, network byte order.
    pub dport_be: u16,
    /// 0 for the frontend, 1..=count for backend slots.
    pub backend_slot: u16,
    /// IP protocol number (`proto::TCP` / `proto::UDP`).
    pub proto: u8,
    /// `scope::*`.
    pub scope: u8,
    /// Zero.
    pub _pad: [u8; 2],
}
/// IPv4 service key.
pub type Lb4Key = LbKey<Addr4>;
/// IPv6 service key.
pub type Lb6Key = LbKey<Addr6>;

/// Service value; the same shape for both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbService {
    /// Slot > `limits::INLINE_SLOTS`: the backend id in that slot (those
    /// up to it are in slot 0's `slots`). Slot 0: the frontend's
    /// session-affinity group (`AffinityKey::group`), shared by every
    /// frontend of its Service port and family; never 0 with
    /// `svc_flags::AFFINITY`, 0 without.
    pub backend_id: u32,
    /// Slot 0: number of backend slots. Slot > 0: zero.
    pub count: u16,
    /// Slot 0: `svc_flags::*`. Slot > 0: zero.
    pub flags: u16,
    /// Slot 0: rev-NAT id of this frontend (also its stats index).
    pub rev_nat_id: u32,
    /// Slot 0 with `svc_flags::AFFINITY`: the session-affinity timeout
    /// (seconds). Otherwise zero.
    pub affinity_timeout_s: u32,
    /// Slot 0: the backend ids of slots 1 to `limits::INLINE_SLOTS`
    /// (those up to `count`; the rest zero). Otherwise zero.
    pub slots: [u32; limits::INLINE_SLOTS],
}

impl LbService {
    /// The backend id of slot SLOT (>= 1) of this frontend (slot 0's
    /// value) when the slot is one of its inline ones; `None` for a slot
    /// with an entry of its own (past `limits::INLINE_SLOTS`) and for 0.
    #[inline]
    #[must_use]
    pub fn inline_slot(&self, slot: u16) -> Option<u32> {
        let index = usize::from(slot).checked_sub(1)?;
        self.slots.get(index).copied()
    }
}

/// The index of backend `id`'s entry in its family's backend array: the
/// id without its family bit (`limits::BACKEND_ID_V6`).
#[must_use]
#[inline]
pub const fn backend_index(id: u32) -> u32 {
    id & !limits::BACKEND_ID_V6
}

/// Backend over an address `A`: one endpoint of one frontend. A flow or
/// an affinity entry naming it is valid only for that frontend, so an
/// endpoint shared by two frontends has an entry (and an id) in each.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend<A> {
    /// Backend address, network order.
    pub addr: A,
    /// Backend port, network byte order.
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `backend_flags::*`: its state for that frontend.
    pub flags: u8,
    /// The frontend (rev-NAT id) this entry belongs to; 0 in an entry
    /// that holds no backend (cleared, or a record).
    pub rev_nat_id: u32,
}
/// IPv4 backend.
pub type Lb4Backend = Backend<Addr4>;
/// IPv6 backend.
pub type Lb6Backend = Backend<Addr6>;

/// Reverse-NAT entry over an address `A`: what a reply's source is
/// rewritten to.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNat<A> {
    /// Service address, network order.
    pub addr: A,
    /// Service port, network byte order.
    pub port_be: u16,
    /// Zero.
    pub _pad: u16,
}
/// IPv4 reverse-NAT entry.
pub type Lb4RevNat = RevNat<Addr4>;
/// IPv6 reverse-NAT entry.
pub type Lb6RevNat = RevNat<Addr6>;

/// Conntrack key over an address `A`: the packet's own tuple as seen at
/// the hook.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    /// Source address, network order.
    pub saddr: A,
    /// Destination address, network order.
    pub daddr: A,
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `ct_dir::*`.
    pub dir: u8,
    /// Zero.
    pub _pad: [u8; 2],
}
/// IPv4 conntrack key.
pub type Ct4Key = CtKey<Addr4>;
/// IPv6 conntrack key.
pub type Ct6Key = CtKey<Addr6>;

/// Conntrack value; the same shape for both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns` when the flow was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_coarse_ns` of a recent packet (refreshed at most once per `REFRESH_NS`).
    pub last_seen_ns: u64,
    /// Backend the flow was sent to.
    pub backend_id: u32,
    /// Frontend the flow was addressed to.
    pub rev_nat_id: u32,
    /// `ct_flags::*`.
    pub flags: u32,
    /// Zero.
    pub _pad: u16,
    /// `SNAT` flows: the translated source port of the flow's other side
    /// (service entry: the port chosen on the node; reply entry: the
    /// client's own port), network byte order.
    pub nat_port_be: u16,
    /// `SNAT` flows: the matching address (service entry: the node or
    /// loopback address used as source; reply entry: the client's own
    /// address); IPv4 uses the first 4 bytes.
    pub nat_addr: [u8; 16],
}

/// Per-frontend counters (one per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbStats {
    /// Packets translated towards the service.
    pub packets: u64,
    /// Bytes (L3 length) translated towards the service.
    pub bytes: u64,
}

/// Session-affinity key over an address `A`: one per client and Service
/// port (and family), whichever of its frontends the client uses, as
/// kube-proxy's affinity sets are per Service port.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey<A> {
    /// Client address, network order.
    pub client: A,
    /// Affinity group of the Service port (`LbService::backend_id` of its
    /// frontends' slot 0).
    pub group: u32,
}
/// IPv4 session-affinity key.
pub type Affinity4Key = AffinityKey<Addr4>;
/// IPv6 session-affinity key.
pub type Affinity6Key = AffinityKey<Addr6>;

/// Session-affinity value; the same for both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    /// Backend the client was last sent to: the entry of the frontend it
    /// came through; another frontend of the group finds its own entry for
    /// the same endpoint in the endpoint index (`EndpointKey`).
    pub backend_id: u32,
    /// Zero.
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the client's last new flow to the frontend.
    pub last_used_ns: u64,
}

/// Endpoint-index key over an address `A`: a frontend and one of its
/// endpoints, whose value is that frontend's backend id for the endpoint
/// (written with every backend entry). The fields after `rev_nat_id` are
/// those of the endpoint's `Backend`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey<A> {
    /// The frontend (rev-NAT id).
    pub rev_nat_id: u32,
    /// Endpoint address, network order.
    pub addr: A,
    /// Endpoint port, network byte order.
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
}
/// IPv4 endpoint-index key.
pub type Endpoint4Key = EndpointKey<Addr4>;
/// IPv6 endpoint-index key.
pub type Endpoint6Key = EndpointKey<Addr6>;

/// Source-range LPM data over an address `A` (after the trie's
/// `prefix_len`): the frontend first (always matched in full: `prefix_len`
/// = 32 + range prefix), then the client prefix.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRange<A> {
    /// Frontend rev-NAT id, big-endian (LPM matches bytes in order).
    pub rev_nat_id_be: u32,
    /// Client address or prefix, network order.
    pub addr: A,
}
/// IPv4 source-range LPM data.
pub type SourceRange4 = SourceRange<Addr4>;
/// IPv6 source-range LPM data.
pub type SourceRange6 = SourceRange<Addr6>;

/// Fragment key over an address `A`: one datagram's fragments, as Cilium
/// tracks them (`ipv4_frag_id`, `ipv6_frag_id`). Only the first fragment
/// of a datagram carries its L4 header; the others are matched to its
/// ports through this key, which every fragment of the datagram carries
/// unchanged (before translation: the key is that of the fragments as
/// they arrive).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey<A> {
    /// Source address, network order.
    pub saddr: A,
    /// Destination address, network order.
    pub daddr: A,
    /// The datagram's identification as a number: IPv4's 16-bit header
    /// field, IPv6's 32-bit Fragment header field.
    pub id: u32,
    /// IP protocol number of the datagram (`proto::UDP`).
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
}
/// IPv4 fragment key.
pub type Frag4Key = FragKey<Addr4>;
/// IPv6 fragment key.
pub type Frag6Key = FragKey<Addr6>;

/// Fragment value; the same for both families: the L4 ports of the
/// datagram's first fragment (as it arrived, before translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragEntry {
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
}

/// Node configuration written by the agent (array of one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// Source for SNAT of IPv4 external traffic to remote backends (zero: none).
    pub node_addr4: [u8; 4],
    /// Source for hairpin flows over IPv4 (pod to its own service).
    pub loopback4: [u8; 4],
    /// Source for SNAT of IPv6 external traffic to remote backends (zero: none).
    pub node_addr6: [u8; 16],
    /// Source for hairpin flows over IPv6.
    pub loopback6: [u8; 16],
    /// `config_flags::*`.
    pub flags: u32,
    /// Random start of the SNAT port probe, chosen once per boot (kept
    /// while the pinned map lives), so that the node's ports are not
    /// predictable from the flows.
    pub snat_seed: u32,
}

/// `LB_IFACE_V1` values: what the agent knows of an attached interface
/// (bits).
pub mod iface_flags {
    /// Pods sit behind it (a veth): packets matching reply entries must
    /// come from a source routed through it.
    pub const POD_FACING: u32 = 1 << 0;
}

/// `LbConfig::flags` bits.
pub mod config_flags {
    /// `--forward=redirect`: a translated packet is sent to its egress
    /// device by the datapath (FIB lookup + `bpf_redirect`), skipping the
    /// node's netfilter FORWARD chain (and so `NetworkPolicy` engines that
    /// live there). Unset (the default): the stack routes it, as after
    /// kube-proxy's DNAT.
    pub const FORWARD_REDIRECT: u32 = 1 << 0;
    /// `--cluster-cidr` given: the source-range map holds the cluster's
    /// pod CIDRs under rev-NAT id 0 (`CLUSTER_CIDR_REV_NAT`), and a
    /// `ClusterIP` flow from outside them to an endpoint on another node
    /// is source-NATed to the node (kube-proxy's cluster-CIDR
    /// masquerade).
    pub const CLUSTER_CIDR: u32 = 1 << 1;
}

/// The rev-NAT id under which the source-range map holds the cluster
/// CIDRs (`config_flags::CLUSTER_CIDR`); never a frontend's.
pub const CLUSTER_CIDR_REV_NAT: u32 = 0;

/// Socket-level load balancing settings written by the agent (array of one
/// entry). All zero: off.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockConfig {
    /// Network namespace cookie (`SO_NETNS_COOKIE`) of the namespace whose
    /// sockets are translated when `sock_flags::ALL_NETNS` is not set: the
    /// agent's own (the node's).
    pub netns_cookie: u64,
    /// `sock_flags::*`.
    pub flags: u32,
    /// Zero.
    pub _pad: u32,
}

/// Socket reverse-translation key over an address `A`: a socket and the
/// backend it was sent to.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey<A> {
    /// Socket cookie (`bpf_get_socket_cookie`), native byte order (bytes,
    /// so that the key stays 4-aligned without padding).
    pub cookie: [u8; 8],
    /// Backend address, network order.
    pub addr: A,
    /// Backend port, network byte order.
    pub port_be: u16,
    /// Zero.
    pub _pad: u16,
}
/// IPv4 socket reverse-translation key.
pub type SockRevNat4Key = SockRevNatKey<Addr4>;
/// IPv6 socket reverse-translation key.
pub type SockRevNat6Key = SockRevNatKey<Addr6>;

/// Socket reverse-translation value over an address `A`: the frontend the
/// socket asked for.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat<A> {
    /// The address the socket asked for (a `ClusterIP`, a node address,
    /// `127.0.0.1` or `::1` for a `NodePort` on loopback), network order.
    pub addr: A,
    /// The port it asked for, network byte order.
    pub port_be: u16,
    /// Zero.
    pub _pad: u16,
    /// The frontend's rev-NAT id.
    pub rev_nat_id: u32,
}
/// IPv4 socket reverse-translation value.
pub type SockRevNat4 = SockRevNat<Addr4>;
/// IPv6 socket reverse-translation value.
pub type SockRevNat6 = SockRevNat<Addr6>;

/// A connected TCP socket's reverse translation in the slot table
/// (`map_names::SOCK_SLOTS4`): an array indexed by the socket cookie's low
/// bits. The kernel hands cookies out in increasing order, so the sockets
/// of one burst of connections write neighbouring slots (cache lines and
/// pages the CPU already holds), where a hash map's entry lands in a
/// random bucket of megabytes (measured: ~0.3 µs more per `connect()`,
/// most of a translated connect's cost). A socket has two slots: its
/// near one (the cookie's low 10 bits, `limits::SOCK_NEAR_SLOTS`: a
/// table's first slots, which short-lived connections keep reusing while
/// they stay cached) and its far one (the low 16 bits,
/// `limits::SOCK_SLOTS`: where a long-lived connection's neighbours go).
/// A slot belongs to its socket until the socket is released; a socket
/// whose two slots are both taken uses the reverse-translation map
/// (`SockRevNat`) instead.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockSlot<A> {
    /// The socket's cookie, native order; 0: a free slot.
    pub cookie: u64,
    /// The backend the socket was sent to (the peer the kernel reports),
    /// network order.
    pub backend: A,
    /// The address the socket asked for, network order.
    pub frontend: A,
    /// The backend's port, network byte order.
    pub backend_port_be: u16,
    /// The port the socket asked for, network byte order.
    pub frontend_port_be: u16,
    /// Zero.
    pub _pad: u32,
}
/// IPv4 socket slot.
pub type SockSlot4 = SockSlot<Addr4>;
/// IPv6 socket slot.
pub type SockSlot6 = SockSlot<Addr6>;

/// Session-affinity key of the node's sockets: kube-proxy keys affinity by
/// client address, which a socket does not have yet at `connect()`; its
/// network namespace stands for it (as Cilium's socket-LB does).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAffinityKey {
    /// Network namespace cookie, native byte order.
    pub netns_cookie: [u8; 8],
    /// Affinity group of the Service port and family (as
    /// `AffinityKey::group`; the group includes the family).
    pub group: u32,
}

/// First port of the range used for source NAT (on the node's address,
/// the loopback address, or the client's own address when its reply tuple
/// was taken). Below Linux's default ephemeral range (32768-60999), so
/// the node's and the clients' own connections never hold these tuples.
pub const SNAT_PORT_MIN: u16 = 1024;
/// Number of ports in that range (1024..=32767).
pub const SNAT_PORT_COUNT: u16 = 31_744;

/// Dry runs (`lb explain`, the conformance suite): a packet handed to
/// `BPF_PROG_TEST_RUN` with `skb->mark == probe::MARK` goes through the
/// whole pipeline but writes no map (conntrack, affinity, counters), and
/// the program answers in `cb[0]`.
pub mod probe {
    /// `skb->mark` of a dry-run packet (`LBxp`). Marks do not cross a
    /// network namespace boundary on veth (the pod's packets arrive with
    /// 0), so only something on the node itself could set it.
    pub const MARK: u32 = 0x4c42_7870;
    /// `cb[0]` after a dry run: `ANSWER | reason`, so a program without the
    /// dry-run gate (which leaves `cb[0]` alone) is recognised.
    pub const ANSWER: u32 = 0x7072_0000;
    /// The reason bits of the answer.
    pub const REASON_MASK: u32 = 0xffff;
}

/// The XDP program (`prog_names::XDP_LB`, `--xdp`): its names and counters.
pub mod xdp {
    /// Program name: north-south translation at the driver of uplinks.
    pub const PROG: &str = "lb_xdp";
    /// Empty XDP program: the measurement floor of `xdp_cost`.
    pub const FLOOR: &str = "lb_xdp_floor";
    /// Per-CPU counters of the XDP program, indexed by `stat::*` (pinned
    /// with the other maps: what `lb status` and the metrics read).
    pub const STATS_MAP: &str = "LB_XDP_STATS_V1";
    /// Devices translated frames may be redirected to (`DEVMAP_HASH`,
    /// ifindex -> ifindex; not pinned: the loader fills it at attach).
    pub const DEVMAP: &str = "LB_XDP_DEV_V1";
    /// Entries of `DEVMAP`.
    pub const DEVMAP_ENTRIES: u32 = 1024;
    /// What the XDP program did with a frame: the indices of `STATS_MAP`.
    pub mod stat {
        /// Left to TC unchanged (not ours, or something XDP does not do).
        pub const TO_TC: u32 = 0;
        /// Translated and handed to the stack (the FIB could not place it:
        /// a local backend, no neighbour yet, a device not in `DEVMAP`).
        pub const PASS_TRANSLATED: u32 = 1;
        /// Translated and sent back out of the device it came in on.
        pub const TX: u32 = 2;
        /// Translated and redirected to another device (`DEVMAP`).
        pub const REDIRECT: u32 = 3;
        /// Dropped (source range, spoofed reply, rewrite failure): the
        /// reason is counted as at TC.
        pub const DROP: u32 = 4;
        /// Number of counters.
        pub const COUNT: u32 = 5;
        /// Counter names (`lb status`, metrics label), by index.
        pub const NAMES: [&str; COUNT as usize] =
            ["to_tc", "pass_translated", "tx", "redirect", "drop"];
    }
}

const _: () = assert!(size_of::<Lb4Key>() == 12);
const _: () = assert!(size_of::<Lb6Key>() == 24);
const _: () = assert!(size_of::<LbService>() == 16 + 4 * limits::INLINE_SLOTS);
const _: () = assert!(size_of::<Lb4Backend>() == 12);
const _: () = assert!(size_of::<Lb6Backend>() == 24);
const _: () = assert!(size_of::<Lb4RevNat>() == 8);
const _: () = assert!(size_of::<Lb6RevNat>() == 20);
const _: () = assert!(size_of::<Ct4Key>() == 16);
const _: () = assert!(size_of::<Ct6Key>() == 40);
const _: () = assert!(size_of::<CtEntry>() == 48);
const _: () = assert!(size_of::<Affinity4Key>() == 8);
const _: () = assert!(size_of::<Affinity6Key>() == 20);
const _: () = assert!(size_of::<AffinityEntry>() == 16);
const _: () = assert!(size_of::<Endpoint4Key>() == 12);
const _: () = assert!(size_of::<Endpoint6Key>() == 24);
const _: () = assert!(size_of::<SourceRange4>() == 8);
const _: () = assert!(size_of::<SourceRange6>() == 20);
const _: () = assert!(size_of::<LbConfig>() == 48);
const _: () = assert!(size_of::<LbStats>() == 16);
const _: () = assert!(size_of::<SockConfig>() == 16);
const _: () = assert!(size_of::<SockRevNat4Key>() == 16);
const _: () = assert!(size_of::<SockRevNat6Key>() == 28);
const _: () = assert!(size_of::<SockRevNat4>() == 12);
const _: () = assert!(size_of::<SockRevNat6>() == 24);
const _: () = assert!(size_of::<SockSlot4>() == 24);
const _: () = assert!(size_of::<SockSlot6>() == 48);
const _: () = assert!(size_of::<SockAffinityKey>() == 12);
const _: () = assert!(size_of::<Frag4Key>() == 16);
const _: () = assert!(size_of::<Frag6Key>() == 40);
const _: () = assert!(size_of::<FragEntry>() == 4);
// Keys and values holding addresses are 4-aligned (no padding added: every
// size above is a multiple of 4), so that the eBPF side copies addresses
// word by word instead of byte by byte.
const _: () = assert!(align_of::<Lb4Key>() == 4 && align_of::<Lb6Key>() == 4);
const _: () = assert!(align_of::<Lb4Backend>() == 4 && align_of::<Lb6Backend>() == 4);
const _: () = assert!(align_of::<Lb4RevNat>() == 4 && align_of::<Lb6RevNat>() == 4);
const _: () = assert!(align_of::<Ct4Key>() == 4 && align_of::<Ct6Key>() == 4);
const _: () = assert!(align_of::<Affinity4Key>() == 4 && align_of::<Affinity6Key>() == 4);
const _: () = assert!(align_of::<Endpoint4Key>() == 4 && align_of::<Endpoint6Key>() == 4);
const _: () = assert!(align_of::<SourceRange4>() == 4 && align_of::<SourceRange6>() == 4);
const _: () = assert!(align_of::<Frag4Key>() == 4 && align_of::<Frag6Key>() == 4);

#[cfg(feature = "user")]
mod pod {
    use super::{
        AffinityEntry, AffinityKey, Backend, CtEntry, CtKey, EndpointKey, FragEntry, FragKey,
        LbConfig, LbKey, LbService, LbStats, MapAddr, RevNat, SockAffinityKey, SockConfig,
        SockRevNat, SockRevNatKey, SockSlot, SourceRange,
    };
    // SAFETY: all are repr(C), Copy, with explicit padding: every bit
    // pattern is valid and no byte is uninitialised. The generic ones only
    // for `MapAddr` (sealed: `Addr4` and `Addr6`), the two address types
    // whose layouts are asserted above.
    unsafe impl<A: MapAddr> aya::Pod for LbKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for Backend<A> {}
    unsafe impl<A: MapAddr> aya::Pod for RevNat<A> {}
    unsafe impl<A: MapAddr> aya::Pod for CtKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for AffinityKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for EndpointKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for SourceRange<A> {}
    unsafe impl<A: MapAddr> aya::Pod for SockRevNatKey<A> {}
    unsafe impl<A: MapAddr> aya::Pod for SockRevNat<A> {}
    unsafe impl<A: MapAddr> aya::Pod for SockSlot<A> {}
    unsafe impl<A: MapAddr> aya::Pod for FragKey<A> {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for SockAffinityKey {}
    unsafe impl aya::Pod for SockConfig {}
    unsafe impl aya::Pod for LbService {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for LbStats {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for LbConfig {}
}

#[cfg(test)]
mod tests {
    use super::{LbService, limits, reason};

    /// Slots 1 to `INLINE_SLOTS` are read from the frontend's own value;
    /// slot 0 (the frontend itself) and later slots are not.
    #[test]
    fn inline_slots_are_the_first_ones() {
        let mut frontend = LbService::default();
        for (index, id) in frontend.slots.iter_mut().enumerate() {
            *id = 100 + u32::try_from(index).unwrap();
        }
        let last = u16::try_from(limits::INLINE_SLOTS).unwrap();
        assert_eq!(frontend.inline_slot(0), None);
        assert_eq!(frontend.inline_slot(1), Some(100));
        assert_eq!(frontend.inline_slot(last), Some(100 + u32::from(last) - 1));
        assert_eq!(frontend.inline_slot(last + 1), None);
    }

    /// Each reason number names its own metric: the agent zips `NAMES`
    /// with the indices, so a renumbering must move the names with it.
    #[test]
    fn every_reason_indexes_its_own_name() {
        let pairs = [
            (reason::NAT_NEW, "nat_new"),
            (reason::NAT_ESTABLISHED, "nat_established"),
            (reason::NAT_REPLY, "nat_reply"),
            (reason::PASS_NOT_IP, "pass_not_ip"),
            (reason::PASS_NO_SERVICE, "pass_no_service"),
            (reason::PASS_TRUNCATED, "pass_truncated"),
            (reason::PASS_FRAGMENT, "pass_fragment"),
            (reason::PASS_EXT_HDR, "pass_ext_hdr"),
            (reason::PASS_OTHER_PROTO, "pass_other_proto"),
            (reason::PASS_IP_OPTIONS, "pass_ip_options"),
            (reason::PASS_UDP6_ZERO_CSUM, "pass_udp6_zero_csum"),
            (reason::DROP_BACKEND_MISSING, "drop_backend_missing"),
            (reason::DROP_CT_INSERT, "drop_ct_insert"),
            (reason::DROP_REWRITE, "drop_rewrite"),
            (reason::REJECT, "reject"),
            (reason::DROP_REJECT_FAILED, "drop_reject_failed"),
            (reason::DROP_SOURCE_RANGE, "drop_source_range"),
            (reason::DROP_NO_SNAT, "drop_no_snat"),
            (reason::DROP_RESET_UNANSWERED, "drop_reset_unanswered"),
            (reason::SOCK_TRANSLATED, "sock_translated"),
            (reason::SOCK_REFUSED, "sock_refused"),
            (reason::DROP_NO_LOCAL_ENDPOINT, "drop_no_local_endpoint"),
            (reason::PASS_VLAN, "pass_vlan"),
            (reason::PASS_OTHER_HOST, "pass_other_host"),
            (reason::DROP_REJECT_UNANSWERABLE, "drop_reject_unanswerable"),
            (reason::DROP_REJECT_RATE, "drop_reject_rate"),
            (reason::PASS_BAD_LENGTH, "pass_bad_length"),
            (reason::DROP_SPOOFED_SOURCE, "drop_spoofed_source"),
            (reason::REJECT_NO_FLOW, "reject_no_flow"),
            (reason::DROP_SNAT_EXHAUSTED, "drop_snat_exhausted"),
            (reason::NAT_ICMP_ERROR, "nat_icmp_error"),
            (reason::PASS_FRAG_UNTRACKED, "pass_frag_untracked"),
        ];
        assert_eq!(pairs.len(), reason::COUNT as usize);
        for (index, name) in pairs {
            assert_eq!(reason::NAMES[index as usize], name);
        }
    }
}
