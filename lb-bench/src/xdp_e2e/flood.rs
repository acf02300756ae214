//! The system side of the XDP end-to-end stage: device features, CPU
//! time, and the UDP sender and sink.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::UDP_TARGET;
use crate::sys::Netns;

/// UDP payload: an 18-byte payload makes a 60-byte IPv4 frame (64 on a
/// wire with its FCS, the classic small packet); IPv6 adds 20.
pub(super) const PAYLOAD: usize = 18;
/// Datagrams per `sendmmsg`.
const BATCH: libc::c_uint = 32;

/// `SIOCETHTOOL` commands (`linux/ethtool.h`), on `struct ethtool_value`.
pub(super) const ETHTOOL_STXCSUM: u32 = 0x17;
pub(super) const ETHTOOL_SGRO: u32 = 0x2c;

/// Sets an on/off device feature (`ETHTOOL_S*`) of IFACE in NS.
pub(super) fn ethtool_set(ns: &Netns, iface: &str, cmd: u32, on: bool) -> anyhow::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    ns.run_in(|| {
        let mut value = EthtoolValue {
            cmd,
            data: u32::from(on),
        };
        // SAFETY: a zeroed ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        req.ifr_ifru.ifru_data = (&raw mut value).cast();
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        // SAFETY: SIOCETHTOOL reads the ethtool_value `ifr_data` points at.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), 0x8946, &raw mut req) };
        if rc != 0 {
            bail!(
                "ethtool {cmd:#x} on {iface} in {}: {}",
                ns.name(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    })
}

/// CPU time so far of the `/proc/stat` line LABEL (`cpu`: the machine,
/// `cpu0`: the sender's CPU), in ns: (softirq, busy = user + nice +
/// system + irq + softirq).
pub(super) fn cpu_ns(label: &str) -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some(label))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // USER_HZ is 100 on every Linux ABI: a tick is 10 ms.
    let tick = 1e7;
    let get = |i: usize| fields.get(i).copied().unwrap_or(f64::NAN) * tick;
    (get(6), get(0) + get(1) + get(2) + get(5) + get(6))
}

/// Blasts PAYLOAD-byte datagrams at TO with `sendmmsg` for SECS; the
/// number the kernel took.
pub(super) fn blast(to: SocketAddr, secs: u32) -> anyhow::Result<u64> {
    crate::sys::pin_thread(0);
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(to)?;
    let payload = [0x5a_u8; PAYLOAD];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: PAYLOAD,
    };
    // SAFETY: zeroed mmsghdr are valid; each points at the one iovec
    // (the kernel only reads it), on a connected socket (no address).
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs));
    let mut sent = 0_u64;
    while Instant::now() < deadline {
        // SAFETY: MSGS holds BATCH valid headers.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH,
                libc::MSG_DONTWAIT,
            )
        };
        // Full queues (ENOBUFS, EAGAIN) are part of the measurement.
        sent += u64::try_from(n).unwrap_or(0);
    }
    Ok(sent)
}

/// Counts datagrams at the backend's UDP sink until STOP; READY is set
/// once bound.
pub(super) fn sink(ready: &AtomicBool, stop: &AtomicBool) -> anyhow::Result<u64> {
    crate::sys::pin_thread(1);
    let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_TARGET))?;
    // Dual-stack socket for IPv6 would collide with the IPv4 one: v6only.
    let v6 = {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket(2); the fd is owned by the UdpSocket below.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        let socket = unsafe { UdpSocket::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with an int option.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&raw const one).cast(),
                4,
            );
        }
        bind_v6(&socket, format!("[::]:{UDP_TARGET}").parse()?)?;
        socket
    };
    let mut count = 0_u64;
    let mut buf = [0_u8; 2048];
    for socket in [&v4, &v6] {
        socket.set_nonblocking(true)?;
    }
    ready.store(true, Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        let mut idle = true;
        for socket in [&v4, &v6] {
            while socket.recv(&mut buf).is_ok() {
                count += 1;
                idle = false;
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(count)
}

fn bind_v6(socket: &UdpSocket, addr: SocketAddr) -> anyhow::Result<()> {
    let SocketAddr::V6(addr) = addr else {
        bail!("not IPv6: {addr}");
    };
    // SAFETY: a zeroed sockaddr_in6 is valid; filled below.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6)?;
    sa.sin6_port = addr.port().to_be();
    sa.sin6_addr.s6_addr = addr.ip().octets();
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in6>())?;
    // SAFETY: bind with a sockaddr_in6 of its size.
    let rc = unsafe { libc::bind(socket.as_raw_fd(), (&raw const sa).cast(), len) };
    if rc != 0 {
        bail!("bind {addr}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
