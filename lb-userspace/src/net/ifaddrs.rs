//! The addresses configured on this network namespace's interfaces
//! (`getifaddrs`): the node addresses when neither a flag nor the Node
//! object names them.

use std::net::IpAddr;

use nix::sys::socket::SockaddrStorage;

/// Global unicast addresses of the interfaces in this network namespace
/// (no loopback, no link-local), in interface order.
#[must_use]
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ip in addresses.filter_map(|entry| entry.address.as_ref().and_then(sockaddr_ip)) {
        if usable_node_address(&ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

fn sockaddr_ip(addr: &SockaddrStorage) -> Option<IpAddr> {
    addr.as_sockaddr_in()
        .map(|v4| IpAddr::V4(v4.ip()))
        .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
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
    fn loopback_is_listed_by_getifaddrs_but_not_returned() {
        // Every namespace has `lo`; whatever else there is, never 127.0.0.1.
        let all: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .expect("getifaddrs")
            .filter_map(|entry| entry.address.as_ref().and_then(sockaddr_ip))
            .collect();
        assert!(all.iter().any(IpAddr::is_loopback), "{all:?}");
        assert!(!interface_addresses().iter().any(IpAddr::is_loopback));
    }

    #[test]
    fn link_local_and_loopback_are_not_node_addresses() {
        for addr in ["127.0.0.1", "169.254.1.1", "::1", "fe80::1", "0.0.0.0"] {
            assert!(!usable_node_address(&addr.parse().unwrap()), "{addr}");
        }
        assert!(usable_node_address(&"198.18.0.1".parse().unwrap()));
    }
}
