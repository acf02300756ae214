//! What happens to a packet and why: the TC action and the
//! `lb_common::reason` it is counted under. Produced once per packet and
//! counted once, in `lb_tc`. Plain integers: this file also builds and is
//! tested on the host.

/// `TC_ACT_OK` (`linux/pkt_cls.h`): let the packet continue.
const TC_ACT_OK: i32 = 0;
/// `TC_ACT_SHOT`: drop the packet.
const TC_ACT_SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`: the packet went where `bpf_redirect*` sent it.
pub(crate) const TC_ACT_REDIRECT: i32 = 7;

/// What to do with the packet and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// TC action (`TC_ACT_*`).
    pub(crate) action: i32,
    /// `lb_common::reason::*`.
    pub(crate) reason: u32,
}

/// Marks an encoded verdict as present (an encoded `Ok(())` is 0).
const ENCODED: u64 = 1 << 62;

impl Verdict {
    /// Let the packet continue (translated or not).
    #[inline(always)]
    pub(crate) const fn pass(reason: u32) -> Self {
        Self {
            action: TC_ACT_OK,
            reason,
        }
    }

    /// Drop the packet.
    #[inline(always)]
    pub(crate) const fn drop(reason: u32) -> Self {
        Self {
            action: TC_ACT_SHOT,
            reason,
        }
    }

    /// The packet was redirected (`bpf_redirect*` said so).
    #[inline(always)]
    pub(crate) const fn redirect(reason: u32) -> Self {
        Self {
            action: TC_ACT_REDIRECT,
            reason,
        }
    }

    /// Packs into a scalar: BPF subprograms must not return structs (the
    /// verifier refuses a stack pointer left in R0 by the struct return).
    #[inline(always)]
    #[expect(
        clippy::cast_sign_loss,
        reason = "TC actions are small non-negative numbers; the bits are kept as they are"
    )]
    pub(crate) const fn encode(self) -> u64 {
        ENCODED | ((self.action as u32 as u64) << 32) | self.reason as u64
    }

    /// Unpacks `encode`'s result.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "the inverse of `encode`: the same bits back"
    )]
    pub(crate) const fn decode(code: u64) -> Self {
        Self {
            action: (code >> 32) as u32 as i32 & 0x3fff_ffff,
            reason: code as u32,
        }
    }
}

/// `Result<(), Verdict>` as a scalar, for subprogram returns.
#[inline(always)]
pub(crate) fn encode_unit(result: Result<(), Verdict>) -> u64 {
    match result {
        Ok(()) => 0,
        Err(verdict) => verdict.encode(),
    }
}

/// The inverse of `encode_unit`.
#[inline(always)]
pub(crate) fn decode_unit(code: u64) -> Result<(), Verdict> {
    if code == 0 {
        Ok(())
    } else {
        Err(Verdict::decode(code))
    }
}

#[cfg(test)]
mod tests {
    use lb_common::reason;

    use super::{
        ENCODED, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Verdict, decode_unit, encode_unit,
    };

    fn every_verdict() -> impl Iterator<Item = Verdict> {
        (0..reason::COUNT).flat_map(|reason| {
            [
                Verdict::pass(reason),
                Verdict::drop(reason),
                Verdict::redirect(reason),
            ]
        })
    }

    #[test]
    fn constructors_carry_the_tc_action() {
        assert_eq!(Verdict::pass(reason::NAT_NEW).action, TC_ACT_OK);
        assert_eq!(Verdict::drop(reason::DROP_REWRITE).action, TC_ACT_SHOT);
        assert_eq!(Verdict::redirect(reason::REJECT).action, TC_ACT_REDIRECT);
    }

    #[test]
    fn encode_decode_round_trips() {
        for verdict in every_verdict() {
            assert_eq!(Verdict::decode(verdict.encode()), verdict);
        }
    }

    #[test]
    fn encoded_verdicts_are_marked_and_never_zero() {
        for verdict in every_verdict() {
            let code = verdict.encode();
            assert_ne!(code, 0, "{verdict:?}: 0 is Ok(())");
            assert_eq!(code & ENCODED, ENCODED);
            // Bit 63 is the pipeline's own "go to the backend step" marker.
            assert_eq!(code >> 63, 0);
        }
    }

    #[test]
    fn encoding_known_answer() {
        assert_eq!(
            Verdict::drop(reason::DROP_NO_SNAT).encode(),
            (1 << 62) | (2 << 32) | u64::from(reason::DROP_NO_SNAT)
        );
        assert_eq!(Verdict::pass(0).encode(), 1 << 62);
    }

    #[test]
    fn unit_results_round_trip() {
        assert_eq!(encode_unit(Ok(())), 0);
        assert_eq!(decode_unit(0), Ok(()));
        for verdict in every_verdict() {
            assert_eq!(decode_unit(encode_unit(Err(verdict))), Err(verdict));
        }
    }
}
