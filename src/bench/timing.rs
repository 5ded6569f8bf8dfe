//! Timing: warm up, repeat until enough time and repetitions have passed, report the median.

use std::time::{Duration, Instant};

/// How long to time one kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimingConfig {
    /// Untimed calls before timing starts.
    pub warmup: usize,
    /// Keep timing until at least this much time has been spent ...
    pub min_time: Duration,
    /// ... and at least this many repetitions were timed.
    pub min_reps: usize,
    /// Stop after this many repetitions, however fast the kernel is.
    pub max_reps: usize,
    /// Stop once this much time has been spent (after at least one repetition), even short of
    /// `min_reps`: a very slow kernel (say, a forced scalar ISA) must not stall the run.
    pub max_time: Duration,
}

impl TimingConfig {
    /// The default of `tessera bench`: 0.5 s and 5 repetitions at least.
    pub const FULL: TimingConfig = TimingConfig {
        warmup: 1,
        min_time: Duration::from_millis(500),
        min_reps: 5,
        max_reps: 10_000,
        max_time: Duration::from_secs(10),
    };

    /// `--quick`: a smoke test, not a measurement.
    pub const QUICK: TimingConfig = TimingConfig {
        warmup: 1,
        min_time: Duration::from_millis(50),
        min_reps: 3,
        max_reps: 1_000,
        max_time: Duration::from_secs(2),
    };

    /// Whether to stop after `reps` timed repetitions that took `elapsed` in total.
    pub fn should_stop(&self, reps: usize, elapsed: Duration) -> bool {
        if reps == 0 {
            return false;
        }
        (elapsed >= self.min_time && reps >= self.min_reps)
            || reps >= self.max_reps
            || elapsed >= self.max_time
    }
}

/// Summary of the timed repetitions, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median of the repetitions (the reported time).
    pub median: f64,
    /// Fastest repetition.
    pub min: f64,
    /// Slowest repetition.
    pub max: f64,
    /// Number of timed repetitions.
    pub reps: usize,
}

impl Stats {
    /// Summarizes the samples (seconds per repetition); `None` when there are none or one is
    /// not a finite non-negative number.
    pub fn from_samples(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
        };
        Some(Stats {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            reps: n,
        })
    }
}

/// Times `f`: `cfg.warmup` untimed calls, then timed calls until [`TimingConfig::should_stop`].
pub fn measure(cfg: &TimingConfig, mut f: impl FnMut()) -> Stats {
    for _ in 0..cfg.warmup {
        f();
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    loop {
        let t0 = Instant::now();
        f();
        samples.push(t0.elapsed().as_secs_f64());
        if cfg.should_stop(samples.len(), start.elapsed()) {
            break;
        }
    }
    Stats::from_samples(&samples).expect("at least one finite sample")
}

/// Times `f` and `g` (a kernel and its peer) with their calls alternating, so that a change in
/// the machine's load during the measurement affects both alike and their ratio stays fair.
/// Each gets `cfg.warmup` untimed calls; both get the same number of timed calls, until
/// [`TimingConfig::should_stop`] holds for the slower one's time (or the sum reaches
/// `max_time`).
pub fn measure_pair(
    cfg: &TimingConfig,
    mut f: impl FnMut(),
    mut g: impl FnMut(),
) -> (Stats, Stats) {
    for _ in 0..cfg.warmup {
        f();
        g();
    }
    let (mut sf, mut sg) = (Vec::new(), Vec::new());
    let (mut tf, mut tg) = (Duration::ZERO, Duration::ZERO);
    loop {
        let t0 = Instant::now();
        f();
        let t1 = Instant::now();
        g();
        let t2 = Instant::now();
        tf += t1 - t0;
        tg += t2 - t1;
        sf.push((t1 - t0).as_secs_f64());
        sg.push((t2 - t1).as_secs_f64());
        let n = sf.len();
        let capped = n >= cfg.max_reps || tf + tg >= cfg.max_time;
        if capped || cfg.should_stop(n, tf.max(tg)) {
            break;
        }
    }
    let stats = |s: &[f64]| Stats::from_samples(s).expect("at least one finite sample");
    (stats(&sf), stats(&sg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Stats::from_samples(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.reps), (2.0, 1.0, 3.0, 3));
        let s = Stats::from_samples(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        // One outlier does not move the median.
        let s = Stats::from_samples(&[1.0, 1.0, 1.0, 1.0, 100.0]).unwrap();
        assert_eq!(s.median, 1.0);
        assert_eq!(s.max, 100.0);
    }

    #[test]
    fn bad_samples_are_refused() {
        assert!(Stats::from_samples(&[]).is_none());
        assert!(Stats::from_samples(&[1.0, f64::NAN]).is_none());
        assert!(Stats::from_samples(&[-1.0]).is_none());
    }

    #[test]
    fn stop_rule_needs_time_and_reps() {
        let cfg = TimingConfig::FULL;
        let ms = Duration::from_millis;
        assert!(!cfg.should_stop(0, ms(100_000)));
        // Enough reps, not enough time.
        assert!(!cfg.should_stop(100, ms(100)));
        // Enough time, not enough reps.
        assert!(!cfg.should_stop(2, ms(600)));
        assert!(cfg.should_stop(5, ms(500)));
        // Caps.
        assert!(cfg.should_stop(cfg.max_reps, ms(1)));
        assert!(cfg.should_stop(1, cfg.max_time));
    }

    #[test]
    fn measure_pair_alternates_and_waits_for_both() {
        let cfg = TimingConfig {
            warmup: 1,
            min_time: Duration::from_millis(20),
            min_reps: 3,
            max_reps: 1000,
            max_time: Duration::from_secs(60),
        };
        let log = std::cell::RefCell::new(Vec::new());
        let (fast, slow) = measure_pair(
            &cfg,
            || log.borrow_mut().push('f'),
            || {
                log.borrow_mut().push('g');
                std::thread::sleep(Duration::from_millis(5));
            },
        );
        let log = log.into_inner();
        // Strict alternation, f first.
        assert!(log.chunks(2).all(|p| p == ['f', 'g']), "{log:?}");
        assert_eq!(fast.reps, slow.reps);
        assert_eq!(log.len(), 2 * (fast.reps + 1));
        // The slow one sets the pace: 20 ms of ~5 ms calls, not 1000 reps for the fast one.
        assert!((3..=6).contains(&slow.reps), "{}", slow.reps);
        assert!(slow.median >= 0.005 && fast.median < slow.median);
        // The time cap ends it even when neither reached min_time.
        let capped = TimingConfig {
            max_time: Duration::from_millis(12),
            min_time: Duration::from_secs(100),
            ..cfg
        };
        let (a, _) = measure_pair(
            &capped,
            || {},
            || std::thread::sleep(Duration::from_millis(5)),
        );
        assert!((2..=4).contains(&a.reps), "{}", a.reps);
    }

    #[test]
    fn measure_counts_reps_and_warmup() {
        let cfg = TimingConfig {
            warmup: 2,
            min_time: Duration::ZERO,
            min_reps: 7,
            max_reps: 100,
            max_time: Duration::from_secs(60),
        };
        let mut calls = 0;
        let stats = measure(&cfg, || calls += 1);
        assert_eq!(stats.reps, 7);
        assert_eq!(calls, 9);
        assert!(stats.min <= stats.median && stats.median <= stats.max);
    }
}
