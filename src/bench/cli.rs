//! Command-line options of `tessera bench`.

use super::{BenchError, Config, FAMILIES, Family, Result, TimingConfig, family};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tessera_cpu::Isa;

/// Calibrate this machine, then time kernels against their peers on the roofline.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Families to run (all when none is given): gemm, quant, attention, model; with
    /// `--backend cuda`: gemm, quant, attention, kv_cache, model.
    #[arg(value_name = "FAMILY")]
    pub families: Vec<String>,
    /// Thread counts, comma-separated [default: 1 and the number of cores].
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub threads: Vec<usize>,
    /// Also write the rows as a JSON array to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Fewer and smaller shapes, shorter timing: a smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Run only cases whose name (family/kernel/shape/dtype/layout/tN, e.g.
    /// `gemm/gemm/128x3072x768/f16/[n,k]/t2`) contains SUBSTR; repeatable (any matches).
    #[arg(long, value_name = "SUBSTR")]
    pub filter: Vec<String>,
    /// Tessera instruction set for every family: scalar, avx2, avx512, neon [default: each family's preferred one: gemm AVX2 on Zen 4, where AVX-512 FMAs are double-pumped; quant AVX-512 only with VNNI; else the best this CPU has].
    #[arg(long)]
    pub isa: Option<String>,
    /// Time each kernel for at least this many seconds [default: 0.5, --quick 0.05].
    #[arg(long, value_name = "SECS")]
    pub min_time: Option<f64>,
    /// Time each kernel at least this many times [default: 5, --quick 3].
    #[arg(long, value_name = "N")]
    pub min_reps: Option<usize>,
    /// List the selected cases and exit (no calibration, nothing timed).
    #[arg(long)]
    pub list: bool,
    /// Where the kernels run: `cpu`, or `cuda` (GPU 0; needs a build with `--features cuda`)
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub backend: String,
}

impl BenchArgs {
    /// The families named (every family when none is).
    pub fn families(&self) -> Result<Vec<&'static Family>> {
        if self.families.is_empty() {
            return Ok(FAMILIES.iter().collect());
        }
        self.families
            .iter()
            .map(|name| {
                family(name).ok_or_else(|| {
                    let known: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
                    BenchError(format!(
                        "unknown benchmark family {name:?} (known: {})",
                        known.join(", ")
                    ))
                })
            })
            .collect()
    }

    /// The run configuration; `cores` is the default multi-thread count.
    pub fn config(&self, cores: usize) -> Result<Config> {
        let mut threads = if self.threads.is_empty() {
            vec![1, cores.max(1)]
        } else {
            self.threads.clone()
        };
        if threads.contains(&0) {
            return Err(BenchError("--threads must be at least 1".into()));
        }
        threads.dedup();
        let isa = match &self.isa {
            None => None,
            Some(s) => Some(s.parse::<Isa>()?.check()?),
        };
        let mut timing = if self.quick {
            TimingConfig::QUICK
        } else {
            TimingConfig::FULL
        };
        if let Some(t) = self.min_time {
            if !(t.is_finite() && t >= 0.0) {
                return Err(BenchError(format!("--min-time {t} is not a duration")));
            }
            timing.min_time = Duration::from_secs_f64(t);
            timing.max_time = timing.max_time.max(timing.min_time);
        }
        if let Some(r) = self.min_reps {
            timing.min_reps = r.max(1);
            timing.max_reps = timing.max_reps.max(timing.min_reps);
        }
        Ok(Config {
            threads,
            quick: self.quick,
            filters: self.filter.clone(),
            isa,
            timing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn defaults() {
        let a = parse(&[]);
        let c = a.config(8).unwrap();
        assert_eq!(c.threads, vec![1, 8]);
        assert_eq!(c.isa, None);
        assert_eq!(c.timing, TimingConfig::FULL);
        assert_eq!(a.families().unwrap().len(), FAMILIES.len());
        // One core: a single thread count.
        assert_eq!(a.config(1).unwrap().threads, vec![1]);
    }

    #[test]
    fn options() {
        let a = parse(&[
            "gemm",
            "--threads",
            "2,4",
            "--quick",
            "--filter",
            "f16",
            "--filter",
            "2048",
            "--isa",
            "scalar",
            "--json",
            "/tmp/x.json",
            "--min-time",
            "0.25",
        ]);
        let c = a.config(8).unwrap();
        assert_eq!(c.threads, vec![2, 4]);
        assert!(c.quick);
        assert_eq!(c.filters, vec!["f16", "2048"]);
        assert_eq!(c.isa, Some(Isa::Scalar));
        assert_eq!(c.timing.min_time, Duration::from_millis(250));
        assert_eq!(c.timing.min_reps, TimingConfig::QUICK.min_reps);
        assert_eq!(a.json.as_deref(), Some(std::path::Path::new("/tmp/x.json")));
        assert_eq!(a.families().unwrap()[0].name, "gemm");
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(parse(&["nope"]).families().is_err());
        assert!(parse(&["--threads", "0"]).config(2).is_err());
        assert!(parse(&["--isa", "sse9"]).config(2).is_err());
        assert!(parse(&["--min-time=-1"]).config(2).is_err());
        // An ISA this CPU lacks is refused, not run.
        for isa in Isa::ALL.iter().filter(|i| !i.is_available()) {
            assert!(parse(&["--isa", isa.name()]).config(2).is_err());
        }
    }
}
