//! Reusable, 64-byte aligned per-thread scratch buffers for packing.
//!
//! A kernel *takes* a thread's buffer (leaving an empty one behind), grows it if needed and
//! gives it back when done, so steady-state calls allocate nothing; a nested call on the same
//! thread (rayon work stealing can run another kernel while one waits) simply finds an empty
//! buffer and allocates its own instead of aliasing.

use std::cell::RefCell;

/// One cache line of f32.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A growable, 64-byte aligned f32 buffer.
#[derive(Default)]
pub(crate) struct AlignedBuf(Vec<Line>);

impl AlignedBuf {
    /// A slice of at least `len` floats (contents unspecified).
    pub(crate) fn get(&mut self, len: usize) -> &mut [f32] {
        let lines = len.div_ceil(16);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0.0; 16]));
        }
        let flat: &mut [f32] = bytemuck::cast_slice_mut(&mut self.0);
        &mut flat[..len]
    }
}

thread_local! {
    static POOL: RefCell<Vec<AlignedBuf>> = const { RefCell::new(Vec::new()) };
}

/// Takes a scratch buffer from this thread's pool (or a new one).
pub(crate) fn take() -> AlignedBuf {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default()
}

/// Returns a buffer to this thread's pool for reuse.
pub(crate) fn give(buf: AlignedBuf) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < 4 {
            p.push(buf);
        }
    });
}
