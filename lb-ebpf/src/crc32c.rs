//! `CRC32c` (Castagnoli), SCTP's checksum (RFC 9260 appendix A), updated
//! incrementally when the port word of an SCTP packet changes.
//!
//! SCTP's checksum covers the whole packet and no pseudo-header, so an
//! address rewrite leaves it valid and a port rewrite does not. Recomputing
//! it means reading every byte of the packet (Cilium drops an SCTP packet
//! whose port would change for that reason). A CRC is linear over GF(2)
//! instead: for two messages of equal length, `crc(a) ^ crc(b)` is the raw
//! CRC (zero initial value, no final xor) of `a ^ b`. The ports are the
//! first four bytes of the packet, so `a ^ b` is those four bytes followed
//! by `len - 4` zero bytes, whose raw CRC is the CRC of the four bytes
//! times `x^(8 (len - 4))` modulo the polynomial: at most 16 products
//! with the constants `x^(8 2^k)` (as zlib's `crc32_combine`) for a 64 KiB
//! packet, each taken with nibble tables. The update costs the same whatever the packet's size and reads
//! nothing of the payload. Plain integers: this file also builds and is
//! tested on the host.

/// The Castagnoli polynomial, bit-reflected (bit 31 is the coefficient of
/// `x^0`, as `CRC32c` computes).
const POLY: u32 = 0x82f6_3b78;

/// `x^8` in the reflected representation: one zero byte.
const X8: u32 = 1 << 23;

/// `x^32` in the reflected representation: what the raw CRC of four bytes
/// multiplies them by.
const X32: u32 = {
    let x16 = mul(X8, X8);
    mul(x16, x16)
};

/// `a * b` modulo the polynomial, both reflected. Compile time only (the
/// tables): at run time each step's "if the low bit is set" becomes a
/// mask the verifier explores both ways, 32 times per product.
const fn mul(a: u32, b: u32) -> u32 {
    let mut b = b;
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        // The coefficient of x^i in `a`.
        if (a >> (31 - i)) & 1 != 0 {
            product ^= b;
        }
        // b *= x.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        i += 1;
    }
    product
}

/// The constants products are taken with at run time: `x^(8 2^k)` for
/// k < 16 (`2^k` zero bytes; 16 cover an IP packet's length), then
/// `x^32`.
const FACTORS: [u32; 17] = {
    let mut factors = [X32; 17];
    let mut square = X8;
    let mut k = 0;
    while k < 16 {
        factors[k] = square;
        square = mul(square, square);
        k += 1;
    }
    factors
};

/// Index of `x^32` in `FACTORS`.
const BY_X32: usize = 16;

/// `NIBBLES[f][p][v]` is `FACTORS[f] * (v << 4 p)`: a product with a
/// constant is the xor of its eight nibbles' products (it is linear), so
/// at run time it is eight loads and xors (8.5 KiB of `.rodata`), which
/// the verifier walks once whatever the values.
static NIBBLES: [[[u32; 16]; 8]; 17] = {
    let mut table = [[[0; 16]; 8]; 17];
    let mut f = 0;
    while f < 17 {
        let mut p = 0;
        while p < 8 {
            let mut v = 0;
            while v < 16 {
                #[expect(clippy::cast_possible_truncation, reason = "below 16")]
                let nibble = v as u32;
                table[f][p][v] = mul(FACTORS[f], nibble << (4 * p));
                v += 1;
            }
            p += 1;
        }
        f += 1;
    }
    table
};

/// `value * FACTORS[f]`.
#[inline(always)]
fn times(f: usize, value: u32) -> u32 {
    let table = &NIBBLES[f];
    let mut product = 0;
    let mut p = 0;
    while p < 8 {
        product ^= table[p][((value >> (4 * p)) & 0xf) as usize];
        p += 1;
    }
    product
}

/// What to xor into an SCTP packet's checksum (as a number; the packet
/// holds it little-endian) when its first four bytes change from `old` to
/// `new`, the packet (SCTP header and chunks) being `len` bytes long
/// (at least 4, below 2^16 + 4).
#[inline(always)]
pub(crate) fn first_word_delta(old: [u8; 4], new: [u8; 4], len: u32) -> u32 {
    let diff = u32::from_le_bytes([
        old[0] ^ new[0],
        old[1] ^ new[1],
        old[2] ^ new[2],
        old[3] ^ new[3],
    ]);
    // The raw CRC (zero initial value, no final xor) of the four bytes,
    // then the rest of the packet as that many zero bytes: one product
    // per bit of their number. The running value is never one the
    // verifier knows, so both ways of each bit end in the same state.
    let mut acc = times(BY_X32, diff);
    let zeros = len.saturating_sub(4);
    let mut k = 0;
    while k < 16 {
        if (zeros >> k) & 1 != 0 {
            acc = times(k, acc);
        }
        k += 1;
    }
    acc
}

#[cfg(test)]
mod tests;
