//! Device features of a veth in a test namespace, through the ethtool
//! ioctl (no `ethtool` binary needed): GRO on a peer that receives
//! `XDP_TX`/`XDP_REDIRECT` frames, transmit checksumming off on a sender
//! whose frames meet XDP (a veth hands XDP the sender's partial checksum,
//! which a NIC never does).

use super::netns::in_netns;

/// `SIOCETHTOOL` commands (`linux/ethtool.h`), on `struct ethtool_value`.
pub(crate) const ETHTOOL_STXCSUM: u32 = 0x17;
pub(crate) const ETHTOOL_SGRO: u32 = 0x2c;

/// Sets an on/off device feature (`ETHTOOL_S*`) of IFACE in namespace NS.
pub(crate) fn ethtool_set(ns: &str, iface: &str, cmd: u32, on: bool) {
    #[repr(C)]
    struct Value {
        cmd: u32,
        data: u32,
    }
    let name = iface.to_owned();
    let rc = in_netns(ns, move || {
        let mut value = Value {
            cmd,
            data: u32::from(on),
        };
        // SAFETY: a zeroed ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        req.ifr_ifru.ifru_data = (&raw mut value).cast();
        // SAFETY: plain socket(2), closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: SIOCETHTOOL reads the ethtool_value `ifr_data` points at.
        let rc = unsafe { libc::ioctl(fd, 0x8946, &raw mut req) };
        let error = std::io::Error::last_os_error();
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        (rc == 0).then_some(()).ok_or(error)
    });
    rc.unwrap_or_else(|e| panic!("ethtool cmd {cmd:#x} on {iface} in {ns}: {e}"));
}
