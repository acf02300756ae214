//! Internet checksum arithmetic (RFC 1071, incremental updates after
//! RFC 1624), over 32-bit words as they sit in the packet (read natively,
//! as the kernel's checksum helpers do). Plain integers: this file also
//! builds and is tested on the host.

/// A ones'-complement checksum difference (RFC 1624) between old and new
/// bytes, accumulated unfolded.
#[derive(Clone, Copy)]
pub(crate) struct CsumDiff(u64);

impl CsumDiff {
    /// No change.
    pub(crate) const NONE: Self = Self(0);

    /// Adds the change of one 32-bit word from `old` to `new`.
    #[inline(always)]
    pub(crate) fn word(self, old: u32, new: u32) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    /// Adds the change of a 16-bit field (as it sits in the packet, read
    /// natively): a checksum field inside a checksummed message, for one.
    /// Its place in a 32-bit word does not matter once folded.
    #[inline(always)]
    pub(crate) fn half(self, old: u16, new: u16) -> Self {
        Self(self.0 + u64::from(!old) + u64::from(new))
    }

    /// Adds another difference.
    #[inline(always)]
    pub(crate) fn add(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }

    /// Adds the change of a 4-byte field.
    #[inline(always)]
    pub(crate) fn bytes4(self, old: [u8; 4], new: [u8; 4]) -> Self {
        self.word(u32::from_ne_bytes(old), u32::from_ne_bytes(new))
    }

    /// Adds the change of a 16-byte field.
    #[inline(always)]
    pub(crate) fn bytes16(self, old: &[u8; 16], new: &[u8; 16]) -> Self {
        let mut diff = self;
        let mut i = 0;
        while i < 16 {
            diff = diff.bytes4(
                [old[i], old[i + 1], old[i + 2], old[i + 3]],
                [new[i], new[i + 1], new[i + 2], new[i + 3]],
            );
            i += 4;
        }
        diff
    }

    /// Adds a difference already folded to a `__wsum`.
    #[inline(always)]
    pub(crate) fn add_wsum(self, wsum: u32) -> Self {
        Self(self.0 + u64::from(wsum))
    }

    /// The difference as the kernel's 32-bit `__wsum`.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "two end-around carries leave 32 bits"
    )]
    pub(crate) fn wsum(self) -> u32 {
        let x = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        ((x & 0xffff_ffff) + (x >> 32)) as u32
    }

    /// `check` (a 16-bit checksum field as read) updated by this
    /// difference: RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`.
    #[inline(always)]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "four end-around carries leave 16 bits"
    )]
    pub(crate) fn apply(self, check: u16) -> u16 {
        let mut x = u64::from(!check) + self.0;
        x = (x & 0xffff) + (x >> 16);
        x = (x & 0xffff) + (x >> 16);
        x = (x & 0xffff) + (x >> 16);
        x = (x & 0xffff) + (x >> 16);
        !(x as u16)
    }
}

/// Folds a 32-bit ones'-complement sum to the 16-bit checksum field, in
/// packet byte order.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "two end-around carries leave 16 bits"
)]
pub(crate) fn fold(sum: u32) -> [u8; 2] {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}

#[cfg(test)]
mod tests;
