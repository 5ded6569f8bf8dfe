/// How many threads a kernel may use.
///
/// Parallel kernels split their work into a number of tasks that is a multiple of the thread
/// count and run them on the current rayon pool (the global one unless the caller runs the
/// kernel inside `ThreadPool::install`). Results do not depend on the thread count: every
/// output element is computed by the same sequence of operations whichever thread runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parallelism {
    /// Run on the calling thread only.
    Sequential,
    /// Split the work for this many threads (0 or 1 behave as `Sequential`; values above
    /// [`Parallelism::MAX_THREADS`] are clamped to it).
    Threads(usize),
    /// Split the work for every thread of the current rayon pool.
    #[default]
    Auto,
}

impl Parallelism {
    /// The most threads a kernel splits its work for.
    pub const MAX_THREADS: usize = 1024;

    /// The number of threads the work is split for (1 to [`Parallelism::MAX_THREADS`]).
    pub fn threads(self) -> usize {
        let n = match self {
            Parallelism::Sequential => 1,
            Parallelism::Threads(n) => n,
            Parallelism::Auto => rayon::current_num_threads(),
        };
        n.clamp(1, Self::MAX_THREADS)
    }
}

/// A raw pointer that may cross threads: the driver hands each task a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used to give rayon tasks disjoint regions of an output or scratch buffer; the
// pointee outlives the parallel section (it is borrowed by the enclosing call).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; tasks never access the same elements.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_clamped() {
        assert_eq!(Parallelism::Sequential.threads(), 1);
        assert_eq!(Parallelism::Threads(0).threads(), 1);
        assert_eq!(Parallelism::Threads(3).threads(), 3);
        assert_eq!(
            Parallelism::Threads(usize::MAX).threads(),
            Parallelism::MAX_THREADS
        );
        assert!(Parallelism::Auto.threads() >= 1);
    }
}
