//! The node's connected UDP sockets over `sock_diag` (`NETLINK_SOCK_DIAG`):
//! listing them with their socket cookies, and destroying one
//! (`SOCK_DESTROY`, `CONFIG_INET_DIAG_DESTROY`): its owner gets
//! `ECONNABORTED` and the socket is disconnected, so the application
//! reconnects (and is load-balanced anew). Raw netlink: the crate for it
//! (`netlink-packet-sock-diag`) is not in the tree, and two fixed-layout
//! messages are all this needs.

use std::{io, mem::size_of, net::IpAddr, os::fd::AsRawFd as _, os::fd::FromRawFd as _};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// `1 << TCP_ESTABLISHED`: a connected UDP socket's state.
const CONNECTED: u32 = 1 << 1;
const IPPROTO_UDP: u8 = 17;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct SockId {
    sport_be: u16,
    dport_be: u16,
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg` (the part before the attributes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const _: () = assert!(size_of::<SockId>() == 48);
const _: () = assert!(size_of::<ReqV2>() == 56);
const _: () = assert!(size_of::<DiagMsg>() == 72);

/// A connected UDP socket of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    /// Its cookie (what `bpf_get_socket_cookie` returns for it).
    pub cookie: u64,
    /// Its peer.
    pub peer: (IpAddr, u16),
    family: u8,
    id: SockId,
}

/// The connected UDP sockets of FAMILY (`libc::AF_INET` or `AF_INET6`) in
/// this network namespace.
///
/// # Errors
/// The netlink socket or the dump failed.
pub fn connected_udp(family: u8) -> io::Result<Vec<UdpSocket>> {
    let socket = open()?;
    let request = ReqV2 {
        family,
        protocol: IPPROTO_UDP,
        states: CONNECTED,
        ..ReqV2::default()
    };
    send(
        &socket,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        &request,
    )?;
    let mut found = Vec::new();
    let mut buf = vec![0_u8; 32 * 1024];
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        let mut offset = 0;
        while offset + size_of::<NlMsgHdr>() <= n {
            // SAFETY: bounds checked; plain integers.
            let header: NlMsgHdr =
                unsafe { buf.as_ptr().add(offset).cast::<NlMsgHdr>().read_unaligned() };
            let len = header.len as usize;
            if len < size_of::<NlMsgHdr>() || offset + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            match header.kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => return Err(netlink_error(&buf[offset..offset + len])),
                SOCK_DIAG_BY_FAMILY if len >= size_of::<NlMsgHdr>() + size_of::<DiagMsg>() => {
                    // SAFETY: length checked; plain integers.
                    let msg: DiagMsg = unsafe {
                        buf.as_ptr()
                            .add(offset + size_of::<NlMsgHdr>())
                            .cast::<DiagMsg>()
                            .read_unaligned()
                    };
                    found.push(UdpSocket {
                        cookie: u64::from(msg.id.cookie[0]) | (u64::from(msg.id.cookie[1]) << 32),
                        peer: (addr(msg.family, &msg.id.dst), u16::from_be(msg.id.dport_be)),
                        family: msg.family,
                        id: msg.id,
                    });
                }
                _ => {}
            }
            offset += (len + 3) & !3;
        }
    }
}

/// Destroys SOCKET: its owner's next call fails with `ECONNABORTED`.
///
/// # Errors
/// The kernel refused (`EOPNOTSUPP` without `CONFIG_INET_DIAG_DESTROY`,
/// `ENOENT` when the socket is gone already).
pub fn destroy(socket: &UdpSocket) -> io::Result<()> {
    let netlink = open()?;
    let request = ReqV2 {
        family: socket.family,
        protocol: IPPROTO_UDP,
        states: u32::MAX,
        id: socket.id,
        ..ReqV2::default()
    };
    send(&netlink, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &request)?;
    let mut buf = [0_u8; 512];
    // SAFETY: valid fd and buffer.
    let n = unsafe { libc::recv(netlink.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    if n < size_of::<NlMsgHdr>() + 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink answer",
        ));
    }
    let error = netlink_error(&buf[..n]);
    if error.raw_os_error() == Some(0) {
        Ok(())
    } else {
        Err(error)
    }
}

fn open() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn send(socket: &std::os::fd::OwnedFd, kind: u16, flags: u16, request: &ReqV2) -> io::Result<()> {
    #[repr(C)]
    struct Message {
        header: NlMsgHdr,
        request: ReqV2,
    }
    let message = Message {
        header: NlMsgHdr {
            len: u32::try_from(size_of::<Message>()).unwrap_or(u32::MAX),
            kind,
            flags,
            seq: 1,
            pid: 0,
        },
        request: *request,
    };
    // SAFETY: valid fd; the message is plain integers of the given size.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            (&raw const message).cast(),
            size_of::<Message>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The errno of an `NLMSG_ERROR` message (0: an acknowledgement).
fn netlink_error(message: &[u8]) -> io::Error {
    let at = size_of::<NlMsgHdr>();
    let code = message
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(libc::EIO, i32::from_ne_bytes);
    io::Error::from_raw_os_error(-code)
}

fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if i32::from(family) == libc::AF_INET {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}
