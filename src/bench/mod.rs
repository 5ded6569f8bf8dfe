//! `tessera bench`: calibrate this machine (FMA peak, memory bandwidth), then time every
//! kernel of the chosen families against its peers and place each row on the roofline.
//!
//! A family is one module with a `cases` function listed in [`FAMILIES`]; adding one (quant,
//! attention, kv_cache, ops) is a new module and one line there.

pub mod alloc;
pub mod attention;
pub mod calibrate;
pub mod cli;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_model;
pub mod data;
pub mod gemm;
pub mod model;
pub mod quant;
pub mod report;
pub mod timing;

pub use calibrate::Calibration;
pub use report::{CaseId, Row};
pub use timing::TimingConfig;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use tessera_cpu::Isa;

/// An error of the harness (bad option, a kernel error, a peer that disagrees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchError(pub String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<tessera_core::Error> for BenchError {
    fn from(e: tessera_core::Error) -> Self {
        BenchError(e.to_string())
    }
}

/// Result of the harness.
pub type Result<T> = std::result::Result<T, BenchError>;

/// A benchmark family: a name and the cases it contributes for a configuration.
pub struct Family {
    /// The name on the command line and in the `family` key of every row.
    pub name: &'static str,
    /// The peer its rows are compared with (the table's `vs` column).
    pub peer: &'static str,
    /// One line on what is measured.
    pub about: &'static str,
    /// The cases for a configuration (unfiltered).
    pub cases: fn(&Config) -> Vec<Case>,
}

/// Every family, in the order they run.
pub static FAMILIES: &[Family] = &[
    Family {
        name: "gemm",
        peer: "gemm",
        about: "C = A·op(B), f32 A and C, f32/f16/bf16 B, against the `gemm` crate's f32 GEMM",
        cases: gemm::cases,
    },
    Family {
        name: "quant",
        peer: "peer",
        about: "C = A·Wᵀ, f32 A, Q8_0/Q4_0/Q4_K W [n,k] (GEMV: cold weights, GB/s of weight \
                bytes; GEMM: %peak of the int8 dot peak); column B names the peer: deq = \
                dequantize + Tessera f32 GEMM, candle = candle-core QMatMul",
        cases: quant::cases,
    },
    Family {
        name: "attention",
        peer: "peer",
        about: "fused attention, f32 Q/K/V, 12 heads (prefill: GFLOP/s of the unmasked work; \
                B names the peer: unf = per-head Tessera GEMM + softmax + GEMM, candle = \
                candle-core ops) and decode of one token over a KV cache (cold caches, GB/s of \
                cache bytes; B = cont/paged; peer: the cache read to f32 + GEMV + softmax + \
                GEMV); B = mem: heap held by one call, fresh threads",
        cases: attention::cases,
    },
    Family {
        name: "model",
        peer: "peer",
        about: "whole models on the CPU backend, random weights, stored f32/f16/q8_0/q4_0: \
                GPT-2 small prefill (GFLOP/s) and greedy decode (GB/s of weight + KV bytes \
                per token), BERT-base encode (GFLOP/s); tokens/s under each row; B = hf: the \
                peer is Hugging Face transformers (PyTorch, f32 weights, CPU) on the same \
                checkpoint and ids, measured once per kernel and thread count",
        cases: model::cases,
    },
];

/// The family named `name`.
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// Thread counts; every case runs once per count.
    pub threads: Vec<usize>,
    /// Fewer and smaller shapes (a smoke test).
    pub quick: bool,
    /// A case runs if its [`CaseId::name`] contains any of these (all run when empty).
    pub filters: Vec<String>,
    /// Tessera's instruction set; `None`: each kernel family's preferred one
    /// ([`tessera_cpu::gemm::preferred_isa`], [`tessera_cpu::quant::preferred_isa`],
    /// [`Isa::detect`] for attention and the models' other kernels).
    pub isa: Option<Isa>,
    /// Timing of each kernel.
    pub timing: TimingConfig,
}

impl Config {
    /// Whether the case passes `--filter`.
    pub fn selects(&self, id: &CaseId) -> bool {
        let name = id.name();
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }
}

/// What a case gets when it runs: the configuration and the calibrated roofline. The case runs
/// inside a rayon pool of exactly `id.threads` threads.
pub struct Ctx<'a> {
    /// The configuration.
    pub config: &'a Config,
    /// This machine's roofline.
    pub calibration: &'a Calibration,
}

/// The body of a case: allocates its inputs, verifies against its peer, times both.
pub type RunFn = Box<dyn FnOnce(&Ctx<'_>) -> Result<Row> + Send>;

/// A runnable case.
pub struct Case {
    /// What it is.
    pub id: CaseId,
    /// Runs it.
    pub run: RunFn,
}

/// The outcome of [`run`].
#[derive(Debug)]
pub struct Outcome {
    /// The calibration the rows were measured against.
    pub calibration: Calibration,
    /// Rows of the cases that passed.
    pub rows: Vec<Row>,
    /// `(case, error)` of the cases that failed.
    pub failures: Vec<(String, BenchError)>,
}

/// The selected cases of `families`, in run order.
pub fn select_cases(cfg: &Config, families: &[&'static Family]) -> Vec<(&'static Family, Case)> {
    families
        .iter()
        .flat_map(|f| (f.cases)(cfg).into_iter().map(move |c| (*f, c)))
        .filter(|(_, c)| cfg.selects(&c.id))
        .collect()
}

/// Calibrates, then runs the selected cases of `families`, printing the calibration and each
/// row to stdout as it completes (a progress bar on stderr when it is a terminal).
pub fn run(cfg: &Config, families: &[&'static Family]) -> Result<Outcome> {
    let cases = select_cases(cfg, families);
    if cases.is_empty() {
        return Err(BenchError(
            "no benchmark case matches the families and filters given".into(),
        ));
    }
    let cache = tessera_cpu::CacheInfo::detect();
    println!(
        "tessera bench: {} cases, tessera ISA {}, threads {:?}, caches L1d {} KiB / L2 {} KiB / L3 {} MiB{}",
        cases.len(),
        match cfg.isa {
            Some(isa) => isa.to_string(),
            None => format!(
                "{} (gemm {}, quant {})",
                Isa::detect(),
                tessera_cpu::gemm::preferred_isa(),
                tessera_cpu::quant::preferred_isa()
            ),
        },
        cfg.threads,
        cache.l1d >> 10,
        cache.l2 >> 10,
        cache.l3 >> 20,
        if cfg.quick { ", quick" } else { "" },
    );
    if let Some(busy) = busy_cores(std::time::Duration::from_millis(250))
        && busy > 0.25
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "warning: other work keeps about {busy:.1} of {cores} cores busy: calibration and \
             timings will be noisy"
        );
    }
    eprintln!("calibrating (FMA peak, int8 dot peak, memory read bandwidth) ...");
    let calibration = Calibration::measure(&cfg.threads, cfg.quick);
    println!("{}", calibration.summary());

    let mut pools = BTreeMap::new();
    for (_, c) in &cases {
        if let std::collections::btree_map::Entry::Vacant(e) = pools.entry(c.id.threads) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(c.id.threads)
                .thread_name(|i| format!("tessera-bench-{i}"))
                .build()
                .map_err(|e| BenchError(format!("cannot start a thread pool: {e}")))?;
            e.insert(pool);
        }
    }

    let pb = ProgressBar::with_draw_target(Some(cases.len() as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
            .expect("valid template"),
    );
    let ctx = Ctx {
        config: cfg,
        calibration: &calibration,
    };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut current_family = "";
    for (fam, case) in cases {
        if fam.name != current_family {
            current_family = fam.name;
            pb.suspend(|| {
                println!("\n== {}: {}", fam.name, fam.about);
                println!("{}", report::header(fam.peer));
            });
        }
        let name = case.id.name();
        pb.set_message(name.clone());
        let pool = &pools[&case.id.threads];
        let run = case.run;
        match pool.install(|| run(&ctx)) {
            Ok(row) => {
                pb.suspend(|| {
                    println!("{}", report::format_row(&row));
                    if let Some(note) = report::format_note(&row) {
                        println!("{note}");
                    }
                });
                rows.push(row);
            }
            Err(e) => {
                pb.suspend(|| eprintln!("FAILED {name}: {e}"));
                failures.push((name, e));
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(Outcome {
        calibration,
        rows,
        failures,
    })
}

/// How many cores other processes kept busy during `window` (Linux `/proc/stat`; this process
/// sleeps meanwhile), if known.
fn busy_cores(window: std::time::Duration) -> Option<f64> {
    let read = || parse_cpu_times(&std::fs::read_to_string("/proc/stat").ok()?);
    let (busy0, total0) = read()?;
    std::thread::sleep(window);
    let (busy1, total1) = read()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let total = total1.checked_sub(total0)?;
    (total > 0).then(|| busy1.saturating_sub(busy0) as f64 / total as f64 * cores)
}

/// `(busy, total)` jiffies of the aggregate `cpu` line of `/proc/stat` (idle and iowait are
/// not busy).
fn parse_cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice, counted in user/nice]
    let total: u64 = v.iter().take(8).sum();
    Some((total - v[3] - v[4], total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(filters: &[&str]) -> Config {
        Config {
            threads: vec![1, 2],
            quick: false,
            filters: filters.iter().map(|s| s.to_string()).collect(),
            isa: None,
            timing: TimingConfig::QUICK,
        }
    }

    #[test]
    fn filters_select_by_substring() {
        let all = select_cases(&cfg(&[]), &[family("gemm").unwrap()]);
        let some = select_cases(&cfg(&["1x50257x768"]), &[family("gemm").unwrap()]);
        assert!(!some.is_empty() && some.len() < all.len());
        assert!(some.iter().all(|(_, c)| c.id.shape == "1x50257x768"));
        let two = select_cases(&cfg(&["/f16/", "/bf16/"]), &[family("gemm").unwrap()]);
        assert!(two.iter().all(|(_, c)| c.id.dtype != "f32"));
        assert!(select_cases(&cfg(&["no such case"]), &[family("gemm").unwrap()]).is_empty());
    }

    #[test]
    fn cpu_times_parse() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\n";
        // busy = user + nice + system + irq + softirq + steal.
        assert_eq!(parse_cpu_times(stat), Some((161, 981)));
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(parse_cpu_times("cpu  1 2 x 4 5\n"), None);
        assert_eq!(parse_cpu_times("cpu  1 2\n"), None);
        assert!(busy_cores(std::time::Duration::from_millis(20)).is_none_or(|b| b >= 0.0));
    }

    #[test]
    fn family_names_are_unique_and_found() {
        for f in FAMILIES {
            assert!(std::ptr::eq(family(f.name).unwrap(), f));
        }
        assert!(family("nope").is_none());
    }
}
