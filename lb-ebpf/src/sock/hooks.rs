//! The socket programs' work over both families (see `sock`).

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns,
        bpf_set_retval,
    },
    maps::{Array, LruHashMap},
    programs::{SockAddrContext, SockContext},
};
use lb_common::{
    Addr4, Addr6, AffinityEntry, Backend, LbService, SockAffinityKey, SockRevNat, SockRevNatKey,
    SockSlot, proto, reason, sock_flags, svc_flags,
};

use super::policy::{
    addr_from_word, addr6_from_words, filter_slot, fold_words, is_loopback4, is_loopback6,
    is_v4_mapped, port_from_user, port_to_user, served_protocol, slot_seed, socket_slots,
    translates, word_from_addr, words_from_addr6,
};
use crate::{
    family::{Family, V4, V6},
    hash::slot_for,
    lb,
    maps::{
        LB_CONFIG_V3, LB_SK_AFF_V2, LB_SK_RNAT_CNT_V1, LB_SOCK_CFG_V1, LB4_SK_RNAT_V1,
        LB4_SK_SLOT_V1, LB6_SK_RNAT_V1, LB6_SK_SLOT_V1, count_reason,
    },
};

/// `ECONNREFUSED`: what `connect()`/`sendmsg()` to a service without
/// usable endpoints fails with (`bpf_set_retval` takes it negated).
pub(crate) const ECONNREFUSED: i32 = 111;
/// `EADDRINUSE`: what `bind()` to a `NodePort` fails with.
pub(crate) const EADDRINUSE: i32 = 98;
/// `AF_INET` (`bpf_sock::family`).
pub(crate) const AF_INET: u32 = 2;
/// `AF_INET6`.
pub(crate) const AF_INET6: u32 = 10;

/// A cgroup program's "go on with the call".
const ALLOW: i32 = 1;
/// A cgroup program's "fail the call" (with the error `bpf_set_retval` set).
const REFUSE: i32 = 0;

/// What a family adds for the socket programs.
trait SockFamily: Family {
    /// This family's socket reverse-translation map.
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey<Self::Addr>, SockRevNat<Self::Addr>>;
    /// This family's TCP socket slots.
    fn sock_slots() -> &'static Array<SockSlot<Self::Addr>>;
    /// True for the loopback addresses a `NodePort` is reached on.
    fn is_loopback(addr: &Self::Addr) -> bool;
    /// The address as one word, for `policy::filter_slot`.
    fn fold(addr: &Self::Addr) -> u32;
}

impl SockFamily for V4 {
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey<Addr4>, SockRevNat<Addr4>> {
        &LB4_SK_RNAT_V1
    }
    #[inline(always)]
    fn sock_slots() -> &'static Array<SockSlot<Addr4>> {
        &LB4_SK_SLOT_V1
    }
    #[inline(always)]
    fn is_loopback(addr: &Addr4) -> bool {
        is_loopback4(addr)
    }
    #[inline(always)]
    fn fold(addr: &Addr4) -> u32 {
        word_from_addr(*addr)
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey<Addr6>, SockRevNat<Addr6>> {
        &LB6_SK_RNAT_V1
    }
    #[inline(always)]
    fn sock_slots() -> &'static Array<SockSlot<Addr6>> {
        &LB6_SK_SLOT_V1
    }
    #[inline(always)]
    fn is_loopback(addr: &Addr6) -> bool {
        is_loopback6(addr)
    }
    #[inline(always)]
    fn fold(addr: &Addr6) -> u32 {
        fold_words(words_from_addr6(addr))
    }
}

/// What becomes of a `sock_addr` call.
enum Outcome<A> {
    /// Not for a service (or not a socket we translate): as asked.
    Untouched,
    /// Refused with this errno: `ECONNREFUSED` (no usable endpoint, or a
    /// port the `ClusterIP` does not serve) or `EADDRINUSE` (bind guard).
    Refuse(i32),
    /// The call's address and port (network order) become these.
    To(A, u16),
}

impl<A> Outcome<A> {
    /// The same outcome with the address made a B.
    #[inline(always)]
    fn map<B>(self, f: impl FnOnce(A) -> B) -> Outcome<B> {
        match self {
            Self::Untouched => Outcome::Untouched,
            Self::Refuse(errno) => Outcome::Refuse(errno),
            Self::To(addr, port_be) => Outcome::To(f(addr), port_be),
        }
    }
}

/// The address of a `sock_addr` call as the context holds it.
#[derive(Clone, Copy)]
enum UserAddr {
    /// An IPv4 socket's `user_ip4`.
    V4(u32),
    /// An IPv6 socket's `user_ip6` (IPv4-mapped ones included).
    V6([u32; 4]),
}

impl UserAddr {
    /// Reads it (`V6`: from `user_ip6`; 4-byte reads, the only width the
    /// verifier allows there).
    #[inline(always)]
    fn read<const IS_V6: bool>(ctx: &SockAddrContext) -> Self {
        let sa = ctx.sock_addr;
        if IS_V6 {
            // SAFETY: the context; 4-byte reads.
            Self::V6(unsafe {
                [
                    read_volatile(&raw const (*sa).user_ip6[0]),
                    read_volatile(&raw const (*sa).user_ip6[1]),
                    read_volatile(&raw const (*sa).user_ip6[2]),
                    read_volatile(&raw const (*sa).user_ip6[3]),
                ]
            })
        } else {
            // SAFETY: the context; a 4-byte read.
            Self::V4(unsafe { read_volatile(&raw const (*sa).user_ip4) })
        }
    }

    /// Writes it back (4-byte writes).
    #[inline(always)]
    fn write(self, ctx: &SockAddrContext) {
        let sa = ctx.sock_addr;
        // SAFETY: the context; 4-byte writes.
        unsafe {
            match self {
                Self::V4(word) => write_volatile(&raw mut (*sa).user_ip4, word),
                Self::V6(words) => {
                    write_volatile(&raw mut (*sa).user_ip6[0], words[0]);
                    write_volatile(&raw mut (*sa).user_ip6[1], words[1]);
                    write_volatile(&raw mut (*sa).user_ip6[2], words[2]);
                    write_volatile(&raw mut (*sa).user_ip6[3], words[3]);
                }
            }
        }
    }
}

/// The family-generic body of one kind of `sock_addr` call.
trait SockCall {
    /// The outcome for a call to `addr:port_be` of family F.
    fn on<F: SockFamily>(
        &self,
        ctx: &SockAddrContext,
        addr: F::Addr,
        port_be: u16,
    ) -> Outcome<F::Addr>;
}

/// Runs CALL on the context's address: an IPv4 socket's as IPv4, an IPv6
/// socket's as IPv6, an IPv4-mapped one as IPv4 (written back still
/// mapped); writes back what it translated to, or fails the call.
#[inline(always)]
fn on_call<const IS_V6: bool, C: SockCall>(ctx: &SockAddrContext, call: &C) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context; a 4-byte read.
    let port_be = port_from_user(unsafe { read_volatile(&raw const (*sa).user_port) });
    let outcome = match UserAddr::read::<IS_V6>(ctx) {
        UserAddr::V4(word) => call
            .on::<V4>(ctx, addr_from_word(word), port_be)
            .map(|addr| UserAddr::V4(word_from_addr(addr))),
        UserAddr::V6(words) if is_v4_mapped(words) => call
            .on::<V4>(ctx, addr_from_word(words[3]), port_be)
            .map(|addr| {
                let mut mapped = words;
                mapped[3] = word_from_addr(addr);
                UserAddr::V6(mapped)
            }),
        UserAddr::V6(words) => call
            .on::<V6>(ctx, addr6_from_words(words), port_be)
            .map(|addr| UserAddr::V6(words_from_addr6(&addr))),
    };
    match outcome {
        Outcome::Untouched => ALLOW,
        Outcome::Refuse(errno) => refuse(errno),
        Outcome::To(user, port_be) => {
            user.write(ctx);
            // SAFETY: the context; a 4-byte write.
            unsafe { write_volatile(&raw mut (*sa).user_port, port_to_user(port_be)) };
            ALLOW
        }
    }
}

/// The socket's protocol (`IPPROTO_TCP`, `IPPROTO_UDP`, ...).
#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the context; a 4-byte read.
    unsafe { read_volatile(&raw const (*ctx.sock_addr).protocol) }
}

/// `connect()` / `sendmsg()`: to a chosen backend.
struct Connect {
    /// `connect()`: the socket's reverse entry is dropped when it is
    /// released (`sendmsg()`'s are left to the LRU).
    connected: bool,
}

impl SockCall for Connect {
    #[inline(always)]
    fn on<F: SockFamily>(
        &self,
        ctx: &SockAddrContext,
        addr: F::Addr,
        port_be: u16,
    ) -> Outcome<F::Addr> {
        let outcome = forward::<F>(ctx, addr, port_be, protocol(ctx), self.connected);
        if matches!(outcome, Outcome::To(..)) {
            count_reason(reason::SOCK_TRANSLATED);
        }
        outcome
    }
}

/// `getpeername()` / `recvmsg()`: the backend shows as the frontend.
struct Reverse;

impl SockCall for Reverse {
    #[inline(always)]
    fn on<F: SockFamily>(
        &self,
        ctx: &SockAddrContext,
        addr: F::Addr,
        port_be: u16,
    ) -> Outcome<F::Addr> {
        match reverse::<F>(ctx, addr, port_be) {
            Some((addr, port_be)) => Outcome::To(addr, port_be),
            None => Outcome::Untouched,
        }
    }
}

/// `bind()`: refused on an external frontend's port (bind guard).
struct Bind;

impl SockCall for Bind {
    #[inline(always)]
    fn on<F: SockFamily>(
        &self,
        ctx: &SockAddrContext,
        addr: F::Addr,
        port_be: u16,
    ) -> Outcome<F::Addr> {
        if bind_taken::<F>(ctx, addr, port_be, protocol(ctx)) {
            Outcome::Refuse(EADDRINUSE)
        } else {
            Outcome::Untouched
        }
    }
}

/// `connect()` on an IPv4 socket.
#[inline(always)]
pub(crate) fn connect4(ctx: &SockAddrContext) -> i32 {
    on_call::<false, _>(ctx, &Connect { connected: true })
}

/// `connect()` on an IPv6 socket; an IPv4-mapped address is served from
/// the IPv4 maps and stays mapped.
#[inline(always)]
pub(crate) fn connect6(ctx: &SockAddrContext) -> i32 {
    on_call::<true, _>(ctx, &Connect { connected: true })
}

/// `sendmsg()` with an address on an IPv4 socket.
#[inline(always)]
pub(crate) fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    on_call::<false, _>(ctx, &Connect { connected: false })
}

/// `sendmsg()` with an address on an IPv6 socket (IPv4-mapped as IPv4).
#[inline(always)]
pub(crate) fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    on_call::<true, _>(ctx, &Connect { connected: false })
}

/// `getpeername()` / `recvmsg()` on an IPv4 socket: the backend the
/// socket was sent to shows as the frontend it asked for.
#[inline(always)]
pub(crate) fn reverse4(ctx: &SockAddrContext) -> i32 {
    on_call::<false, _>(ctx, &Reverse)
}

/// `getpeername()` / `recvmsg()` on an IPv6 socket (IPv4-mapped included).
#[inline(always)]
pub(crate) fn reverse6(ctx: &SockAddrContext) -> i32 {
    on_call::<true, _>(ctx, &Reverse)
}

/// Socket release: drops the reverse entry of a connected socket (its
/// peer is the backend it was sent to). Entries of unconnected UDP
/// sockets, which may have sent to many, are left to the LRU.
///
/// Every socket of the cgroup is released through here, most of them
/// never translated. Looking a socket up in a reverse-translation map
/// costs ~0.4 µs when its bucket is not in the CPU's caches (measured with
/// BPF run-time statistics: 4 MiB of buckets per map, one random bucket
/// per cookie), which is the case for a socket without an entry; and
/// asking for its cookie makes the kernel give it one. So a small array
/// of counters (the filter, 256 KiB) says which peers may have connected
/// sockets with an entry: `connect()` counts an entry in under the
/// backend it chose, the release that drops it counts it out, and a socket
/// whose peer's counter is 0 is done after one array read. A counter left
/// high (an entry evicted by the LRU before its socket went, a UDP socket
/// connected twice) only costs the sockets of its peers that lookup
/// again.
#[inline(always)]
pub(crate) fn release(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the context; plain field reads.
    let (family, port_be, protocol) = unsafe {
        (
            read_volatile(&raw const (*sk).family),
            read_volatile(&raw const (*sk).dst_port),
            read_volatile(&raw const (*sk).protocol),
        )
    };
    let tcp = protocol == u32::from(proto::TCP);
    if port_be == 0 {
        if tcp {
            release_without_peer(ctx, family);
        }
        return ALLOW;
    }
    if family == AF_INET {
        // SAFETY: the context; a 4-byte read.
        let ip = unsafe { read_volatile(&raw const (*sk).dst_ip4) };
        release_peer::<V4>(ctx, tcp, addr_from_word(ip), port_be);
    } else if family == AF_INET6 {
        // SAFETY: the context; 4-byte reads.
        let words = unsafe {
            [
                read_volatile(&raw const (*sk).dst_ip6[0]),
                read_volatile(&raw const (*sk).dst_ip6[1]),
                read_volatile(&raw const (*sk).dst_ip6[2]),
                read_volatile(&raw const (*sk).dst_ip6[3]),
            ]
        };
        if is_v4_mapped(words) {
            release_peer::<V4>(ctx, tcp, addr_from_word(words[3]), port_be);
        } else {
            release_peer::<V6>(ctx, tcp, addr6_from_words(words), port_be);
        }
    }
    ALLOW
}

/// Frees the slot of a TCP socket released without a peer. A `connect()`
/// that fails (refused, timed out) disconnects the socket, which clears
/// its peer's port, so its release cannot find the peer the filter counts
/// it under; its slot, if it took one, names that peer. Asking for the
/// cookie gives one to a socket that had none (a listener, a socket that
/// never connected): tens of nanoseconds, on sockets that are rare here.
/// An IPv6 socket's record may be in either family's table (an
/// IPv4-mapped peer's is in the IPv4 one).
#[inline(always)]
fn release_without_peer(ctx: &SockContext, family: u32) {
    // SAFETY: helper on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if family == AF_INET6 && free_held_slot::<V6>(cookie) {
        return;
    }
    if family == AF_INET || family == AF_INET6 {
        free_held_slot::<V4>(cookie);
    }
}

/// Frees the slot COOKIE holds, counted out of the filter under the
/// backend it names; false if it holds none.
#[inline(always)]
fn free_held_slot<F: SockFamily>(cookie: u64) -> bool {
    let Some(slot) = held_slot::<F>(cookie) else {
        return false;
    };
    // SAFETY: an array element, valid while the program runs.
    let (backend, port_be) = unsafe { ((*slot).backend, (*slot).backend_port_be) };
    free_slot(slot, filter_counter::<F>(&backend, port_be));
    true
}

/// Frees SLOT, its holder counted out of the filter at COUNTER first (see
/// `forward`).
#[inline(always)]
fn free_slot<A>(slot: *mut SockSlot<A>, counter: Option<*mut u64>) {
    if let Some(counter) = counter {
        count(counter, u64::MAX);
    }
    // SAFETY: an array element, valid while the program runs.
    unsafe { write_volatile(&raw mut (*slot).cookie, 0) };
}

/// Drops the reverse entry of a released socket connected to
/// `addr:port_be` (TCP: its slot first), if the filter says it may have
/// one.
#[inline(always)]
fn release_peer<F: SockFamily>(ctx: &SockContext, tcp: bool, addr: F::Addr, port_be: u16) {
    let Some(counter) = filter_counter::<F>(&addr, port_be) else {
        return;
    };
    // SAFETY: an array element, valid while the program runs.
    if unsafe { read_volatile(counter) } == 0 {
        return;
    }
    // SAFETY: helper on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if tcp && let Some(slot) = held_slot::<F>(cookie) {
        free_slot(slot, Some(counter));
    } else if forget::<F>(cookie.to_ne_bytes(), addr, port_be) {
        count(counter, u64::MAX);
    }
}

/// `bind()` on an IPv4 socket: refused with `EADDRINUSE` when the address
/// and port are a `NodePort` frontend on a node address (or the wildcard
/// address with a `NodePort`), so that a host process cannot take a
/// `NodePort`'s traffic (`--socket-lb-bind-guard`).
#[inline(always)]
pub(crate) fn bind4(ctx: &SockAddrContext) -> i32 {
    on_call::<false, _>(ctx, &Bind)
}

/// `bind()` on an IPv6 socket (IPv4-mapped addresses as IPv4).
#[inline(always)]
pub(crate) fn bind6(ctx: &SockAddrContext) -> i32 {
    on_call::<true, _>(ctx, &Bind)
}

/// True when binding `addr:port_be` would take the port of an external
/// frontend (a `NodePort` on a node address, an external or load-balancer
/// IP) in a namespace we translate. The wildcard address stands for the
/// first node address of the family (the one the agent configures).
#[inline(always)]
fn bind_taken<F: SockFamily>(
    ctx: &SockAddrContext,
    addr: F::Addr,
    port_be: u16,
    protocol: u32,
) -> bool {
    if port_be == 0 || !served_protocol(protocol) {
        return false;
    }
    let Some(config) = LB_SOCK_CFG_V1.get(0) else {
        return false;
    };
    // SAFETY: helper on the context.
    if config.flags & sock_flags::BIND_GUARD == 0
        || !translates(config, unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
    {
        return false;
    }
    let lookup = if F::is_unspecified(&addr) {
        let Some(node) = LB_CONFIG_V3.get(0) else {
            return false;
        };
        F::node_addr(node)
    } else {
        addr
    };
    #[expect(clippy::cast_possible_truncation, reason = "TCP or UDP, checked above")]
    let l4_proto = protocol as u8;
    // SAFETY: only the flags are read, at once.
    unsafe { lb::frontend::<F>(lookup, port_be, l4_proto) }
        .is_some_and(|f| f.flags & svc_flags::EXTERNAL != 0)
}

/// The decision for a `connect()` / `sendmsg()` to `daddr:dport_be`.
#[inline(always)]
fn forward<F: SockFamily>(
    ctx: &SockAddrContext,
    daddr: F::Addr,
    dport_be: u16,
    protocol: u32,
    connected: bool,
) -> Outcome<F::Addr> {
    if !served_protocol(protocol) {
        return Outcome::Untouched;
    }
    let Some(config) = LB_SOCK_CFG_V1.get(0) else {
        return Outcome::Untouched;
    };
    // SAFETY: helper on the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !translates(config, netns) {
        return Outcome::Untouched;
    }
    #[expect(clippy::cast_possible_truncation, reason = "TCP or UDP, checked above")]
    let l4_proto = protocol as u8;
    let mut lookup = daddr;
    // Read in place, not copied (64 bytes with its inline slots): an
    // update of the map replaces the element, and the one read stays whole
    // while the program runs (RCU).
    // SAFETY: read in place while the program runs (above).
    let mut frontend = unsafe { lb::frontend::<F>(daddr, dport_be, l4_proto) };
    // A `NodePort` on loopback: served as on the (first) node address.
    if frontend.is_none()
        && F::is_loopback(&daddr)
        && let Some(node) = LB_CONFIG_V3.get(0)
    {
        let node = F::node_addr(node);
        if !F::is_unspecified(&node) {
            lookup = node;
            // SAFETY: read in place while the program runs (above).
            frontend = unsafe { lb::frontend::<F>(node, dport_be, l4_proto) };
        }
    }
    let Some(frontend) = frontend else {
        // A port a `ClusterIP` does not serve: refused, as the TC path does.
        if lb::is_service_address::<F>(daddr) {
            return Outcome::Refuse(ECONNREFUSED);
        }
        return Outcome::Untouched;
    };
    if frontend.count == 0 {
        return Outcome::Refuse(ECONNREFUSED);
    }
    // SAFETY: helper on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Claimed before the choice: when the near slot is taken, the far
    // one is rarely in the CPU's caches, and the read's miss then overlaps
    // the lookups.
    let slot = if l4_proto == proto::TCP {
        SlotClaim::<F>::claim(cookie)
    } else {
        None
    };
    let Some((_, backend)) = choose::<F>(frontend, lookup, dport_be, l4_proto, cookie, netns)
    else {
        return Outcome::Refuse(ECONNREFUSED);
    };
    let key = SockRevNatKey {
        cookie: cookie.to_ne_bytes(),
        addr: backend.addr,
        port_be: backend.port_be,
        _pad: 0,
    };
    let value = SockRevNat {
        addr: daddr,
        port_be: dport_be,
        _pad: 0,
        rev_nat_id: frontend.rev_nat_id,
    };
    // The filter counts the entry in before it is written, and out again
    // if none is: an atomic add waits for every store before it to leave
    // the CPU, and the slot's stores miss the cache (BPF run-time
    // statistics: a translated connect() took 270-460 ns with the add
    // after them, 230-360 ns now).
    let counter = if connected {
        filter_counter::<F>(&backend.addr, backend.port_be)
    } else {
        None
    };
    if let Some(counter) = counter {
        count(counter, 1);
    }
    // A TCP connection's own slot if one is free, else the map. Best
    // effort (an LRU): without either the socket still reaches the
    // backend, only `getpeername()`/`recvmsg()` would show the backend.
    let remembered = if let Some(slot) = slot {
        slot.record(cookie, daddr, dport_be, &backend);
        true
    } else {
        F::sock_revnat().insert(&key, &value, 0).is_ok()
    };
    if !remembered && let Some(counter) = counter {
        count(counter, u64::MAX);
    }
    Outcome::To(backend.addr, backend.port_be)
}

/// The backend of a new connection: the namespace's affinity if it has a
/// live one, else a slot (see `policy::slot_seed`).
#[inline(always)]
fn choose<F: SockFamily>(
    frontend: &LbService,
    daddr: F::Addr,
    dport_be: u16,
    l4_proto: u8,
    cookie: u64,
    netns: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    let affinity = frontend.flags & svc_flags::AFFINITY != 0;
    // Per Service port and family (the frontend's group), as the packet
    // path's affinity.
    let key = SockAffinityKey {
        netns_cookie: netns.to_ne_bytes(),
        group: frontend.backend_id,
    };
    // The clock only for affinity: a helper call on every connect else.
    let now = if affinity {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        0
    };
    if affinity && let Some(entry) = LB_SK_AFF_V2.get_ptr_mut(&key) {
        // SAFETY: map value pointer; fields read once.
        let (recorded, last_used_ns) = unsafe { ((*entry).backend_id, (*entry).last_used_ns) };
        let timeout_ns = u64::from(frontend.affinity_timeout_s) * 1_000_000_000;
        if now.saturating_sub(last_used_ns) <= timeout_ns
            && let Some(own) = lb::own_backend::<F>(recorded, frontend)
        {
            // SAFETY: map value pointer.
            unsafe { (*entry).last_used_ns = now };
            return Some(own);
        }
    }
    // SAFETY: helper without arguments.
    let seed = slot_seed(
        u32::from(l4_proto),
        unsafe { bpf_get_prandom_u32() },
        cookie,
    );
    let chosen = lb::slot_backend::<F>(
        frontend,
        daddr,
        dport_be,
        l4_proto,
        slot_for(seed, frontend.count),
    )?;
    if affinity {
        let entry = AffinityEntry {
            backend_id: chosen.0,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = LB_SK_AFF_V2.insert(&key, &entry, 0);
    }
    Some(chosen)
}

/// The frontend a socket asked for, if it was sent to `addr:port_be`.
#[inline(always)]
fn reverse<F: SockFamily>(
    ctx: &SockAddrContext,
    addr: F::Addr,
    port_be: u16,
) -> Option<(F::Addr, u16)> {
    // SAFETY: helper on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if protocol(ctx) == u32::from(proto::TCP)
        && let Some(frontend) = slot_peer::<F>(cookie, addr, port_be)
    {
        return Some(frontend);
    }
    let key = SockRevNatKey {
        cookie: cookie.to_ne_bytes(),
        addr,
        port_be,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let value = unsafe { F::sock_revnat().get(&key) }?;
    Some((value.addr, value.port_be))
}

/// The slot at INDEX of this family's table and its holder's cookie
/// (0: free), read once.
#[inline(always)]
fn slot_at<F: SockFamily>(index: u32) -> Option<(*mut SockSlot<F::Addr>, u64)> {
    let slot = F::sock_slots().get_ptr_mut(index)?;
    // SAFETY: an array element, valid while the program runs.
    let owner = unsafe { read_volatile(&raw const (*slot).cookie) };
    Some((slot, owner))
}

/// The slot the socket COOKIE holds (`policy::socket_slots`), if any.
#[inline(always)]
fn held_slot<F: SockFamily>(cookie: u64) -> Option<*mut SockSlot<F::Addr>> {
    let [near, far] = socket_slots(cookie);
    match slot_at::<F>(near) {
        Some((slot, owner)) if owner == cookie => Some(slot),
        _ => slot_at::<F>(far).and_then(|(slot, owner)| (owner == cookie).then_some(slot)),
    }
}

/// A TCP socket slot (see `lb_common::SockSlot`) free for a socket, or
/// already its own.
struct SlotClaim<F: SockFamily> {
    /// The slot, an array element valid while the program runs.
    slot: *mut SockSlot<F::Addr>,
}

impl<F: SockFamily> SlotClaim<F> {
    /// The first of COOKIE's two slots that is free or its own; none when
    /// other live sockets hold both. Read without a lock: two sockets
    /// whose cookies share a slot (1 024 or 65 536 apart; the kernel hands
    /// cookies out to each CPU in batches, so two CPUs' new sockets can
    /// meet) that connect at the same moment, between this read and the
    /// record's store, can both take it; the loser only loses its reverse
    /// translation (its `getpeername()` shows the backend).
    #[inline(always)]
    fn claim(cookie: u64) -> Option<Self> {
        let usable = |(slot, owner): (*mut SockSlot<F::Addr>, u64)| {
            (owner == 0 || owner == cookie).then_some(Self { slot })
        };
        let [near, far] = socket_slots(cookie);
        slot_at::<F>(near)
            .and_then(usable)
            .or_else(|| slot_at::<F>(far).and_then(usable))
    }

    /// Records that the socket COOKIE asked for `daddr:dport_be` and was
    /// sent to BACKEND.
    #[inline(always)]
    fn record(self, cookie: u64, daddr: F::Addr, dport_be: u16, backend: &Backend<F::Addr>) {
        let slot = self.slot;
        // SAFETY: an array element, valid while the program runs; the
        // owner is written last.
        unsafe {
            (*slot).backend = backend.addr;
            (*slot).frontend = daddr;
            (*slot).backend_port_be = backend.port_be;
            (*slot).frontend_port_be = dport_be;
            write_volatile(&raw mut (*slot).cookie, cookie);
        }
    }
}

/// The frontend COOKIE's slot holds for a socket sent to `addr:port_be`.
#[inline(always)]
fn slot_peer<F: SockFamily>(cookie: u64, addr: F::Addr, port_be: u16) -> Option<(F::Addr, u16)> {
    let slot = held_slot::<F>(cookie)?;
    // SAFETY: an array element, copied out at once.
    let slot = unsafe { *slot };
    (slot.cookie == cookie && slot.backend == addr && slot.backend_port_be == port_be)
        .then_some((slot.frontend, slot.frontend_port_be))
}

/// Drops the reverse entry of `cookie` towards `addr:port_be`; true if
/// there was one.
#[inline(always)]
fn forget<F: SockFamily>(cookie: [u8; 8], addr: F::Addr, port_be: u16) -> bool {
    let key = SockRevNatKey {
        cookie,
        addr,
        port_be,
        _pad: 0,
    };
    F::sock_revnat().remove(&key).is_ok()
}

/// The release filter's counter of sockets connected to `addr:port_be`
/// (see `release`).
#[inline(always)]
fn filter_counter<F: SockFamily>(addr: &F::Addr, port_be: u16) -> Option<*mut u64> {
    LB_SK_RNAT_CNT_V1.get_ptr_mut(filter_slot(F::fold(addr), port_be))
}

/// Adds DELTA (`u64::MAX`: minus one) to the filter counter at COUNTER,
/// atomically for all CPUs: `BPF_XADD`, an atomic add whose old value is
/// not used. `core::sync::atomic` offers BPF no read-modify-write (the
/// target has no compare-and-swap), so the intrinsic it is built on.
#[inline(always)]
fn count(counter: *mut u64, delta: u64) {
    // SAFETY: an aligned element of an array map, valid while the program
    // runs.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta) };
}

/// Fails the call with `errno` (`bpf_set_retval`, kernel >= 5.18).
#[inline(always)]
fn refuse(errno: i32) -> i32 {
    count_reason(reason::SOCK_REFUSED);
    // SAFETY: helper with a plain argument.
    unsafe { bpf_set_retval(-errno) };
    REFUSE
}
