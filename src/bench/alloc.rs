//! A counting global allocator: the heap bytes a process holds now and at its peak, so that a
//! benchmark can report how much memory one call of a kernel needs beyond its operands.
//!
//! The `tessera` binary installs [`CountingAlloc`] as its `#[global_allocator]` (and so does
//! this crate's unit-test binary); other binaries that link the library (criterion benches,
//! integration tests) keep the system allocator, and [`measure_peak`] then reports `None`.
//! Counting costs two relaxed atomic operations per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// [`System`], counting the bytes it hands out.
pub struct CountingAlloc;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

fn shrank(n: usize) {
    CURRENT.fetch_sub(n, Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc`
// contract; the counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[cfg(test)]
#[global_allocator]
static TEST_ALLOC: CountingAlloc = CountingAlloc;

/// Whether [`CountingAlloc`] is this process's allocator (it has counted something: any
/// process holds some heap by the time it calls this).
pub fn is_counting() -> bool {
    CURRENT.load(Relaxed) > 0
}

/// Heap bytes held now (0 without [`CountingAlloc`]).
pub fn current_bytes() -> usize {
    CURRENT.load(Relaxed)
}

/// Runs `f` and returns its result and the most heap bytes held at any moment during the
/// call beyond those held when it started (`None` without [`CountingAlloc`]). Allocations of
/// other threads meanwhile count too: run nothing else concurrently.
pub fn measure_peak<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    let base = CURRENT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let r = f();
    let peak = PEAK.load(Relaxed);
    (r, is_counting().then(|| peak.saturating_sub(base)))
}

/// `bytes` as `"12.3 MiB"` (KiB below 1 MiB, bytes below 1 KiB).
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_counts_a_temporary_buffer() {
        assert!(is_counting());
        let (sum, peak) = measure_peak(|| {
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v)
                .iter()
                .map(|&x| x as usize)
                .sum::<usize>()
        });
        assert_eq!(sum, 64 << 20);
        // Other tests may allocate meanwhile: a lower bound only.
        assert!(peak.unwrap() >= 64 << 20, "{peak:?}");
    }

    #[test]
    fn bytes_format() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
        assert_eq!(format_bytes(3 << 30), "3.00 GiB");
    }
}
