//! Ethernet (an offloaded VLAN tag is in skb metadata, others in the frame).

/// Ethernet header length.
pub(crate) const ETH_HLEN: usize = 14;
/// Offset of the destination MAC address.
pub(crate) const DADDR_OFF: usize = 0;
/// Offset of the source MAC address.
pub(crate) const SADDR_OFF: usize = 6;
/// Length of a MAC address.
pub(crate) const ALEN: usize = 6;
/// Offset of the `EtherType`.
pub(crate) const PROTO_OFF: usize = 12;
/// `EtherType` IPv4.
pub(crate) const ETH_P_IP: u16 = 0x0800;
/// `EtherType` IPv6.
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
/// `EtherType` IPv4 as it sits in the packet (network order read natively).
pub(crate) const ETH_P_IP_BE: u16 = ETH_P_IP.to_be();
/// `EtherType` IPv6 as it sits in the packet.
pub(crate) const ETH_P_IPV6_BE: u16 = ETH_P_IPV6.to_be();
/// `EtherType` of an 802.1Q VLAN tag, as it sits in the packet.
pub(crate) const ETH_P_8021Q_BE: u16 = 0x8100_u16.to_be();
/// `EtherType` of an 802.1ad (`QinQ`) service tag, as it sits in the packet.
pub(crate) const ETH_P_8021AD_BE: u16 = 0x88a8_u16.to_be();
