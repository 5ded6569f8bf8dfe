//! Fuzzes the checkpoint loader of `tessera` (`loader::Checkpoint::from_bytes` and
//! `from_bytes_with_index`): arbitrary bytes become a `config.json` text, an optional
//! `model.safetensors.index.json` text and one or two safetensors files, each given raw, framed
//! (a header text and a data section behind a length prefix that may be off), or built from
//! structured entries (any dtype name, shapes that may overflow, offsets laid out end to end or
//! arbitrary). Nothing may crash, and when a checkpoint loads:
//!
//! * `names` is sorted and unique, every name is `contains`ed and its `tensor` loads, with that
//!   name, a byte length equal to numel × dtype size, and its own shape accepted by
//!   `expect_shape` (and a different one refused);
//! * `to_f32` / `to_f16` / `to_bf16` succeed exactly for F32, F16 and BF16 and `to_i64` exactly
//!   for I64 and I32, each returning numel elements; F16 → f32 → f16 and BF16 → f32 → bf16
//!   give back the stored bits (NaN aside);
//! * a name that is not there is `MissingTensor`;
//! * the config accessors never panic, and what they return is in range.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use tessera::Error;
use tessera::backend::Cpu;
use tessera::loader::{Checkpoint, Config, TensorDType};
use tessera::models::{LoadOptions, Model};

/// The dtype names of the safetensors format, and one it does not know.
const DTYPES: &[(&str, usize)] = &[
    ("F32", 32),
    ("F16", 16),
    ("BF16", 16),
    ("I64", 64),
    ("I32", 32),
    ("U8", 8),
    ("I8", 8),
    ("BOOL", 8),
    ("F64", 64),
    ("U16", 16),
    ("I16", 16),
    ("U32", 32),
    ("U64", 64),
    ("C64", 64),
    ("F8_E4M3", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F99", 32),
];

/// The most data bytes a built shard lays out (keeps each run fast and small).
const MAX_BUILT_DATA: u128 = 1 << 16;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    config: ConfigText<'a>,
    /// With an index, the first shard is named `SHARD1` and the second `second_name`.
    index: Option<IndexText<'a>>,
    first: ShardBytes<'a>,
    second: Option<(&'a str, ShardBytes<'a>)>,
    /// Config keys to query besides the ones the config holds.
    keys: Vec<&'a str>,
}

const SHARD1: &str = "model-00001-of-00002.safetensors";

#[derive(Arbitrary, Debug)]
enum ConfigText<'a> {
    Raw(&'a str),
    Built(Vec<(&'a str, JsonLeaf<'a>)>),
}

#[derive(Arbitrary, Debug)]
enum JsonLeaf<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(&'a str),
    List(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum IndexText<'a> {
    Raw(&'a str),
    /// `{"weight_map": {name: file}}`; `None` for a file is the first shard's name.
    Built(Vec<(&'a str, Option<&'a str>)>),
}

#[derive(Arbitrary, Debug)]
enum ShardBytes<'a> {
    /// The whole file.
    Raw(&'a [u8]),
    /// An 8-byte length prefix (the header's length plus `delta`), the header, the data.
    Framed {
        header: &'a str,
        data: &'a [u8],
        delta: i8,
    },
    /// A header built from entries, then `data` repeated to the length the entries need
    /// (laid out end to end) or as given (arbitrary offsets).
    Built {
        entries: Vec<Entry<'a>>,
        metadata: Option<Vec<(&'a str, &'a str)>>,
        laid_out: bool,
        data: &'a [u8],
    },
}

#[derive(Arbitrary, Debug)]
struct Entry<'a> {
    name: &'a str,
    dtype: u8,
    shape: Vec<Dim>,
    offsets: (u64, u64),
}

#[derive(Arbitrary, Debug)]
enum Dim {
    Small(u8),
    Any(u64),
}

impl Dim {
    fn value(&self) -> u64 {
        match *self {
            Dim::Small(d) => u64::from(d % 8),
            Dim::Any(d) => d,
        }
    }
}

fn leaf(value: &JsonLeaf<'_>) -> Value {
    match value {
        JsonLeaf::Null => Value::Null,
        JsonLeaf::Bool(b) => json!(b),
        JsonLeaf::U64(n) => json!(n),
        JsonLeaf::I64(n) => json!(n),
        // Non-finite floats become null in serde_json.
        JsonLeaf::F64(x) => json!(x),
        JsonLeaf::Str(s) => json!(s),
        JsonLeaf::List(v) => json!(v),
    }
}

fn frame(header: &[u8], data: &[u8], delta: i64) -> Vec<u8> {
    let len = (header.len() as u64).wrapping_add_signed(delta);
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn shard_bytes(shard: &ShardBytes<'_>) -> Vec<u8> {
    match shard {
        ShardBytes::Raw(bytes) => bytes.to_vec(),
        ShardBytes::Framed {
            header,
            data,
            delta,
        } => frame(header.as_bytes(), data, i64::from(*delta)),
        ShardBytes::Built {
            entries,
            metadata,
            laid_out,
            data,
        } => {
            let mut header = Map::new();
            if let Some(metadata) = metadata {
                let m: Map<String, Value> = metadata
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), json!(v)))
                    .collect();
                header.insert("__metadata__".to_owned(), Value::Object(m));
            }
            let mut end: u128 = 0;
            for entry in entries {
                let (dtype, bits) = DTYPES[usize::from(entry.dtype) % DTYPES.len()];
                let shape: Vec<u64> = entry.shape.iter().map(Dim::value).collect();
                let offsets = if *laid_out {
                    // Saturating: an entry too large for u128 simply makes an invalid file.
                    let numel = shape
                        .iter()
                        .try_fold(1u128, |n, &d| n.checked_mul(u128::from(d)))
                        .unwrap_or(u128::MAX);
                    let size = numel.saturating_mul(bits as u128) / 8;
                    let start = end;
                    end = end.saturating_add(size);
                    (start, end)
                } else {
                    (u128::from(entry.offsets.0), u128::from(entry.offsets.1))
                };
                // JSON numbers stop at u64 here; a clamped offset makes an invalid file.
                let clamp = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
                header.insert(
                    entry.name.to_owned(),
                    json!({
                        "dtype": dtype,
                        "shape": shape,
                        "data_offsets": [clamp(offsets.0), clamp(offsets.1)],
                    }),
                );
            }
            let header = Value::Object(header).to_string();
            let body = if *laid_out && end <= MAX_BUILT_DATA && !data.is_empty() {
                data.iter().copied().cycle().take(end as usize).collect()
            } else {
                data.to_vec()
            };
            frame(header.as_bytes(), &body, 0)
        }
    }
}

fn check_config(config: &Config, extra: &[&str]) {
    let own: Vec<String> = config
        .json()
        .as_object()
        .map(|m| m.keys().take(16).cloned().collect())
        .unwrap_or_default();
    let fixed = [
        "model_type",
        "hidden_size",
        "n_inner",
        "layer_norm_eps",
        "is_decoder",
    ];
    let keys = own
        .iter()
        .map(String::as_str)
        .chain(fixed)
        .chain(extra.iter().copied().take(8));
    for key in keys {
        let present = config.json().get(key).is_some_and(|v| !v.is_null());
        let _ = config.str(key);
        match config.str_or(key, "default") {
            Ok(s) if !present => assert_eq!(s, "default"),
            _ => {}
        }
        if let Ok(n) = config.usize(key) {
            assert!(n as u64 <= 1 << 40);
            assert_eq!(config.usize_or(key, 0).ok(), Some(n));
            assert_eq!(config.opt_usize(key).ok(), Some(Some(n)));
        }
        if !present {
            assert_eq!(config.usize_or(key, 3).ok(), Some(3));
            assert_eq!(config.opt_usize(key).ok(), Some(None));
            assert_eq!(config.f64_or(key, 0.5).ok(), Some(0.5));
            assert_eq!(config.bool_or(key, true).ok(), Some(true));
        }
        if let Ok(x) = config.f64(key) {
            assert!(x.is_finite());
        }
        let _ = config.f64_or(key, 1.0);
        let _ = config.bool_or(key, false);
    }
    let _ = config.model_type();
}

fn check_checkpoint(ck: &Checkpoint, keys: &[&str]) {
    let names = ck.names();
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "names not sorted and unique"
    );
    assert_eq!(names.len(), ck.len());
    for &name in &names {
        assert!(ck.contains(name));
        let t = ck.tensor(name).expect("a listed tensor must load");
        assert_eq!(t.name, name);
        let numel = t.numel();
        let bits = DTYPES
            .iter()
            .find(|(d, _)| *d == t.dtype.name())
            .map(|&(_, b)| b);
        if let Some(bits) = bits {
            assert_eq!(t.bytes().len() as u128 * 8, numel as u128 * bits as u128);
        }
        t.expect_shape(t.shape).expect("own shape");
        let mut other = t.shape.to_vec();
        other.push(1);
        assert!(matches!(
            t.expect_shape(&other),
            Err(Error::BadTensor { .. })
        ));

        let float = matches!(
            t.dtype,
            TensorDType::F32 | TensorDType::F16 | TensorDType::BF16
        );
        let int = matches!(t.dtype, TensorDType::I64 | TensorDType::I32);
        let f32s = t.to_f32();
        let f16s = t.to_f16();
        let bf16s = t.to_bf16();
        let i64s = t.to_i64();
        assert_eq!(f32s.is_ok(), float);
        assert_eq!(f16s.is_ok(), float);
        assert_eq!(bf16s.is_ok(), float);
        assert_eq!(i64s.is_ok(), int);
        for len in [
            f32s.as_ref().ok().map(Vec::len),
            f16s.as_ref().ok().map(Vec::len),
            bf16s.as_ref().ok().map(Vec::len),
            i64s.as_ref().ok().map(Vec::len),
        ]
        .into_iter()
        .flatten()
        {
            assert_eq!(len, numel);
        }
        if let (Ok(wide), Ok(halves)) = (&f32s, &f16s)
            && t.dtype == TensorDType::F16
        {
            for (x, h) in wide.iter().zip(halves) {
                assert!(x.is_nan() || tessera::core::f16::from_f32(*x).to_bits() == h.to_bits());
            }
        }
        if let (Ok(wide), Ok(halves)) = (&f32s, &bf16s)
            && t.dtype == TensorDType::BF16
        {
            for (x, h) in wide.iter().zip(halves) {
                assert!(x.is_nan() || x.to_bits() == u32::from(h.to_bits()) << 16);
            }
        }
    }
    for probe in ["\u{0}absent", "", "weight"] {
        if !ck.contains(probe) {
            assert!(matches!(ck.tensor(probe), Err(Error::MissingTensor { .. })));
        }
    }
    check_config(ck.config(), keys);
}

fuzz_target!(|input: Input<'_>| {
    let config = match &input.config {
        ConfigText::Raw(s) => (*s).to_owned(),
        ConfigText::Built(pairs) => Value::Object(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), leaf(v)))
                .collect(),
        )
        .to_string(),
    };
    if let Ok(c) = Config::parse(&config) {
        check_config(&c, &input.keys);
    }
    let first = shard_bytes(&input.first);
    let result = match &input.index {
        None => {
            let mut shards = vec![("first".to_owned(), first)];
            if let Some((name, bytes)) = &input.second {
                shards.push(((*name).to_owned(), shard_bytes(bytes)));
            }
            Checkpoint::from_bytes(&config, shards)
        }
        Some(index) => {
            let index = match index {
                IndexText::Raw(s) => (*s).to_owned(),
                IndexText::Built(entries) => {
                    let map: Map<String, Value> = entries
                        .iter()
                        .map(|(name, file)| ((*name).to_owned(), json!(file.unwrap_or(SHARD1))))
                        .collect();
                    json!({ "weight_map": map }).to_string()
                }
            };
            let mut shards = vec![(SHARD1.to_owned(), first)];
            if let Some((name, bytes)) = &input.second {
                shards.push(((*name).to_owned(), shard_bytes(bytes)));
            }
            Checkpoint::from_bytes_with_index(&config, &index, shards)
        }
    };
    if let Ok(ck) = result {
        check_checkpoint(&ck, &input.keys);
        // Building a model from whatever the config and tensors say must be an `Ok` or an
        // `Err`, never a panic (nor an allocation sized by an unchecked config value).
        let _ = Model::load(&ck, &Cpu::new(1), &LoadOptions::default());
    }
});
