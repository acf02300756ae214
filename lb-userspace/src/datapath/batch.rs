//! `BPF_MAP_UPDATE_BATCH` through the raw syscall: aya 0.16 has no batch
//! update, and a first sync of 10k Services is 200k writes (one syscall
//! each without it).

use aya::maps::MapData;

use crate::plan::Op;

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_UPDATE_BATCH` (linux/bpf.h; hash maps, Linux >= 5.6).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Ops written per `BPF_MAP_UPDATE_BATCH` call: the keys and values of a
/// whole first sync at 100k Services (1M backends or 1.1M slots per map,
/// both families at once) were ~100 MiB more at the agent's peak; at this
/// size the syscalls are still few (~16 per map at 100k).
const BATCH_OPS: usize = 1 << 16;

/// The keys and values `entry` gives for the ops of `run`, written to
/// `map` in batches of [`BATCH_OPS`], in order; how many were written (all,
/// or those before the first that failed).
pub(super) fn batch_of<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    run: &[&Op],
    entry: impl Fn(&Op) -> Option<(K, V)>,
) -> usize {
    let mut keys = Vec::with_capacity(run.len().min(BATCH_OPS));
    let mut values = Vec::with_capacity(run.len().min(BATCH_OPS));
    let mut written = 0;
    for chunk in run.chunks(BATCH_OPS) {
        keys.clear();
        values.clear();
        for (key, value) in chunk.iter().copied().filter_map(&entry) {
            keys.push(key);
            values.push(value);
        }
        let done = update_batch(map, &keys, &values);
        written += done;
        if done < keys.len() {
            break;
        }
    }
    written
}

/// Writes `keys[i] -> values[i]` in order in one syscall (aya 0.16 has no
/// batch update); returns how many were written.
fn update_batch<K: aya::Pod, V: aya::Pod>(map: &MapData, keys: &[K], values: &[V]) -> usize {
    if keys.len() != values.len() {
        return 0;
    }
    update_batch_raw(
        map,
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    )
}

/// [`update_batch`] of `count` keys and values of the map's key and value
/// sizes (a per-CPU map's value: one per possible CPU, each 8-aligned).
pub(super) fn update_batch_raw(
    map: &MapData,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> usize {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    if count == 0 {
        return 0;
    }
    let Ok(count_u32) = u32::try_from(count) else {
        return 0;
    };
    let Ok(map_fd) = u32::try_from(map.fd().as_fd().as_raw_fd()) else {
        return 0;
    };
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: count_u32,
        map_fd,
        ..BatchAttr::default()
    };
    // SAFETY: the callers pass `count` keys and values of the map's sizes
    // (the map was opened with these types), alive for the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if result == 0 {
        return count;
    }
    let error = std::io::Error::last_os_error();
    // Inside its write loop the kernel reports in `count` how many it wrote
    // before failing, always fewer than given; an error before the loop
    // (no memory, no write permission, bad flags) leaves `count` as given.
    let written = usize::try_from(attr.count).unwrap_or(0);
    let written = if written >= count { 0 } else { written };
    tracing::debug!(%error, given = count, written, "batch map update failed; the rest goes one by one");
    written
}
