//! The `tessera` command-line tool.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tessera::bench::{self, cli::BenchArgs};

/// Counts heap bytes so that `tessera bench attention` can report the peak memory of a call.
#[global_allocator]
static ALLOC: bench::alloc::CountingAlloc = bench::alloc::CountingAlloc;

/// Tessera: hand-optimized transformer kernels.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Calibrate this machine (FMA peak, memory bandwidth), then time kernels against peers.
    Bench(BenchArgs),
    /// Run a BERT, GPT-2 or T5 Hugging Face checkpoint on Tessera's kernels.
    Run(tessera::run::RunArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Bench(args) => match run_bench(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match tessera::run::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_bench(args: &BenchArgs) -> bench::Result<ExitCode> {
    if args.backend == "cuda" {
        return run_bench_cuda(args);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = args.config(cores)?;
    let families = args.families()?;
    if args.list {
        for (_, case) in bench::select_cases(&cfg, &families) {
            println!("{}", case.id.name());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let started = std::time::Instant::now();
    let outcome = bench::run(&cfg, &families)?;
    finish_bench(args, &outcome.rows, &outcome.failures, started)
}

/// Writes `--json`, prints the row count and the failures; the exit code says whether any
/// case failed.
fn finish_bench(
    args: &BenchArgs,
    rows: &[bench::Row],
    failures: &[(String, bench::BenchError)],
    started: std::time::Instant,
) -> bench::Result<ExitCode> {
    if let Some(path) = &args.json {
        std::fs::write(path, bench::report::to_json(rows) + "\n")
            .map_err(|e| bench::BenchError(format!("cannot write {}: {e}", path.display())))?;
        eprintln!("wrote {} rows to {}", rows.len(), path.display());
    }
    println!(
        "\n{} rows in {:.1} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("\n{} case(s) FAILED:", failures.len());
        for (name, e) in failures {
            eprintln!("  {name}: {e}");
        }
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(feature = "cuda")]
fn run_bench_cuda(args: &BenchArgs) -> bench::Result<ExitCode> {
    let started = std::time::Instant::now();
    let outcome = bench::cuda::run(&bench::cuda::GpuConfig {
        families: args.families.clone(),
        quick: args.quick,
        filters: args.filter.clone(),
    })?;
    finish_bench(args, &outcome.rows, &outcome.failures, started)
}

#[cfg(not(feature = "cuda"))]
fn run_bench_cuda(_: &BenchArgs) -> bench::Result<ExitCode> {
    Err(bench::BenchError(
        "this build has no CUDA backend: build it with `--features cuda` \
         (cargo run --release --features cuda -- bench --backend cuda)"
            .into(),
    ))
}
