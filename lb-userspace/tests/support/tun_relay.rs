//! A point-to-point L3 link between two namespaces made of two tun devices
//! (`IFF_TUN`, no Ethernet header, device type `ARPHRD_NONE`, as
//! `WireGuard`'s) and a relay that copies every packet from one to the
//! other. It stands in for IPIP, ip6ip6, GRE and `WireGuard`, which the test
//! kernel may not have: what the datapath sees is the same, a packet that
//! starts with its IP header on a device without MAC addresses.
//!
//! The relay threads stop, and the devices go, when it is dropped; traffic
//! is only what the tests send.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::netns::in_netns;

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Opens a tun device NAME inside namespace NS (it lives while the fd is
/// open).
fn open_tun(ns: &str, name: &str) -> OwnedFd {
    in_netns(ns, || {
        // SAFETY: plain open(2) of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        assert!(
            fd >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        assert!(name.len() < req.ifr_name.len(), "tun name {name} too long");
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads the ifreq it is given.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &raw mut req) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name} in {ns}: {}",
            std::io::Error::last_os_error()
        );
        fd
    })
}

/// Two tun devices and the relay between them.
pub(crate) struct TunRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunRelay {
    /// Creates `name_a` in `ns_a` and `name_b` in `ns_b` (down, no addresses)
    /// and relays between them.
    pub(crate) fn start(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) -> Self {
        let fds = Arc::new([open_tun(ns_a, name_a), open_tun(ns_b, name_b)]);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [(0, 1), (1, 0)]
            .into_iter()
            .map(|(from, to)| {
                let fds = Arc::clone(&fds);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || relay(&fds[from], &fds[to], &stop))
            })
            .collect();
        Self { stop, threads }
    }
}

/// Copies packets from FROM to TO until STOP (checked every 100 ms).
fn relay(from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&raw mut poll, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: BUF is writable for its length.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        // A full queue on the other side drops the packet, as a link would.
        // SAFETY: the first N bytes of BUF are initialised.
        let _ = unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n) };
    }
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
