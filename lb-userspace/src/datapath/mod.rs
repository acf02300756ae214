//! The kernel side as the agent sees it: loading, pinning and attaching the
//! eBPF object (`loader`), reading and writing its maps (`maps`), and the
//! batched map writes aya has no call for (`batch`).

mod batch;
pub mod capacity;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod sock;
pub mod xdp;
