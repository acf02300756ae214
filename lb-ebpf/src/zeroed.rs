//! Zero initialisation without LLVM's `memset`.

use core::mem::{MaybeUninit, align_of, size_of};

/// Zeroes `slot` in place with 4-byte volatile stores and returns it.
/// LLVM turns a plain zero initialisation of a struct or array into a call
/// of a byte-by-byte `memset` subprogram here (several hundred
/// instructions); volatile stores are neither merged nor turned into one.
/// `T`'s size must be a multiple of 4 and its alignment at least 4
/// (checked at compile time).
///
/// # Safety
/// All-zero bytes must be a valid `T` (plain bytes: no references, no
/// `NonZero`, no enums without a zero variant).
#[inline(always)]
pub(crate) unsafe fn zeroed_in_place<T>(slot: &mut MaybeUninit<T>) -> &mut T {
    const {
        assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4);
    }
    let words = slot.as_mut_ptr().cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: `i` words are inside the slot (size checked above); the
        // slot is 4-aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte is zero, a valid `T` (the caller's promise).
    unsafe { slot.assume_init_mut() }
}
