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
    /// Split the work for this many threads (0 or 1 behave as `Sequential`).
    Threads(usize),
    /// Split the work for every thread of the current rayon pool.
    #[default]
    Auto,
}

impl Parallelism {
    /// The number of threads the work is split for (at least 1).
    pub fn threads(self) -> usize {
        match self {
            Parallelism::Sequential => 1,
            Parallelism::Threads(n) => n.max(1),
            Parallelism::Auto => rayon::current_num_threads().max(1),
        }
    }
}
