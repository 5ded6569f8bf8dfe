//! Result rows: roofline arithmetic, the stdout table and the `--json` array.

use super::Calibration;
use serde::Serialize;

/// What one call of a kernel does: the yardstick of its roofline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Work {
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes that must cross the memory bus at least once (every operand read or written).
    pub bytes: f64,
}

impl Work {
    /// Flops per byte.
    pub fn intensity(&self) -> f64 {
        self.flops / self.bytes
    }

    /// `"memory"` when the kernel's arithmetic intensity is below the machine balance
    /// (peak GFLOP/s over bandwidth GB/s), else `"compute"`.
    pub fn bound(&self, peak_gflops: f64, bandwidth_gbs: f64) -> &'static str {
        if self.intensity() < peak_gflops / bandwidth_gbs {
            "memory"
        } else {
            "compute"
        }
    }
}

/// The identity of a benchmark row (what was run, before it is timed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseId {
    /// Operation family (`gemm`, ...).
    pub family: &'static str,
    /// Kernel within the family (`gemm`, `gemv`, ...).
    pub kernel: String,
    /// Shape, e.g. `MxNxK` for GEMM.
    pub shape: String,
    /// Storage type of the operand that varies (B for GEMM).
    pub dtype: String,
    /// Operand layout (`[n,k]` for B stored as a HF weight, `[k,n]` otherwise).
    pub layout: String,
    /// Threads.
    pub threads: usize,
}

impl CaseId {
    /// `family/kernel/shape/dtype/layout/tN`: what `--filter` matches against.
    pub fn name(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}/t{}",
            self.family, self.kernel, self.shape, self.dtype, self.layout, self.threads
        )
    }
}

/// One measured row, as printed and as written by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Operation family.
    pub family: String,
    /// Kernel within the family.
    pub kernel: String,
    /// Shape (`MxNxK` for GEMM).
    pub shape: String,
    /// Storage type of the varying operand.
    pub dtype: String,
    /// Operand layout.
    pub layout: String,
    /// Tessera instruction set used.
    pub isa: String,
    /// Threads.
    pub threads: usize,
    /// Median seconds per call.
    pub seconds: f64,
    /// Timed repetitions.
    pub reps: usize,
    /// GFLOP/s (1e9 flops per second).
    pub gflops: f64,
    /// GB/s of the bytes the call must move (1e9 bytes per second).
    pub gbs: f64,
    /// `"compute"` or `"memory"`: which roofline the row is held to.
    pub bound: String,
    /// Fraction of the calibrated peak for this thread count: GFLOP/s over FMA peak when
    /// compute-bound, GB/s over read bandwidth when memory-bound.
    pub peak_fraction: f64,
    /// Peer implementation timed on the same case.
    pub peer: Option<String>,
    /// The peer's median seconds per call.
    pub peer_seconds: Option<f64>,
    /// `peer_seconds / seconds`: above 1 means Tessera is faster.
    pub peer_ratio: Option<f64>,
    /// Rows that measure memory: the most heap bytes Tessera's call held beyond its operands
    /// (absent from the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_bytes: Option<u64>,
    /// The same for the peer's call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_peak_bytes: Option<u64>,
    /// Rows that run a model: tokens processed per second by Tessera's call (absent from the
    /// JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// The same for the peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_tokens_per_s: Option<f64>,
    /// A remark printed under the row (e.g. why it has no peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A peer measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerTime {
    /// Peer name.
    pub name: String,
    /// Median seconds per call.
    pub seconds: f64,
}

impl Row {
    /// Builds a row from a measurement, placing it on the calibrated roofline.
    pub fn new(
        id: &CaseId,
        isa: &str,
        work: Work,
        seconds: f64,
        reps: usize,
        cal: &Calibration,
        peer: Option<PeerTime>,
    ) -> Row {
        let peak = cal.peak_gflops(id.threads);
        let bw = cal.bandwidth_gbs(id.threads);
        let gflops = work.flops / seconds / 1e9;
        let gbs = work.bytes / seconds / 1e9;
        let bound = work.bound(peak, bw);
        let peak_fraction = if bound == "memory" {
            gbs / bw
        } else {
            gflops / peak
        };
        Row {
            family: id.family.to_string(),
            kernel: id.kernel.clone(),
            shape: id.shape.clone(),
            dtype: id.dtype.clone(),
            layout: id.layout.clone(),
            isa: isa.to_string(),
            threads: id.threads,
            seconds,
            reps,
            gflops,
            gbs,
            bound: bound.to_string(),
            peak_fraction,
            peer_ratio: peer.as_ref().map(|p| p.seconds / seconds),
            peer_seconds: peer.as_ref().map(|p| p.seconds),
            peer: peer.map(|p| p.name),
            peak_bytes: None,
            peer_peak_bytes: None,
            tokens_per_s: None,
            peer_tokens_per_s: None,
            note: None,
        }
    }
}

impl Row {
    /// Holds the row to the calibrated int8 dot-product peak instead of the FMA peak: for the
    /// quantized kernels, whose `work.flops` are u8 × s8 multiply-adds (2 operations each).
    /// The bound is decided again against that peak; where the calibration has no int8 loop
    /// the row is left as it is (on the FMA peak).
    pub fn on_int8_peak(mut self, work: Work, cal: &Calibration) -> Row {
        if let Some(peak) = cal.peak_int8_gops(self.threads) {
            let bw = cal.bandwidth_gbs(self.threads);
            let bound = work.bound(peak, bw);
            self.peak_fraction = if bound == "memory" {
                self.gbs / bw
            } else {
                self.gflops / peak
            };
            self.bound = bound.to_string();
        }
        self
    }
}

/// Column widths of the table (kernel, shape, dtype, B, threads, ms, GFLOP/s, GB/s, %peak,
/// bound, vs peer).
const WIDTHS: [usize; 11] = [7, 16, 5, 5, 3, 11, 9, 8, 7, 7, 9];

fn line(cells: [&str; 11]) -> String {
    let mut s = String::new();
    for (i, (cell, w)) in cells.iter().zip(WIDTHS).enumerate() {
        if i > 0 {
            s.push_str("  ");
        }
        // Text columns left-aligned, numbers right-aligned.
        if i < 4 || i == 9 {
            s.push_str(&format!("{cell:<w$}"));
        } else {
            s.push_str(&format!("{cell:>w$}"));
        }
    }
    s.trim_end().to_string()
}

/// The table header; `peer` names the ratio column (`vs gemm`).
pub fn header(peer: &str) -> String {
    let vs = format!("vs {peer}");
    line([
        "kernel",
        "shape",
        "dtype",
        "B",
        "thr",
        "time (ms)",
        "GFLOP/s",
        "GB/s",
        "%peak",
        "bound",
        vs.as_str(),
    ])
}

/// One table line for `row`, aligned with [`header`].
pub fn format_row(row: &Row) -> String {
    let ms = row.seconds * 1e3;
    let time = if ms >= 100.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.4}")
    };
    let threads = row.threads.to_string();
    let gflops = format!("{:.1}", row.gflops);
    let gbs = format!("{:.1}", row.gbs);
    let peak = format!("{:.1}%", row.peak_fraction * 100.0);
    let vs = row
        .peer_ratio
        .map_or_else(|| "-".to_string(), |r| format!("{r:.2}x"));
    line([
        &row.kernel,
        &row.shape,
        &row.dtype,
        &row.layout,
        &threads,
        &time,
        &gflops,
        &gbs,
        &peak,
        &row.bound,
        &vs,
    ])
}

/// The lines printed under a row, if it has any: the heap it measured
/// ([`Row::peak_bytes`]), its tokens per second ([`Row::tokens_per_s`]), its [`Row::note`].
pub fn format_note(row: &Row) -> Option<String> {
    let mut lines = Vec::new();
    if let Some(ours) = row.peak_bytes {
        let b = super::alloc::format_bytes;
        let mut s = format!(
            "  `- peak heap beyond the operands, one call: tessera {}",
            b(ours)
        );
        if let Some(p) = row.peer_peak_bytes {
            let peer = row.peer.as_deref().unwrap_or("peer");
            s.push_str(&format!(", {peer} {}", b(p)));
            if ours > 0 {
                s.push_str(&format!(" ({:.1}x)", p as f64 / ours as f64));
            }
        }
        lines.push(s);
    }
    if let Some(t) = row.tokens_per_s {
        let mut s = format!("  `- tokens/s: tessera {t:.1}");
        if let Some(p) = row.peer_tokens_per_s {
            let peer = row.peer.as_deref().unwrap_or("peer");
            s.push_str(&format!(", {peer} {p:.1}"));
        }
        lines.push(s);
    }
    if let Some(n) = &row.note {
        lines.push(format!("  `- {n}"));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// The rows as a pretty-printed JSON array of objects.
pub fn to_json(rows: &[Row]) -> String {
    serde_json::to_string_pretty(rows).expect("rows serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::calibrate::Point;

    fn cal() -> Calibration {
        Calibration {
            fma_kernel: "test".into(),
            fma: vec![
                Point {
                    threads: 1,
                    value: 100.0,
                },
                Point {
                    threads: 2,
                    value: 200.0,
                },
            ],
            int8_kernel: Some("test".into()),
            int8: vec![Point {
                threads: 1,
                value: 400.0,
            }],
            buffer_bytes: 1 << 30,
            bandwidth: vec![
                Point {
                    threads: 1,
                    value: 20.0,
                },
                Point {
                    threads: 2,
                    value: 25.0,
                },
            ],
            seconds: 1.0,
        }
    }

    fn id(threads: usize) -> CaseId {
        CaseId {
            family: "gemm",
            kernel: "gemm".into(),
            shape: "2048x2048x2048".into(),
            dtype: "f16".into(),
            layout: "[n,k]".into(),
            threads,
        }
    }

    fn peer(seconds: f64) -> Option<PeerTime> {
        Some(PeerTime {
            name: "gemm".into(),
            seconds,
        })
    }

    #[test]
    fn compute_bound_row_is_held_to_fma_peak() {
        // 100 GFLOP in 2 s = 50 GFLOP/s of a 200 GFLOP/s 2-thread peak.
        let w = Work {
            flops: 100e9,
            bytes: 1e9,
        };
        let r = Row::new(&id(2), "avx2", w, 2.0, 5, &cal(), peer(3.0));
        assert_eq!(r.gflops, 50.0);
        assert_eq!(r.gbs, 0.5);
        assert_eq!(r.bound, "compute");
        assert_eq!(r.peak_fraction, 0.25);
        assert_eq!(r.peer_ratio, Some(1.5));
        assert_eq!(r.peer_seconds, Some(3.0));
        assert_eq!(r.peer.as_deref(), Some("gemm"));
    }

    #[test]
    fn quant_rows_are_held_to_the_int8_peak() {
        // 100 G int8 operations in 0.5 s = 200 GOP/s: 200% of the 1-thread FMA peak, 50% of
        // the int8 peak (400 GOP/s).
        let w = Work {
            flops: 100e9,
            bytes: 1e9,
        };
        let r = Row::new(&id(1), "avx512", w, 0.5, 5, &cal(), None);
        assert_eq!(r.peak_fraction, 2.0);
        let r = r.on_int8_peak(w, &cal());
        assert_eq!((r.bound.as_str(), r.peak_fraction), ("compute", 0.5));
        // 2 threads: extrapolated from the 1-thread point (800 GOP/s).
        let r = Row::new(&id(2), "avx512", w, 0.5, 5, &cal(), None).on_int8_peak(w, &cal());
        assert_eq!(r.peak_fraction, 0.25);
        // Intensity 10 is compute-bound against the FMA balance (100 / 20 = 5) but memory-bound
        // against the int8 one (400 / 20 = 20): the bound is decided again.
        let w = Work {
            flops: 10e9,
            bytes: 1e9,
        };
        let r = Row::new(&id(1), "avx512", w, 0.1, 5, &cal(), None);
        assert_eq!(r.bound, "compute");
        let r = r.on_int8_peak(w, &cal());
        assert_eq!((r.bound.as_str(), r.peak_fraction), ("memory", 0.5));
        // No int8 loop: unchanged.
        let mut c = cal();
        c.int8.clear();
        let r = Row::new(&id(1), "avx2", w, 0.1, 5, &c, None);
        assert_eq!(r.clone().on_int8_peak(w, &c), r);
    }

    #[test]
    fn memory_bound_row_is_held_to_bandwidth() {
        // GEMV-like: 0.5 flop per byte, below the machine balance of 100 / 20 = 5.
        let w = Work {
            flops: 1e9,
            bytes: 2e9,
        };
        assert_eq!(w.bound(100.0, 20.0), "memory");
        let r = Row::new(&id(1), "avx2", w, 0.2, 5, &cal(), None);
        assert_eq!(r.bound, "memory");
        assert_eq!(r.gbs, 10.0);
        assert_eq!(r.peak_fraction, 0.5); // 10 of 20 GB/s
        assert_eq!(r.peer_ratio, None);
        // Exactly at the balance point counts as compute-bound.
        let w = Work {
            flops: 5.0,
            bytes: 1.0,
        };
        assert_eq!(w.bound(100.0, 20.0), "compute");
    }

    #[test]
    fn table_columns_line_up() {
        let w = Work {
            flops: 17.2e9,
            bytes: 50e6,
        };
        let r = Row::new(&id(2), "avx2", w, 0.1234, 5, &cal(), peer(0.15));
        let h = header("gemm");
        let l = format_row(&r);
        // Every header column starts where its value column starts.
        for col in ["shape", "dtype", "B ", "bound"] {
            let at = h.find(col).unwrap();
            assert_ne!(&l[at..at + 1], " ", "{col}:\n{h}\n{l}");
            assert_eq!(&l[at - 1..at], " ", "{col}:\n{h}\n{l}");
        }
        // Right-aligned numeric columns end where the header ends.
        let end = |s: &str, pat: &str| s.find(pat).unwrap() + pat.len();
        assert_eq!(end(&h, "thr"), end(&l, "]    2"));
        assert_eq!(end(&h, "time (ms)"), end(&l, "123.4"));
        assert_eq!(end(&h, "%peak"), end(&l, "69.7%"));
        assert!(l.ends_with("1.22x"), "{l}");
        assert!(h.ends_with("vs gemm"), "{h}");
        assert!(l.contains("2048x2048x2048") && l.contains("[n,k]") && l.contains("139.4"));
    }

    #[test]
    fn small_times_keep_precision_and_missing_peer_is_a_dash() {
        let w = Work {
            flops: 1e6,
            bytes: 1e6,
        };
        let r = Row::new(&id(1), "avx2", w, 12.5e-6, 5, &cal(), None);
        let l = format_row(&r);
        assert!(l.contains("0.0125"), "{l}");
        assert!(l.ends_with('-'), "{l}");
    }

    #[test]
    fn json_is_an_array_of_objects_with_the_documented_keys() {
        let w = Work {
            flops: 1e9,
            bytes: 1e6,
        };
        let rows = vec![
            Row::new(&id(1), "avx2", w, 0.01, 5, &cal(), peer(0.02)),
            Row::new(&id(2), "avx2", w, 0.01, 5, &cal(), None),
        ];
        let v: serde_json::Value = serde_json::from_str(&to_json(&rows)).unwrap();
        let arr = v.as_array().expect("top level is an array");
        assert_eq!(arr.len(), 2);
        for key in [
            "family",
            "kernel",
            "shape",
            "dtype",
            "threads",
            "seconds",
            "gflops",
            "gbs",
            "bound",
            "peak_fraction",
            "peer",
            "peer_seconds",
            "peer_ratio",
        ] {
            assert!(arr[0].get(key).is_some(), "missing {key}");
        }
        assert_eq!(arr[0]["shape"], "2048x2048x2048");
        assert_eq!(arr[0]["threads"], 1);
        assert_eq!(arr[0]["peer_ratio"], 2.0);
        assert!(arr[1]["peer_ratio"].is_null());
    }

    #[test]
    fn memory_rows_get_a_note_and_json_keys() {
        let w = Work {
            flops: 1e9,
            bytes: 1e6,
        };
        let mut r = Row::new(&id(1), "avx2", w, 0.01, 5, &cal(), peer(0.02));
        assert_eq!(format_note(&r), None);
        let plain: serde_json::Value = serde_json::from_str(&to_json(&[r.clone()])).unwrap();
        assert!(plain[0].get("peak_bytes").is_none());
        r.peak_bytes = Some(2 << 20);
        r.peer_peak_bytes = Some(64 << 20);
        let note = format_note(&r).unwrap();
        assert!(
            note.contains("tessera 2.0 MiB, gemm 64.0 MiB (32.0x)"),
            "{note}"
        );
        let v: serde_json::Value = serde_json::from_str(&to_json(&[r])).unwrap();
        assert_eq!(v[0]["peak_bytes"], 2 << 20);
        assert_eq!(v[0]["peer_peak_bytes"], 64 << 20);
    }

    #[test]
    fn model_rows_get_tokens_per_second_and_a_note() {
        let w = Work {
            flops: 1e9,
            bytes: 1e6,
        };
        let mut r = Row::new(&id(1), "avx2", w, 0.5, 3, &cal(), peer(1.0));
        r.tokens_per_s = Some(256.0);
        r.peer_tokens_per_s = Some(128.0);
        r.note = Some("peer runs f32".into());
        let note = format_note(&r).unwrap();
        assert_eq!(
            note, "  `- tokens/s: tessera 256.0, gemm 128.0\n  `- peer runs f32",
            "{note}"
        );
        let v: serde_json::Value = serde_json::from_str(&to_json(&[r])).unwrap();
        assert_eq!(v[0]["tokens_per_s"], 256.0);
        assert_eq!(v[0]["peer_tokens_per_s"], 128.0);
        assert_eq!(v[0]["note"], "peer runs f32");
        let plain = Row::new(&id(1), "avx2", w, 0.5, 3, &cal(), None);
        let v: serde_json::Value = serde_json::from_str(&to_json(&[plain])).unwrap();
        assert!(v[0].get("tokens_per_s").is_none() && v[0].get("note").is_none());
    }

    #[test]
    fn case_names_are_filterable() {
        assert_eq!(id(2).name(), "gemm/gemm/2048x2048x2048/f16/[n,k]/t2");
    }
}
