//! The addresses configured on this network namespace's interfaces
//! (`getifaddrs`): the node addresses when neither a flag nor the Node
//! object names them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Global unicast addresses of the interfaces in this network namespace
/// (no loopback, no link-local), in interface order.
#[must_use]
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return out;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned.
        let (addr, next) = unsafe { ((*entry).ifa_addr, (*entry).ifa_next) };
        if let Some(ip) = sockaddr_ip(addr)
            && usable_node_address(&ip)
            && !out.contains(&ip)
        {
            out.push(ip);
        }
        entry = next;
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(list) };
    out
}

fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: non-null sockaddr from getifaddrs; the family says its type.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let v4 = &*addr.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*addr.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

fn usable_node_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_loopback_are_not_node_addresses() {
        for addr in ["127.0.0.1", "169.254.1.1", "::1", "fe80::1", "0.0.0.0"] {
            assert!(!usable_node_address(&addr.parse().unwrap()), "{addr}");
        }
        assert!(usable_node_address(&"198.18.0.1".parse().unwrap()));
    }
}
