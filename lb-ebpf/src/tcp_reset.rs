//! The TCP reset a closed port answers with (RFC 9293, 3.10.7.1): the
//! datapath refuses TCP to a frontend without endpoints (or to an unserved
//! port of a service address) with a reset rather than an ICMP error.
//!
//! Why a reset: a client connecting over veth gets the datapath's answer
//! synchronously, while its `connect()` still holds the socket lock. The
//! kernel keeps an ICMP error that arrives then only as a soft error, and
//! the connection fails a second later on the SYN's retransmission (the
//! kernel's own `reject` behaves alike); a reset is queued on the socket's
//! backlog and refuses the connection as soon as the lock is released.
//! Plain arithmetic: it builds (and is unit-tested) on the host too.

/// The TCP flag bits this module reads and writes.
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// Sequence number, acknowledgment number and flags of a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reset {
    /// Sequence number (host order).
    pub(crate) seq: u32,
    /// Acknowledgment number (host order; 0 without `ACK`).
    pub(crate) ack_seq: u32,
    /// Flags: `RST`, or `RST | ACK`.
    pub(crate) flags: u8,
}

/// The reset answering a segment with `flags`, sequence number `seq`,
/// acknowledgment number `ack_seq` and `payload_len` bytes of data; `None`
/// for a reset (a reset is never answered).
#[inline(always)]
pub(crate) fn answer(flags: u8, seq: u32, ack_seq: u32, payload_len: u32) -> Option<Reset> {
    if flags & RST != 0 {
        return None;
    }
    if flags & ACK != 0 {
        // <SEQ=SEG.ACK><CTL=RST>
        return Some(Reset {
            seq: ack_seq,
            ack_seq: 0,
            flags: RST,
        });
    }
    // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>; SYN and FIN count one each.
    let len = payload_len + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
    Some(Reset {
        seq: 0,
        ack_seq: seq.wrapping_add(len),
        flags: RST | ACK,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_gets_rst_ack_acknowledging_the_syn() {
        assert_eq!(
            answer(SYN, 1000, 0, 0),
            Some(Reset {
                seq: 0,
                ack_seq: 1001,
                flags: RST | ACK
            })
        );
        // Sequence numbers wrap.
        assert_eq!(answer(SYN, u32::MAX, 0, 0).unwrap().ack_seq, 0);
    }

    #[test]
    fn data_and_fin_without_ack_are_acknowledged_in_full() {
        assert_eq!(answer(FIN, 10, 0, 5).unwrap().ack_seq, 16);
        assert_eq!(answer(0, 10, 0, 5).unwrap().ack_seq, 15);
    }

    #[test]
    fn a_segment_with_ack_gets_a_bare_rst_at_its_ack_number() {
        assert_eq!(
            answer(ACK, 1000, 77, 12),
            Some(Reset {
                seq: 77,
                ack_seq: 0,
                flags: RST
            })
        );
        assert_eq!(answer(SYN | ACK, 1, 2, 0).unwrap().flags, RST);
    }

    #[test]
    fn a_reset_is_never_answered() {
        assert_eq!(answer(RST, 1, 0, 0), None);
        assert_eq!(answer(RST | ACK, 1, 2, 0), None);
    }
}
