//! Wire headers: their layouts and every offset and protocol constant the
//! datapath uses, each defined once. Offsets named `*_OFF` are relative to
//! their own header unless the name says otherwise; `L3_OFF` and the
//! families' `L4_OFF` place the headers in the frame.

pub(crate) mod eth;
pub(crate) mod ipv4;
pub(crate) mod ipv6;
pub(crate) mod l4;

/// Offset of the IP header in the frame: right after Ethernet (TC sees a
/// VLAN tag in the skb metadata, not in the frame).
pub(crate) const L3_OFF: usize = eth::ETH_HLEN;
