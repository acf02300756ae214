//! Source NAT of new flows: when it applies, which address, which port.
//!
//! A flow is source-NATed when its backend must answer through this node
//! (hairpin, external traffic to a remote backend), and when its reply
//! tuple (backend -> client) is held by a live flow of another frontend
//! (one client socket reaching one backend through two frontends of a
//! Service): then the client keeps its address and gets another port, as
//! the kernel's NAT remaps a clashing reply tuple. Ports come from a wide
//! range; the candidates of a flow are the same each time (its tuple and
//! the node's seed), and a candidate whose reply entry is this very flow's
//! is taken again, so a flow keeps its port for its life even when its
//! service entry goes first. A candidate that is a frontend's own port on
//! the NAT address (a `NodePort` on the node address) is never taken: the
//! backend's answer to it would be read as a new packet to that frontend.
//!
//! A tuple whose flow closed less than `ct_timeout::TCP_TIME_WAIT_NS` ago
//! is not free yet (`LINGERING`): the backend still holds it in
//! `TIME_WAIT`, and a new connection's SYN on it, whose timestamps come
//! from another clock (Linux offsets them per 4-tuple, and the client's
//! tuple is another one), is answered with a bare ACK (PAWS) instead of a
//! SYN+ACK half of the time: the client retransmits its SYN 1 s later.
//! Such a candidate is taken only when none of the flow's candidates is
//! free, as every closing one was before (rather than no port at all).
//! The kernel's NAT does not reuse a tuple either while its conntrack
//! entry sits in `TIME_WAIT` (120 s).
//!
//! A tuple held by a TCP (or SCTP) flow its client has not confirmed for
//! `ct_timeout::TCP_UNCONFIRMED_HOLD_NS` (`UNCONFIRMED`: a spoofed SYN's,
//! whose answer went nowhere; Linux would say not assured) is taken on
//! the same terms as a lingering one, and that flow ends
//! (`ct::end_unconfirmed`): a SYN flood through a `NodePort` would
//! otherwise hold a port per flooded flow for a minute and leave new
//! connections none. Should the backend still hold the old tuple
//! half-open, the new SYN is out of its window: it answers with a bare
//! ACK, which matches no answered flow and reaches the node's stack, whose
//! reset ends the half-open connection; the client's SYN 1 s later opens
//! the new one.

use lb_common::{
    CtKey, LbService, SNAT_PORT_COUNT, SNAT_PORT_MIN, backend_flags, ct_dir, ct_flags, ct_timeout,
    event, reason, svc_flags,
};

use crate::{
    ct::{self, Flow},
    family::{Family, Tuple, ct_key},
    lb,
    maps::{LB_CONFIG_V3, LB_SNAT_FALLBACK, count_event},
    verdict::Verdict,
};

/// Candidate ports tried for one source NAT. With the range's 31744 ports
/// per backend and source address, 32 probes fail together only when the
/// range is nearly full (at 80% taken, one flow in a thousand).
const SNAT_ATTEMPTS: u32 = 32;

/// `reply_holder`: no live entry holds the reply tuple.
const FREE: u32 = 0;
/// `reply_holder`: this flow's own entry, in the map of new flows.
const OURS_NEW: u32 = 1;
/// `reply_holder`: this flow's own entry, in the main map.
const OURS_ANSWERED: u32 = 2;
/// `reply_holder`: another flow's live entry.
const TAKEN: u32 = 3;
/// `reply_holder`: another flow's entry, closed less than
/// `ct_timeout::TCP_TIME_WAIT_NS` ago: the backend may still hold the
/// tuple in `TIME_WAIT` (see the module comment).
const LINGERING: u32 = 4;

/// `reply_holder`: another flow's entry in the map of new flows, a TCP
/// flow its client has not confirmed for
/// `ct_timeout::TCP_UNCONFIRMED_HOLD_NS` (see the module comment).
const UNCONFIRMED: u32 = 5;

/// Marks a `snat_port` result whose reply entry is in the main map.
const ANSWERED_BIT: u32 = 1 << 16;
/// Marks a `snat_port` result that is an `UNCONFIRMED` candidate: its
/// flow must end.
const UNCONFIRMED_BIT: u32 = 1 << 17;

/// Decides on source NAT for a new flow whose backend is in `flow`:
/// hairpin flows (a backend sending to its own service) get the loopback
/// address as source, external traffic (and off-cluster clients of a
/// `ClusterIP`, with `--cluster-cidr`) to a backend on another node the
/// node address (unless the frontend keeps the client address), a flow
/// whose reply tuple another flow holds the client's own address. On SNAT,
/// `flow` gets the address and a free port. Sets `flow.answered` when this
/// flow's own reply entry is still in the main map.
#[inline(always)]
pub(crate) fn choose_source<F: Family>(
    tuple: &Tuple<F::Addr>,
    frontend: &LbService,
    now: u64,
    flow: &mut Flow<F>,
) -> Result<(), Verdict> {
    let hairpin = flow.backend.addr == tuple.saddr;
    // External traffic, or a `ClusterIP` reached from outside the cluster
    // CIDRs (`svc_flags::OFF_CLUSTER_SOURCE`), to another node: its reply
    // would not come back here without source NAT.
    let remote_external = (frontend.flags & svc_flags::EXTERNAL != 0
        && frontend.flags & svc_flags::EXT_LOCAL == 0
        || frontend.flags & svc_flags::OFF_CLUSTER_SOURCE != 0)
        && flow.backend.flags & backend_flags::LOCAL == 0;
    let own_source = !(hairpin || remote_external);
    if own_source {
        let reply = Tuple {
            saddr: flow.backend.addr,
            daddr: tuple.saddr,
            sport_be: flow.backend.port_be,
            dport_be: tuple.sport_be,
            proto: tuple.proto,
        };
        let held = reply_holder::<F>(&reply, tuple, frontend.rev_nat_id, now);
        // A closed flow's tuple (`LINGERING`) is the client's own choice:
        // it keeps its address, as it did before. A flow that may still be
        // confirmed holds it (`UNCONFIRMED`): this one is source-NATed.
        if held != TAKEN && held != UNCONFIRMED {
            flow.answered = held == OURS_ANSWERED;
            return Ok(());
        }
    }
    let config = LB_CONFIG_V3
        .get_ptr(0)
        .ok_or(Verdict::drop(reason::DROP_NO_SNAT))?;
    // SAFETY: map value pointer; the fields are copied out.
    let (nat_addr, seed) = unsafe {
        let addr = if own_source {
            tuple.saddr
        } else if hairpin {
            F::loopback(&*config)
        } else {
            F::node_addr(&*config)
        };
        (addr, (*config).snat_seed)
    };
    if F::is_unspecified(&nat_addr) {
        return Err(Verdict::drop(reason::DROP_NO_SNAT));
    }
    let mut reply = Tuple {
        saddr: flow.backend.addr,
        daddr: nat_addr,
        sport_be: flow.backend.port_be,
        dport_be: 0,
        proto: tuple.proto,
    };
    let start = F::flow_hash(tuple).wrapping_add(seed);
    let port = snat_port::<F>(tuple, &mut reply, frontend.rev_nat_id, now, start);
    if port == 0 {
        return Err(Verdict::drop(reason::DROP_SNAT_EXHAUSTED));
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port is the low 16 bits"
    )]
    let port_be = port as u16;
    if port & UNCONFIRMED_BIT != 0 && !crate::probe::dry_run() {
        reply.dport_be = port_be;
        if ct::end_unconfirmed::<F>(&reply, now) != 0 {
            count_event(event::SNAT_TOOK_UNCONFIRMED);
        }
    }
    flow.nat_port_be = port_be;
    flow.nat_addr = nat_addr;
    flow.snat = true;
    flow.answered = port & ANSWERED_BIT != 0;
    Ok(())
}

/// A source port for the flow `tuple` whose reply tuple is `reply` (backend
/// to the NAT address; its port is probed): the first of the flow's
/// candidates, from `start` on, that is no frontend on the NAT address and
/// whose reply tuple no live flow holds or this flow holds itself
/// (`ANSWERED_BIT` set when that entry is in the main map); else the first
/// one a flow closed lately or an unconfirmed flow holds (`LINGERING`,
/// `UNCONFIRMED`; `UNCONFIRMED_BIT` set for the latter). Returns 0 when
/// none is. A subprogram: its own stack frame.
#[inline(never)]
fn snat_port<F: Family>(
    tuple: &Tuple<F::Addr>,
    reply: &mut Tuple<F::Addr>,
    rev_nat_id: u32,
    now: u64,
    start: u32,
) -> u32 {
    // The first lingering or unconfirmed candidate's port (network order,
    // `UNCONFIRMED_BIT` set for the latter) is kept in a per-CPU map value,
    // whose contents the verifier does not track (volatile, so that LLVM
    // keeps it there): held in a register, it made the states of each
    // attempt three (none, lingering, unconfirmed), and the 32 attempts
    // were two thirds of `lb_tc`'s verification.
    let Some(fallback) = LB_SNAT_FALLBACK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this function's per-CPU scratch (no program nests on a
    // CPU), reset before it is read.
    unsafe { fallback.write_volatile(0) };
    let mut attempt = 0u32;
    while attempt < SNAT_ATTEMPTS {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "below SNAT_PORT_COUNT, a u16"
        )]
        let offset =
            (start.wrapping_add(attempt.wrapping_mul(7919)) % u32::from(SNAT_PORT_COUNT)) as u16;
        let port_be = (SNAT_PORT_MIN + offset).to_be();
        attempt += 1;
        let keep = match candidate_holder::<F>(reply, port_be, tuple, rev_nat_id, now) {
            FREE | OURS_NEW => return u32::from(port_be),
            OURS_ANSWERED => return u32::from(port_be) | ANSWERED_BIT,
            LINGERING => u32::from(port_be),
            UNCONFIRMED => u32::from(port_be) | UNCONFIRMED_BIT,
            _ => continue,
        };
        // SAFETY: as above.
        unsafe {
            if fallback.read_volatile() == 0 {
                fallback.write_volatile(keep);
            }
        }
    }
    // SAFETY: as above.
    unsafe { fallback.read_volatile() }
}

/// `reply_holder` of the candidate port `port_be` (put into `reply`),
/// `TAKEN` when it is a frontend's. A subprogram: the keys of its lookups
/// live in its own frame, gone when it returns, so that the verifier meets
/// each attempt of `snat_port` with the few states its result makes.
#[inline(never)]
fn candidate_holder<F: Family>(
    reply: &mut Tuple<F::Addr>,
    port_be: u16,
    client: &Tuple<F::Addr>,
    rev_nat_id: u32,
    now: u64,
) -> u32 {
    reply.dport_be = port_be;
    // The ports of `NodePort`s (30000-32767 by default) lie in the
    // range: the answer to node:30080 must not meet the frontend
    // node:30080 (it would be refused as a stray packet to it).
    // SAFETY: only the presence is used.
    if unsafe { lb::frontend::<F>(reply.daddr, port_be, reply.proto) }.is_some() {
        return TAKEN;
    }
    reply_holder::<F>(reply, client, rev_nat_id, now)
}

/// Who holds the reply tuple `reply` for the flow of `client` to the
/// frontend `rev_nat_id`: `FREE`, `OURS_NEW`, `OURS_ANSWERED`, `TAKEN`,
/// `LINGERING` or `UNCONFIRMED`.
#[inline(always)]
fn reply_holder<F: Family>(
    reply: &Tuple<F::Addr>,
    client: &Tuple<F::Addr>,
    rev_nat_id: u32,
    now: u64,
) -> u32 {
    let key = ct_key(reply, ct_dir::REPLY);
    let held = holder_in::<F>(&key, reply, client, rev_nat_id, now, true);
    if held != FREE {
        return held;
    }
    holder_in::<F>(&key, reply, client, rev_nat_id, now, false)
}

/// `reply_holder` in one map (the main one when `answered`).
#[inline(always)]
fn holder_in<F: Family>(
    key: &CtKey<F::Addr>,
    reply: &Tuple<F::Addr>,
    client: &Tuple<F::Addr>,
    rev_nat_id: u32,
    now: u64,
    answered: bool,
) -> u32 {
    let Some(entry) = ct::table::<F>(answered).get_ptr(key) else {
        return FREE;
    };
    // SAFETY: map value pointer, read in place.
    let entry = unsafe { &*entry };
    // A closing flow's tuple is free for a new flow (a new flow is a bare
    // SYN, which starts a new flow on a closing entry: `ct::usable`) once
    // the backend's `TIME_WAIT` is over; until then only when no other
    // candidate is.
    if entry.flags & ct_flags::CLOSING != 0 {
        if now.saturating_sub(entry.last_seen_ns) < ct_timeout::TCP_TIME_WAIT_NS {
            LINGERING
        } else {
            FREE
        }
    } else if !ct::usable(entry, reply.proto, 0, now, answered) {
        FREE
    } else if !ct::owned_by::<F>(entry, reply, client, rev_nat_id) {
        if !answered && ct::unconfirmed_for_long(entry, reply.proto, now) {
            UNCONFIRMED
        } else {
            TAKEN
        }
    } else if answered {
        OURS_ANSWERED
    } else {
        OURS_NEW
    }
}
