//! A family's backend array (`map_names::BACKENDS4`, `BACKENDS6`), written
//! with plain stores through a mapping of the entries concerned
//! (`BPF_F_MMAPABLE`): a first sync at 100k Services writes 2M backends,
//! which as hash map inserts were ~0.7 µs of kernel time each, as
//! `BPF_MAP_UPDATE_BATCH` into an array ~80 ns, and as stores a few.
//!
//! Only the pages a write or a read needs are mapped, and only while it
//! runs: mapped pages count in the agent's RSS (the whole arrays are 80
//! MiB at the default `--max-backends`, whatever the cluster's size).
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
    sync::atomic::{AtomicU8, AtomicU32, Ordering, fence},
};

use aya::maps::{Array, IterableMap as _, Map, MapData};
use lb_common::{Backend, MapAddr, map_flags};

use super::MapsError;

/// Entries a read maps at a time (1 MiB of IPv6 entries).
const READ_CHUNK: u32 = 1 << 15;

/// One family's backend array.
pub(crate) struct BackendArray<A: MapAddr> {
    array: Array<MapData, Backend<A>>,
    name: &'static str,
    /// Entries.
    entries: u32,
    /// Bytes from one entry to the next (the kernel rounds the value size
    /// up to 8).
    stride: usize,
}

/// A mapping of the pages holding some entries of a backend array,
/// unmapped when dropped.
struct Window {
    base: NonNull<u8>,
    len: usize,
    /// Offset in the array of the mapping's first byte.
    offset: usize,
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `BackendArray::window`, of `len`
        // bytes, unmapped once.
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
        Ok(Self {
            array,
            name,
            entries: info.max_entries(),
            stride: size_of::<Backend<A>>().next_multiple_of(8),
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

    /// Maps the pages holding entries `first..=last` (both below
    /// `entries`).
    fn window(&self, first: u32, last: u32) -> Result<Window, MapsError> {
        let page = page_size();
        let offset = (first as usize * self.stride) / page * page;
        let end = ((last as usize + 1) * self.stride).next_multiple_of(page);
        let len = end - offset;
        let failed = |source| MapsError::Mmap {
            name: self.name,
            source,
        };
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| failed(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: a shared mapping of the map's fd: its values, from the
        // page-aligned `offset` on, `len` bytes that the array holds
        // (`last` is below `entries`; the kernel checks it too).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.map().fd().as_fd().as_raw_fd(),
                file_offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(failed(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| failed(std::io::ErrorKind::AddrNotAvailable.into()))?;
        Ok(Window { base, len, offset })
    }

    /// Entry `index`'s place in `window`, which maps it.
    fn slot(&self, window: &Window, index: u32) -> *mut Backend<A> {
        let at = index as usize * self.stride - window.offset;
        debug_assert!(at + self.stride <= window.len);
        // SAFETY: in the window (the callers map the entries they touch),
        // aligned (the stride is a multiple of 8, the offset of a page).
        unsafe { window.base.as_ptr().add(at) }.cast()
    }

    /// The entry at `index` as stored (a cleared one included); `None`
    /// past the end.
    pub(crate) fn raw(&self, index: u32) -> Result<Option<Backend<A>>, MapsError> {
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
        let mut first = 0;
        while first < self.entries {
            let last = first.saturating_add(READ_CHUNK - 1).min(self.entries - 1);
            let window = self.window(first, last)?;
            for index in first..=last {
                // SAFETY: a slot of the window; every bit pattern is a
                // `Backend` (plain integers and byte arrays).
                let backend = unsafe { self.slot(&window, index).read_volatile() };
                if backend.rev_nat_id != 0 {
                    each(index, backend);
                }
            }
            first = last + 1;
        }
        Ok(())
    }

    /// Writes `value` at `index`; `false` past the end.
    pub(crate) fn set(&self, index: u32, value: &Backend<A>) -> Result<bool, MapsError> {
        self.set_all(&[(index, *value)], |entry| Some(*entry))
            .map(|written| written == 1)
    }

    /// Writes the entries `entry` gives for `items`, in order, up to the
    /// first it gives none for or whose index is past the end, through one
    /// window; how many were written.
    pub(crate) fn set_all<T>(
        &self,
        items: &[T],
        entry: impl Fn(&T) -> Option<(u32, Backend<A>)>,
    ) -> Result<usize, MapsError> {
        let writable = || {
            items
                .iter()
                .map_while(|item| entry(item).filter(|(index, _)| *index < self.entries))
        };
        let Some((first, last)) = writable().fold(None, |span, (index, _)| match span {
            None => Some((index, index)),
            Some((first, last)) => Some((index.min(first), index.max(last))),
        }) else {
            return Ok(0);
        };
        let window = self.window(first, last)?;
        let mut written = 0;
        for (index, value) in writable() {
            // SAFETY: a slot of the window, which maps `first..=last`.
            unsafe { store(self.slot(&window, index), &value) };
            written += 1;
        }
        Ok(written)
    }

    /// Clears the entry at `index`: its rev-NAT id only (see the module's
    /// note).
    pub(crate) fn clear(&self, index: u32) -> Result<(), MapsError> {
        if index < self.entries {
            let window = self.window(index, index)?;
            // SAFETY: a slot of the window; the id is stored as an atomic
            // (programs on other CPUs read it meanwhile).
            unsafe { AtomicU32::from_ptr(&raw mut (*self.slot(&window, index)).rev_nat_id) }
                .store(0, Ordering::Release);
        }
        Ok(())
    }
}

/// Writes `value` into `slot` so that no reader sees a mix of the old and
/// new entries (see the module's note).
///
/// # Safety
/// `slot` is a mapped entry of a backend array, written by no other
/// thread meanwhile.
unsafe fn store<A: MapAddr>(slot: *mut Backend<A>, value: &Backend<A>) {
    // SAFETY: the caller's; the fields are written one by one through
    // their own pointers (the rev-NAT id and flags as atomics: programs on
    // other CPUs read them meanwhile).
    unsafe {
        let old = slot.read_volatile();
        let rev_nat = AtomicU32::from_ptr(&raw mut (*slot).rev_nat_id);
        if old.rev_nat_id == value.rev_nat_id
            && old.addr == value.addr
            && old.port_be == value.port_be
            && old.proto == value.proto
        {
            AtomicU8::from_ptr(&raw mut (*slot).flags).store(value.flags, Ordering::Release);
            return;
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
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}
