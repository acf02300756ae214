//! Wire headers: their layouts and every offset and protocol constant the
//! datapath uses, each defined once. Offsets named `*_OFF` are relative to
//! their own header unless the name says otherwise; `L3_OFF` and the
//! families' `L4_OFF` place the headers in the frame.

pub(crate) mod eth;
pub(crate) mod ipv4;
pub(crate) mod ipv6;
pub(crate) mod l4;

/// Offset of the IP header in an Ethernet frame: right after Ethernet (TC
/// sees an offloaded VLAN tag in the skb metadata, not in the frame).
pub(crate) const L3_OFF: usize = eth::ETH_HLEN;

/// The link layer of the device a program is attached to: where the IP
/// header starts. The pipeline is written once over it (through
/// `family::Family`), so each entry point gets its offsets as constants.
pub(crate) trait Link {
    /// Offset of the IP header.
    const L3_OFF: usize;
    /// Whether frames carry an Ethernet header (MAC addresses, `EtherType`).
    const ETHERNET: bool;
}

/// Ethernet devices (veth, NICs, VXLAN, bridges).
pub(crate) struct Eth;
/// Devices without a link-layer header: IPIP (`tunl0`), `ip6tnl`, GRE in
/// L3 mode, `WireGuard`, tun. The packet starts with the IP header.
pub(crate) struct Raw;

impl Link for Eth {
    const L3_OFF: usize = L3_OFF;
    const ETHERNET: bool = true;
}

impl Link for Raw {
    const L3_OFF: usize = 0;
    const ETHERNET: bool = false;
}
