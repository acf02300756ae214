//! A spoofed TCP SYN flood from a namespace the test created: raw IPv4
//! and IPv6 sockets (`IPPROTO_RAW`, the test writes every header), every
//! SYN from a new random source address and port, sent in batches with
//! `sendmmsg` as fast as the thread can, until a packet count or a time
//! limit is reached, whichever comes first.
//!
//! The sources are drawn from blocks that no namespace routes
//! (`100.64.0.0/10`, `fd00:dead::/32`), so the answers to them die in the
//! node (no route) and nothing leaves the test's namespaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::load::sockaddr;
use super::netns::enter_netns;

/// Packets per `sendmmsg`.
const BATCH: usize = 64;
/// IPv4 + TCP, IPv6 + TCP header sizes (no options, no payload).
const V4_LEN: usize = 40;
const V6_LEN: usize = 60;

/// When the flood stops.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FloodLimit {
    pub(crate) packets: u64,
    pub(crate) time: Duration,
}

/// What the flood sent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FloodReport {
    pub(crate) sent: u64,
    /// Packets the kernel refused (`ENOBUFS`, ...): not sent.
    pub(crate) refused: u64,
    pub(crate) elapsed: Duration,
    pub(crate) seed: u64,
}

impl FloodReport {
    /// Packets per second sent.
    pub(crate) fn rate(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let sent = self.sent as f64;
        sent / self.elapsed.as_secs_f64()
    }
}

/// xorshift64*: cheap, and the seed in the report reproduces a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Starts the flood from a thread in namespace NS against TARGETS in turn
/// (a batch each); join the handle for the report.
pub(crate) fn start(
    ns: &str,
    targets: &[SocketAddr],
    limit: FloodLimit,
) -> JoinHandle<FloodReport> {
    assert!(!targets.is_empty());
    let (ns, targets) = (ns.to_owned(), targets.to_vec());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| {
            u64::try_from(d.as_nanos() & 0xffff_ffff_ffff).unwrap_or(1)
        })
        | 1;
    std::thread::spawn(move || {
        enter_netns(&ns);
        flood(&targets, limit, seed)
    })
}

/// A raw socket of FAMILY that takes whole IP packets.
fn raw_socket(domain: libc::c_int) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(
        fd >= 0,
        "raw socket: {} (the flood needs root)",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor this function owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

fn flood(targets: &[SocketAddr], limit: FloodLimit, seed: u64) -> FloodReport {
    let v4 = raw_socket(libc::AF_INET);
    let v6 = raw_socket(libc::AF_INET6);
    let mut rng = Rng(seed);
    let mut packets = vec![[0_u8; V6_LEN]; BATCH];
    let start = Instant::now();
    let (mut sent, mut refused) = (0_u64, 0_u64);
    'flood: for &target in targets.iter().cycle() {
        let (fd, len) = match target {
            SocketAddr::V4(_) => (&v4, V4_LEN),
            SocketAddr::V6(_) => (&v6, V6_LEN),
        };
        for packet in &mut packets {
            syn(&mut packet[..len], target, &mut rng);
        }
        // Port 0: a raw IPv6 socket takes the port field as a protocol.
        let (mut addr, addr_len) = sockaddr(SocketAddr::new(target.ip(), 0));
        let mut iovecs: Vec<libc::iovec> = packets
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: len,
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: msghdr is plain data; all zeroes is valid.
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_name = (&raw mut addr).cast();
                hdr.msg_namelen = addr_len;
                hdr.msg_iov = iov;
                hdr.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: hdr,
                    msg_len: 0,
                }
            })
            .collect();
        let wanted = u64::try_from(BATCH)
            .expect("small")
            .min(limit.packets - sent);
        // SAFETY: WANTED messages, each pointing at a live buffer and address.
        let rc = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                messages.as_mut_ptr(),
                u32::try_from(wanted).expect("small"),
                0,
            )
        };
        match u64::try_from(rc) {
            Ok(n) => {
                sent += n;
                refused += wanted - n;
            }
            Err(_) => refused += wanted,
        }
        if sent >= limit.packets || start.elapsed() >= limit.time {
            break 'flood;
        }
    }
    FloodReport {
        sent,
        refused,
        elapsed: start.elapsed(),
        seed,
    }
}

/// Writes a SYN to TO from a random source into PACKET (IPv4 + TCP, or
/// IPv6 + TCP), checksums included.
fn syn(packet: &mut [u8], to: SocketAddr, rng: &mut Rng) {
    let r = rng.next();
    let sport = 1024 + u16::try_from(r % 64_000).expect("small");
    let seq = u32::try_from(r >> 32).expect("32 bits");
    let (l3, src, dst): (usize, IpAddr, IpAddr) = match to.ip() {
        IpAddr::V4(dst) => {
            // 100.64.0.0/10, never routed in the test's namespaces.
            let host = u32::try_from(rng.next() & 0x003f_ffff).expect("22 bits");
            let src = Ipv4Addr::from(0x6440_0000 | host);
            let h = &mut packet[..20];
            h.copy_from_slice(&[
                0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]);
            h[4..6].copy_from_slice(&r.to_be_bytes()[6..8]);
            h[12..16].copy_from_slice(&src.octets());
            h[16..20].copy_from_slice(&dst.octets());
            let csum = checksum(h, 0);
            h[10..12].copy_from_slice(&csum.to_be_bytes());
            (20, src.into(), dst.into())
        }
        IpAddr::V6(dst) => {
            // fd00:dead::/32, never routed in the test's namespaces.
            let low = u128::from(rng.next()) | (u128::from(rng.next() & 0xffff_ffff) << 64);
            let src = Ipv6Addr::from((0xfd00_dead_u128 << 96) | low);
            let h = &mut packet[..40];
            h[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
            h[8..24].copy_from_slice(&src.octets());
            h[24..40].copy_from_slice(&dst.octets());
            (40, src.into(), dst.into())
        }
    };
    let tcp = &mut packet[l3..l3 + 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].fill(0);
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240_u16.to_be_bytes());
    tcp[16..20].fill(0);
    let mut pseudo = 6_u32 + 20;
    for chunk in [ip_bytes(src), ip_bytes(dst)] {
        pseudo += sum16(&chunk);
    }
    let csum = checksum(tcp, pseudo);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// Sum of DATA's 16-bit big-endian words (even length).
fn sum16(data: &[u8]) -> u32 {
    data.as_chunks::<2>()
        .0
        .iter()
        .map(|w| u32::from(u16::from_be_bytes(*w)))
        .sum()
}

/// The Internet checksum of DATA (even length) on top of INITIAL.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial + sum16(data);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}
