//! The maps, named after `lb_common::map_names` (checked by the loader).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    Affinity4Key, Affinity6Key, AffinityEntry, Ct4Key, Ct6Key, CtEntry, Endpoint4Key, Endpoint6Key,
    Frag4Key, Frag6Key, FragEntry, Lb4Backend, Lb4Key, Lb4RevNat, Lb6Backend, Lb6Key, Lb6RevNat,
    LbConfig, LbService, LbStats, SockAffinityKey, SockConfig, SockRevNat4, SockRevNat4Key,
    SockRevNat6, SockRevNat6Key, SockSlot4, SockSlot6, SourceRange4, SourceRange6, event, limits,
    map_flags, reason,
};

#[map]
pub(crate) static LB4_SVC_V3: HashMap<Lb4Key, LbService> =
    HashMap::pinned(limits::MAX_SERVICE_SLOTS, map_flags::NO_PREALLOC);
#[map]
pub(crate) static LB6_SVC_V3: HashMap<Lb6Key, LbService> =
    HashMap::pinned(limits::MAX_SERVICE_SLOTS, map_flags::NO_PREALLOC);
#[map]
pub(crate) static LB4_BE_V4: Array<Lb4Backend> =
    Array::pinned(limits::DEFAULT_BACKENDS + 1, map_flags::MMAPABLE);
#[map]
pub(crate) static LB6_BE_V4: Array<Lb6Backend> =
    Array::pinned(limits::DEFAULT_BACKENDS + 1, map_flags::MMAPABLE);
#[map]
pub(crate) static LB4_RNAT_V2: HashMap<u32, Lb4RevNat> =
    HashMap::pinned(limits::MAX_FRONTENDS, map_flags::NO_PREALLOC);
#[map]
pub(crate) static LB6_RNAT_V2: HashMap<u32, Lb6RevNat> =
    HashMap::pinned(limits::MAX_FRONTENDS, map_flags::NO_PREALLOC);
// Answered flows: a common LRU, so that any CPU may use the whole map (with
// per-CPU lists each CPU holds max/CPUs entries, and a node whose replies
// are handled on one CPU would keep half its flows on 2 CPUs). Floods do
// not insert here (see `ct`), so the shared lock is taken at the rate of
// answered connections only.
#[map]
pub(crate) static LB4_CT_V4: LruHashMap<Ct4Key, CtEntry> =
    LruHashMap::pinned(limits::DEFAULT_CT_ENTRIES, 0);
#[map]
pub(crate) static LB6_CT_V4: LruHashMap<Ct6Key, CtEntry> =
    LruHashMap::pinned(limits::DEFAULT_CT_ENTRIES, 0);
// Flows not answered yet (see `ct`): what a flood of spoofed SYNs fills.
// Per-CPU lists: a flood churns only the lists of the CPUs it arrives on
// (legitimate SYNs handled on other CPUs keep their entries), with no
// shared lock; on one CPU a SYN into the full map measured the same with
// either kind (`datapath_cost --profile churn`, docs/ARCHITECTURE.md).
#[map]
pub(crate) static LB4_CT_NEW_V1: LruHashMap<Ct4Key, CtEntry> = LruHashMap::pinned(
    limits::ct_new_entries(limits::DEFAULT_CT_ENTRIES),
    map_flags::NO_COMMON_LRU,
);
#[map]
pub(crate) static LB6_CT_NEW_V1: LruHashMap<Ct6Key, CtEntry> = LruHashMap::pinned(
    limits::ct_new_entries(limits::DEFAULT_CT_ENTRIES),
    map_flags::NO_COMMON_LRU,
);
#[map]
pub(crate) static LB4_AFF_V2: LruHashMap<Affinity4Key, AffinityEntry> =
    LruHashMap::pinned(limits::AFFINITY_ENTRIES, 0);
#[map]
pub(crate) static LB6_AFF_V2: LruHashMap<Affinity6Key, AffinityEntry> =
    LruHashMap::pinned(limits::AFFINITY_ENTRIES, 0);
// The endpoint index: one entry per backend entry (sized with the backend
// maps by the loader).
#[map]
pub(crate) static LB4_EP_V1: HashMap<Endpoint4Key, u32> =
    HashMap::pinned(limits::MAX_BACKENDS, map_flags::NO_PREALLOC);
#[map]
pub(crate) static LB6_EP_V1: HashMap<Endpoint6Key, u32> =
    HashMap::pinned(limits::MAX_BACKENDS, map_flags::NO_PREALLOC);
#[map]
pub(crate) static LB4_SRC_V1: LpmTrie<SourceRange4, u8> = LpmTrie::pinned(limits::SOURCE_RANGES, 0);
#[map]
pub(crate) static LB6_SRC_V1: LpmTrie<SourceRange6, u8> = LpmTrie::pinned(limits::SOURCE_RANGES, 0);
// Maglev (`crate::maglev`): sized by the loader when Maglev is on, one
// entry each otherwise (an array cannot have none).
#[map]
pub(crate) static LB_MGLV_REF_V1: Array<u32> = Array::pinned(1, 0);
#[map]
pub(crate) static LB_MGLV_TBL_V1: Array<u32> = Array::pinned(1, 0);
#[map]
pub(crate) static LB_CONFIG_V3: Array<LbConfig> = Array::pinned(1, 0);
#[map]
static LB_SVC_STATS_V1: PerCpuArray<LbStats> = PerCpuArray::pinned(limits::MAX_FRONTENDS, 0);
#[map]
static LB_REASONS_V6: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);
#[map]
static LB_EVENTS_V1: PerCpuArray<u64> = PerCpuArray::pinned(event::COUNT, 0);

/// Counts one `event` (beside the packet's verdict).
#[inline(always)]
pub(crate) fn count_event(event: u32) {
    add_one(&LB_EVENTS_V1, event);
}

/// Counts one packet for `reason`.
#[inline(always)]
pub(crate) fn count_reason(reason: u32) {
    add_one(&LB_REASONS_V6, reason);
}

/// Adds one to this CPU's counter `index` of `counters`.
#[inline(always)]
fn add_one(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; no other writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}

/// Counts one translated packet of `len` bytes for the frontend `rev_nat_id`.
#[inline(always)]
pub(crate) fn count_service(rev_nat_id: u32, len: u32) {
    if crate::probe::dry_run() {
        return;
    }
    if let Some(stats) = LB_SVC_STATS_V1.get_ptr_mut(rev_nat_id) {
        // SAFETY: per-CPU slot; no other writer on this CPU while we run.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(len);
        }
    }
}

/// Per-CPU scratch space for building reject replies (not pinned: private
/// to one loaded program).
#[map]
pub(crate) static LB_SCRATCH: PerCpuArray<[u8; crate::reject::SCRATCH_LEN]> =
    PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch: the parsed packet between the parse and to-backend
/// steps (not pinned: private to one loaded program).
#[map]
pub(crate) static LB_PACKET: PerCpuArray<crate::tc::Packet> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch: `snat::snat_port`'s fallback candidate, in a map
/// because the verifier does not track a map value's contents (see there;
/// not pinned: private to one loaded program).
#[map]
pub(crate) static LB_SNAT_FALLBACK: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Socket-level load balancing settings (see `sock`).
#[map]
pub(crate) static LB_SOCK_CFG_V1: Array<SockConfig> = Array::pinned(1, 0);
/// What a socket sent to a backend asked for (see `sock`).
#[map]
pub(crate) static LB4_SK_RNAT_V1: LruHashMap<SockRevNat4Key, SockRevNat4> =
    LruHashMap::pinned(limits::SOCK_REVNAT_ENTRIES, 0);
#[map]
pub(crate) static LB6_SK_RNAT_V1: LruHashMap<SockRevNat6Key, SockRevNat6> =
    LruHashMap::pinned(limits::SOCK_REVNAT_ENTRIES, 0);
/// Translated TCP connections' reverse translation, by cookie (see
/// `lb_common::SockSlot`).
#[map]
pub(crate) static LB4_SK_SLOT_V1: Array<SockSlot4> = Array::pinned(limits::SOCK_SLOTS, 0);
#[map]
pub(crate) static LB6_SK_SLOT_V1: Array<SockSlot6> = Array::pinned(limits::SOCK_SLOTS, 0);
/// Connected sockets with a reverse entry, per hash of their peer (see
/// `sock::hooks::release`).
#[map]
pub(crate) static LB_SK_RNAT_CNT_V1: Array<u64> =
    Array::pinned(limits::SOCK_REVNAT_FILTER_SLOTS, 0);
/// Session affinity of the node's sockets, per network namespace.
#[map]
pub(crate) static LB_SK_AFF_V2: LruHashMap<SockAffinityKey, AffinityEntry> =
    LruHashMap::pinned(limits::AFFINITY_ENTRIES, 0);

/// Per-interface token buckets of the reject path (`reject_guard`; not
/// pinned: a restart gives every interface a full burst again).
#[map]
pub(crate) static LB_REJECT_RL: LruHashMap<u32, crate::reject_guard::Bucket> =
    LruHashMap::with_max_entries(4096, 0);

/// Attached interfaces: ifindex -> `lb_common::iface_flags` (written by the
/// loader when it attaches; not pinned, each loaded object gets its own).
#[map]
pub(crate) static LB_IFACE_V1: HashMap<u32, u32> = HashMap::with_max_entries(16_384, 0);

/// The ports of fragmented datagrams' first fragments (see `frag`). Not
/// pinned: an entry is needed for the milliseconds a datagram's fragments
/// take to cross the node, so a new program may start with none. A common
/// LRU: a datagram's fragments may be handled on different CPUs.
#[map]
pub(crate) static LB4_FRAG_V1: LruHashMap<Frag4Key, FragEntry> =
    LruHashMap::with_max_entries(limits::FRAG_ENTRIES, 0);
#[map]
pub(crate) static LB6_FRAG_V1: LruHashMap<Frag6Key, FragEntry> =
    LruHashMap::with_max_entries(limits::FRAG_ENTRIES, 0);
