//! The process's memory allocator: mimalloc, asked the cheapest way.
//!
//! The `mimalloc` crate's allocator passes every request to `mi_malloc_aligned`. In mimalloc
//! 3 that takes the plain allocation path only when the rounded size is a power of two; any
//! other size, such as most of Pingora's boxed futures and buffers, goes through the aligned
//! over-allocating path (the allocator row of `bench/README.md`). A request whose
//! alignment mimalloc's size classes already give (at most 16, and dividing the size, as C's
//! `malloc` guarantees for any object of that size) is sent to `mi_malloc`; the rest keep the
//! aligned calls. The same change is proposed upstream as mimalloc_rust pull request 170.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// Largest alignment every mimalloc block of a fitting size has (`MI_MAX_ALIGN_SIZE`).
const NATURAL_ALIGN: usize = 16;

/// mimalloc as the global allocator (`#[global_allocator] static A: Allocator = Allocator;`).
pub struct Allocator;

/// Whether a plain allocation of `size` bytes is already aligned to `align`.
#[inline]
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && size.is_multiple_of(align)
}

// SAFETY: every call is forwarded to mimalloc, which returns blocks of at least the requested
// size, aligned as `natural` describes or as asked of the `_aligned` calls; `mi_free` and
// `mi_realloc*` accept blocks from either family.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if natural(layout.size(), layout.align()) {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if natural(layout.size(), layout.align()) {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if natural(new_size, layout.align()) {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_is_aligned_as_asked() {
        let a = Allocator;
        let mut held = Vec::new();
        for align in [1usize, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1usize, 3, 8, 12, 24, 40, 48, 100, 1000, 1500, 3000, 70_000] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                for zeroed in [false, true] {
                    // SAFETY: the layout has a non-zero size; the block is freed below.
                    let p = unsafe {
                        if zeroed {
                            a.alloc_zeroed(layout)
                        } else {
                            a.alloc(layout)
                        }
                    };
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    if zeroed {
                        // SAFETY: `size` bytes were just allocated at `p`.
                        let bytes = unsafe { std::slice::from_raw_parts(p, size) };
                        assert!(bytes.iter().all(|b| *b == 0));
                    }
                    // Keep some alive so that later blocks do not reuse the same address.
                    held.push((p, layout));
                }
            }
        }
        for (p, layout) in held {
            // SAFETY: allocated above with this layout; grown once, then freed.
            unsafe {
                let grown = a.realloc(p, layout, layout.size() * 3);
                assert_eq!(grown as usize % layout.align(), 0);
                a.dealloc(
                    grown,
                    Layout::from_size_align_unchecked(layout.size() * 3, layout.align()),
                );
            }
        }
    }
}
