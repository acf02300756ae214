//! A family's backend array (`map_names::BACKENDS4`, `BACKENDS6`), mapped
//! into the agent's memory (`BPF_F_MMAPABLE`) and written with plain
//! stores: a first sync at 100k Services writes 2M backends, which as hash
//! map inserts were ~0.7 µs of kernel time each, as `BPF_MAP_UPDATE_BATCH`
//! into an array ~80 ns, and as stores a few.
//!
//! An entry is rewritten in place while programs may read it, so no write
//! lets a packet see a mix of two backends: an entry is valid while its
//! rev-NAT id is not 0 (no frontend has 0, so the datapath's membership
//! check refuses a cleared entry), a new entry gets its rev-NAT id last,
//! a cleared one loses only its rev-NAT id, and a live entry's flags
//! change alone.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::{
        OnceLock,
        atomic::{AtomicU8, AtomicU32, Ordering, fence},
    },
};

use aya::maps::{Array, IterableMap as _, Map, MapData};
use lb_common::{Backend, MapAddr, map_flags};

use super::MapsError;

/// One family's backend array. It is mapped into memory at its first
/// write and stays so; reads before that (a read-only handle's, a start's
/// read of pinned maps) map it only while they iterate, or look one entry
/// up by syscall, so that a handle that only reads does not hold a second
/// mapping (its pages count in the agent's RSS once per mapping).
pub(crate) struct BackendArray<A: MapAddr> {
    array: Array<MapData, Backend<A>>,
    name: &'static str,
    /// Entries.
    entries: u32,
    /// Bytes from one entry to the next (the kernel rounds the value size
    /// up to 8).
    stride: usize,
    /// Bytes mapped: all entries, rounded up to pages.
    len: usize,
    written: OnceLock<Mapping>,
}

/// A mapping of a backend array's entries.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by the value (unmapped on drop) and only
// read and written through `read_volatile`, `write_volatile` and atomics;
// an entry is written by one thread at a time (its family's writer).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(map: &MapData, len: usize) -> std::io::Result<Self> {
        // SAFETY: a shared mapping of the map's fd at offset 0 (the
        // values, index 0 first); `len` covers all entries, rounded to
        // pages as the kernel allows.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or(std::io::ErrorKind::AddrNotAvailable)?;
        Ok(Self { base, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of `len` bytes, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

impl<A: MapAddr> BackendArray<A> {
    /// The array `name` (`map`), checking its type, value size and flags.
    pub(crate) fn new(name: &'static str, map: Option<Map>) -> Result<Self, MapsError> {
        let map = map.ok_or(MapsError::Missing(name))?;
        let array: Array<MapData, Backend<A>> =
            Array::try_from(map).map_err(|source| MapsError::Layout { name, source })?;
        let info = array
            .map()
            .info()
            .map_err(|source| MapsError::Layout { name, source })?;
        if info.map_flags() & map_flags::MMAPABLE == 0 {
            return Err(MapsError::Shape {
                name,
                what: "not mappable (BPF_F_MMAPABLE)",
            });
        }
        let entries = info.max_entries();
        let stride = size_of::<Backend<A>>().next_multiple_of(8);
        let len = (entries as usize * stride).next_multiple_of(page_size());
        Ok(Self {
            array,
            name,
            entries,
            stride,
            len,
            written: OnceLock::new(),
        })
    }

    /// The map (for its fd and information).
    pub(crate) fn map(&self) -> &MapData {
        self.array.map()
    }

    /// Entries in the array.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    fn mapping(&self) -> Result<Mapping, MapsError> {
        Mapping::new(self.map(), self.len).map_err(|source| MapsError::Mmap {
            name: self.name,
            source,
        })
    }

    /// The mapping writes go through, made at the first.
    fn for_writes(&self) -> Result<&Mapping, MapsError> {
        if let Some(mapping) = self.written.get() {
            return Ok(mapping);
        }
        let mapping = self.mapping()?;
        Ok(self.written.get_or_init(|| mapping))
    }

    fn slot(&self, mapping: &Mapping, index: u32) -> Option<*mut Backend<A>> {
        (index < self.entries).then(|| {
            // SAFETY: in bounds (checked above), aligned (the stride is a
            // multiple of 8, the mapping page-aligned).
            unsafe { mapping.base.as_ptr().add(index as usize * self.stride) }.cast()
        })
    }

    /// The entry at `index` as stored (a cleared one included); `None`
    /// past the end.
    pub(crate) fn raw(&self, index: u32) -> Result<Option<Backend<A>>, MapsError> {
        if let Some(mapping) = self.written.get() {
            // SAFETY: a valid slot of the mapping; every bit pattern is a
            // `Backend` (plain integers and byte arrays).
            return Ok(self
                .slot(mapping, index)
                .map(|slot| unsafe { slot.read_volatile() }));
        }
        match self.array.get(&index, 0) {
            Ok(backend) => Ok(Some(backend)),
            Err(aya::maps::MapError::OutOfBounds { .. }) => Ok(None),
            Err(source) => Err(MapsError::Access {
                what: format!("read {} entry {index}", self.name),
                source,
            }),
        }
    }

    /// The valid entry at `index` (rev-NAT id not 0).
    pub(crate) fn get(&self, index: u32) -> Result<Option<Backend<A>>, MapsError> {
        Ok(self.raw(index)?.filter(|backend| backend.rev_nat_id != 0))
    }

    /// Calls `each` with every valid entry and its index, in order.
    pub(crate) fn for_each(&self, mut each: impl FnMut(u32, Backend<A>)) -> Result<(), MapsError> {
        let own;
        let mapping = if let Some(mapping) = self.written.get() {
            mapping
        } else {
            own = self.mapping()?;
            &own
        };
        for index in 0..self.entries {
            if let Some(slot) = self.slot(mapping, index) {
                // SAFETY: as in `raw`.
                let backend = unsafe { slot.read_volatile() };
                if backend.rev_nat_id != 0 {
                    each(index, backend);
                }
            }
        }
        Ok(())
    }

    /// Writes `value` at `index`, so that no reader sees a mix of the old
    /// and new entries (see the module's note); `false` past the end.
    pub(crate) fn set(&self, index: u32, value: &Backend<A>) -> Result<bool, MapsError> {
        let Some(slot) = self.slot(self.for_writes()?, index) else {
            return Ok(false);
        };
        // SAFETY: a valid slot; its fields are written one by one through
        // their own pointers (the rev-NAT id and flags as atomics: they
        // are read by programs on other CPUs while written).
        unsafe {
            let old = slot.read_volatile();
            let rev_nat = AtomicU32::from_ptr(&raw mut (*slot).rev_nat_id);
            if old.rev_nat_id == value.rev_nat_id
                && old.addr == value.addr
                && old.port_be == value.port_be
                && old.proto == value.proto
            {
                AtomicU8::from_ptr(&raw mut (*slot).flags).store(value.flags, Ordering::Release);
                return Ok(true);
            }
            if old.rev_nat_id != 0 {
                rev_nat.store(0, Ordering::Release);
                fence(Ordering::Release);
            }
            (&raw mut (*slot).addr).write_volatile(value.addr);
            (&raw mut (*slot).port_be).write_volatile(value.port_be);
            (&raw mut (*slot).proto).write_volatile(value.proto);
            (&raw mut (*slot).flags).write_volatile(value.flags);
            fence(Ordering::Release);
            rev_nat.store(value.rev_nat_id, Ordering::Release);
        }
        Ok(true)
    }

    /// Clears the entry at `index`: its rev-NAT id only (see the module's
    /// note).
    pub(crate) fn clear(&self, index: u32) -> Result<(), MapsError> {
        if let Some(slot) = self.slot(self.for_writes()?, index) {
            // SAFETY: a valid slot; the id is stored as an atomic.
            unsafe { AtomicU32::from_ptr(&raw mut (*slot).rev_nat_id) }.store(0, Ordering::Release);
        }
        Ok(())
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}
