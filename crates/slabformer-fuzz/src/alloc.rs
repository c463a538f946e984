//! A counting global allocator: live heap bytes, the peak during one input, and a bound. A
//! request that would take the live heap above `baseline + bound` is refused (null), after the
//! input's seed is written to stderr without allocating; Rust then aborts (or returns the error
//! of a `try_reserve`). Linking this crate installs it, in the fuzz binary and its tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Live bytes above which requests are refused (`usize::MAX`: no bound).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static REPORTING: AtomicBool = AtomicBool::new(false);

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Decimal digits of `v` into `buf`, without allocating.
fn digits(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

fn refuse(size: usize) {
    if REPORTING.swap(true, Ordering::SeqCst) {
        return;
    }
    let (mut a, mut b, mut c) = ([0u8; 20], [0u8; 20], [0u8; 20]);
    let seed = crate::CURRENT_INPUT.load(Ordering::SeqCst);
    let mut err = std::io::stderr();
    let _ = err.write_all(b"slabformer-fuzz: input ");
    let _ = err.write_all(digits(seed, &mut a));
    let _ = err.write_all(b" asked for ");
    let _ = err.write_all(digits(size as u64, &mut b));
    let _ = err.write_all(b" bytes with ");
    let _ = err.write_all(digits(LIVE.load(Ordering::SeqCst) as u64, &mut c));
    let _ = err.write_all(b" live, beyond the allocation bound; reproduce with --replay ");
    let _ = err.write_all(digits(seed, &mut a));
    let _ = err.write_all(b"\n");
    REPORTING.store(false, Ordering::SeqCst);
}

/// Reserves `size` bytes in the count; false (and nothing counted) when that passes the limit.
fn take(size: usize) -> bool {
    let live = LIVE.fetch_add(size, Ordering::SeqCst).saturating_add(size);
    if live > LIMIT.load(Ordering::Relaxed) {
        LIVE.fetch_sub(size, Ordering::SeqCst);
        refuse(size);
        return false;
    }
    PEAK.fetch_max(live, Ordering::Relaxed);
    true
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !take(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !take(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !take(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Ordering::SeqCst);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Ordering::SeqCst);
        }
        p
    }
}

/// Bytes live now.
pub fn live() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// Starts counting one input: the bound is `bound` bytes above what is live now (returned).
pub fn start_input(bound: usize) -> usize {
    let baseline = live();
    PEAK.store(baseline, Ordering::SeqCst);
    LIMIT.store(baseline.saturating_add(bound), Ordering::SeqCst);
    baseline
}

/// Ends the input: lifts the bound, returns its peak above `baseline`.
pub fn end_input(baseline: usize) -> usize {
    LIMIT.store(usize::MAX, Ordering::SeqCst);
    PEAK.load(Ordering::SeqCst).saturating_sub(baseline)
}
