use std::time::Instant;
use tessera_core::{MatMut, MatRef, Transpose};
use tessera_cpu::Parallelism;
use tessera_cpu::gemm::{Blocking, GemmOptions, gemm_with};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dims: Vec<usize> = args[1].split(',').map(|x| x.parse().unwrap()).collect();
    let (m, n, k) = (dims[0], dims[1], dims[2]);
    let rounds: usize = std::env::var("ROUNDS")
        .map(|s| s.parse().unwrap())
        .unwrap_or(9);
    let threads: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(1);
    let configs: Vec<(usize, usize, usize)> = args[3..]
        .iter()
        .map(|s| {
            let v: Vec<usize> = s.split(',').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        })
        .collect();
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 11) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let flops = 2.0 * (m * n * k) as f64;
    let mut best = vec![f64::MAX; configs.len()];
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for _round in 0..rounds {
        for (ci, &(mc, kc, nc)) in configs.iter().enumerate() {
            let opts = GemmOptions {
                isa: None,
                parallelism: if threads == 1 {
                    Parallelism::Sequential
                } else {
                    Parallelism::Threads(threads)
                },
                blocking: if mc == 0 {
                    None
                } else {
                    Some(Blocking { mc, kc, nc })
                },
            };
            let t = Instant::now();
            gemm_with(
                &opts,
                1.0,
                MatRef::dense(&a, m, k),
                MatRef::dense(&b, n, k),
                Transpose::Yes,
                0.0,
                MatMut::dense(&mut c, m, n),
            )
            .unwrap();
            let s = t.elapsed().as_secs_f64();
            best[ci] = best[ci].min(s);
            all[ci].push(s);
        }
    }
    for (ci, cfg) in configs.iter().enumerate() {
        let mut v = all[ci].clone();
        v.sort_by(f64::total_cmp);
        println!(
            "{:?}: best {:.1} median {:.1} GFLOP/s",
            cfg,
            flops / best[ci] / 1e9,
            flops / v[v.len() / 2] / 1e9
        );
    }
}
