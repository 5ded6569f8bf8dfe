//! Loading a Hugging Face checkpoint directory: `config.json` and the safetensors weights,
//! memory-mapped.
//!
//! A directory holds `config.json` and either `model.safetensors` or
//! `model.safetensors.index.json`, whose `"weight_map"` maps each tensor name to the shard file
//! that holds it (every shard is mapped once). [`Checkpoint::open`] validates every header
//! before any tensor is handed out: offsets in range, tensors tiling the data section with no
//! gap or overlap, byte lengths that match shape × dtype, no name in two shards. Tensors are
//! then read on demand as [`TensorView`]s that borrow the mapped bytes, and converted to the
//! element type the model keeps (`to_f32`, `to_f16`, `to_bf16`, `to_i64`).
//!
//! Nothing here panics on any input: every failure is an [`Error`] naming the file (or the
//! in-memory shard name), the tensor or the `config.json` key. [`Checkpoint::from_bytes`]
//! takes the same input from memory (tests, fuzzing: `fuzz/fuzz_targets/loader.rs`).
//!
//! [`save`] writes f32 / i64 tensors to a `.safetensors` file (`tessera run --out`).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The configuration file of a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file weights of a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: `{"weight_map": {tensor name: shard file}}`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// `safetensors` refuses headers larger than this (100 MB); checked before parsing.
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The largest integer a `config.json` size may hold: anything above is a corrupt file.
const MAX_CONFIG_USIZE: u64 = 1 << 40;
/// The header key that holds free-form string metadata instead of a tensor.
const METADATA_KEY: &str = "__metadata__";

// ---------------------------------------------------------------------------------------------
// Checkpoint
// ---------------------------------------------------------------------------------------------

/// A loaded checkpoint: the parsed `config.json` and the validated safetensors shards.
pub struct Checkpoint {
    config: Config,
    dir: Option<PathBuf>,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`. Sorted, one entry per name.
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens `dir`: reads `dir/config.json`, then maps `dir/model.safetensors`, or else reads
    /// `dir/model.safetensors.index.json` and maps every shard its `"weight_map"` names, once.
    ///
    /// A shard path that is absolute or has a `..` component is an error (symbolic links inside
    /// the directory are followed: the Hugging Face cache links snapshots to `../../blobs`).
    /// So is a name the weight map assigns to a file that lacks it, and a name found in two
    /// shards.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = Config::parse_at(&text, &config_path)?;

        let single = dir.join(WEIGHTS_FILE);
        let index_path = dir.join(INDEX_FILE);
        if entry_exists(&single) {
            let shard = Shard::parse(single.clone(), map_file(&single)?)?;
            return assemble(config, Some(dir.to_path_buf()), vec![shard]);
        }
        if !entry_exists(&index_path) {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("found neither {WEIGHTS_FILE} nor {INDEX_FILE}"),
                ),
            });
        }
        let index_text = std::fs::read_to_string(&index_path).map_err(|source| Error::Io {
            path: index_path.clone(),
            source,
        })?;
        let weight_map = parse_index(&index_text, &index_path)?;
        load_sharded(config, Some(dir), &index_path, weight_map, |rel, _| {
            let path = dir.join(rel);
            let bytes = map_file(&path)?;
            Ok((path, bytes))
        })
    }

    /// The same as [`Checkpoint::open`] from memory: a `config.json` text and named safetensors
    /// files. With no index, every shard's tensors are loaded (a single shard holds
    /// everything; a name in two shards is an error). Errors name a shard by its given name.
    pub fn from_bytes(config_json: &str, shards: Vec<(String, Vec<u8>)>) -> Result<Checkpoint> {
        let config = Config::parse(config_json)?;
        let shards = shards
            .into_iter()
            .map(|(name, bytes)| Shard::parse(PathBuf::from(name), Bytes::Owned(bytes)))
            .collect::<Result<Vec<_>>>()?;
        assemble(config, None, shards)
    }

    /// [`Checkpoint::from_bytes`] for a sharded checkpoint: `index_json` is the text of
    /// `model.safetensors.index.json`, whose `"weight_map"` files are looked up among the
    /// `shards` by name (after the same path checks as [`Checkpoint::open`]). Shards the weight
    /// map does not name are ignored, as on disk.
    pub fn from_bytes_with_index(
        config_json: &str,
        index_json: &str,
        shards: Vec<(String, Vec<u8>)>,
    ) -> Result<Checkpoint> {
        let config = Config::parse(config_json)?;
        let index_path = Path::new(INDEX_FILE);
        let weight_map = parse_index(index_json, index_path)?;
        let mut given = BTreeMap::new();
        for (name, bytes) in shards {
            let rel = shard_rel_path(&name).map_err(Error::Invalid)?;
            if given.insert(rel, (name, bytes)).is_some() {
                return Err(Error::Invalid(
                    "two in-memory shards have the same name".to_owned(),
                ));
            }
        }
        load_sharded(config, None, index_path, weight_map, |rel, tensor| {
            let (name, bytes) = given.remove(rel).ok_or_else(|| Error::Corrupt {
                path: index_path.to_path_buf(),
                what: format!(
                    "weight_map puts tensor {tensor:?} in shard {:?}, which was not given",
                    rel.display()
                ),
            })?;
            Ok((PathBuf::from(name), Bytes::Owned(bytes)))
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The directory this checkpoint was opened from (`None` for [`Checkpoint::from_bytes`]).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.index.keys().map(String::as_str).collect()
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the checkpoint holds no tensor at all.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// A view of the tensor `name` ([`Error::MissingTensor`] if there is none).
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let missing = || Error::MissingTensor {
            name: name.to_owned(),
        };
        let (name, &shard_ix) = self.index.get_key_value(name).ok_or_else(missing)?;
        let shard = self.shards.get(shard_ix).ok_or_else(missing)?;
        let info = shard.meta.info(name).ok_or_else(missing)?;
        let (start, end) = info.data_offsets;
        // Validated when the shard was parsed; checked again rather than indexed.
        let bytes = shard
            .data_start
            .checked_add(start)
            .zip(shard.data_start.checked_add(end))
            .and_then(|(s, e)| shard.bytes.as_slice().get(s..e))
            .ok_or_else(|| Error::Corrupt {
                path: shard.path.clone(),
                what: format!("tensor {name:?}: data offsets [{start}, {end}] out of range"),
            })?;
        Ok(TensorView {
            name,
            dtype: TensorDType::from_safetensors(info.dtype),
            shape: &info.shape,
            bytes,
        })
    }
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// Whether a directory entry exists at `path` (a broken link counts: opening it then names it).
fn entry_exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Maps a whole file read-only.
fn map_file(path: &Path) -> Result<Bytes> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and owned by the `Checkpoint`, which hands out only shared
    // `&[u8]` borrows of it, so it outlives every view. The documented caveat of mapping a file:
    // if another process truncates or rewrites the file while it is mapped, reads may see the
    // new bytes or fault (SIGBUS). A checkpoint is not expected to change while it is loaded;
    // every offset is validated against the length the file had when it was mapped.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    Ok(Bytes::Mapped(map))
}

/// Builds a sharded checkpoint: maps or fetches each distinct shard of `weight_map` once (in
/// the order of first use), then checks that every name is in the shard the map assigns it.
fn load_sharded(
    config: Config,
    dir: Option<&Path>,
    index_path: &Path,
    weight_map: Vec<(String, PathBuf)>,
    mut fetch: impl FnMut(&Path, &str) -> Result<(PathBuf, Bytes)>,
) -> Result<Checkpoint> {
    let mut shard_of_file: BTreeMap<&Path, usize> = BTreeMap::new();
    let mut shards = Vec::new();
    let mut assigned = Vec::with_capacity(weight_map.len());
    for (name, rel) in &weight_map {
        let ix = match shard_of_file.get(rel.as_path()) {
            Some(&ix) => ix,
            None => {
                let (path, bytes) = fetch(rel, name)?;
                shards.push(Shard::parse(path, bytes)?);
                let ix = shards.len() - 1;
                shard_of_file.insert(rel, ix);
                ix
            }
        };
        assigned.push((name.as_str(), rel.as_path(), ix));
    }
    let ck = assemble(config, dir.map(Path::to_path_buf), shards)?;
    for (name, rel, ix) in assigned {
        if ck.index.get(name) != Some(&ix) {
            return Err(Error::Corrupt {
                path: index_path.to_path_buf(),
                what: format!(
                    "weight_map puts tensor {name:?} in {:?}, which does not contain it",
                    rel.display()
                ),
            });
        }
    }
    Ok(ck)
}

/// Indexes the tensors of every shard by name; a name in two shards is an error.
fn assemble(config: Config, dir: Option<PathBuf>, shards: Vec<Shard>) -> Result<Checkpoint> {
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (ix, shard) in shards.iter().enumerate() {
        for name in shard.meta.offset_keys() {
            if let Some(&other) = index.get(&name) {
                let other = shards.get(other).map_or(Path::new("?"), |s| &s.path);
                return Err(Error::Corrupt {
                    path: shard.path.clone(),
                    what: format!(
                        "tensor {name:?} is also in {}: a name may appear in one shard only",
                        other.display()
                    ),
                });
            }
            index.insert(name, ix);
        }
    }
    Ok(Checkpoint {
        config,
        dir,
        shards,
        index,
    })
}

/// Parses `model.safetensors.index.json`: the `"weight_map"` entries, each shard path checked
/// and normalised (`./a` is `a`), in the file's order.
fn parse_index(text: &str, index_path: &Path) -> Result<Vec<(String, PathBuf)>> {
    let corrupt = |what: String| Error::Corrupt {
        path: index_path.to_path_buf(),
        what,
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| corrupt(format!("invalid JSON: {e}")))?;
    let Value::Object(top) = value else {
        return Err(corrupt(format!(
            "expected a JSON object, found {}",
            describe(&value)
        )));
    };
    let map = match top.get("weight_map") {
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(corrupt(format!(
                "\"weight_map\" should be an object, found {}",
                describe(other)
            )));
        }
        None => return Err(corrupt("no \"weight_map\" key".to_owned())),
    };
    map.iter()
        .map(|(name, file)| {
            let file = file.as_str().ok_or_else(|| {
                corrupt(format!(
                    "weight_map[{name:?}] should be a file name, found {}",
                    describe(file)
                ))
            })?;
            let rel = shard_rel_path(file)
                .map_err(|what| corrupt(format!("weight_map[{name:?}]: {what}")))?;
            Ok((name.clone(), rel))
        })
        .collect()
}

/// A shard path relative to the checkpoint directory, normalised; absolute paths and `..`
/// components (anything that could leave the directory) are refused.
fn shard_rel_path(file: &str) -> std::result::Result<PathBuf, String> {
    let mut rel = PathBuf::new();
    for component in Path::new(file).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "shard path {file:?} leaves the checkpoint directory"
                ));
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(format!("shard path {file:?} names no file"));
    }
    Ok(rel)
}

// ---------------------------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------------------------

/// The bytes of one safetensors file.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(vec) => vec,
        }
    }
}

/// One validated safetensors file.
struct Shard {
    /// The file (or the in-memory shard's name), for error messages.
    path: PathBuf,
    bytes: Bytes,
    /// Where the data section starts: 8 + the header length.
    data_start: usize,
    meta: Metadata,
}

impl Shard {
    fn parse(path: PathBuf, bytes: Bytes) -> Result<Shard> {
        let buf = bytes.as_slice();
        let data_start = match precheck(buf) {
            Ok(start) => start,
            Err(what) => return Err(Error::Corrupt { path, what }),
        };
        // `precheck` has already refused everything `read_metadata` refuses that it can name
        // (and everything that could overflow inside it); this is the format's own check.
        let meta = match SafeTensors::read_metadata(buf) {
            Ok((header_len, meta)) if header_len.checked_add(8) == Some(data_start) => meta,
            Ok((header_len, _)) => {
                return Err(Error::Corrupt {
                    path,
                    what: format!("inconsistent header length {header_len}"),
                });
            }
            Err(e) => {
                return Err(Error::Corrupt {
                    path,
                    what: format!("invalid safetensors file: {e}"),
                });
            }
        };
        Ok(Shard {
            path,
            bytes,
            data_start,
            meta,
        })
    }
}

/// Validates a safetensors file with messages that name the tensor, and returns where its
/// data section starts. Every tensor's offsets must lie inside the data section, span exactly
/// shape × dtype bytes (no overflow), and the tensors together must tile the data section with
/// no gap or overlap. Besides the better messages, this keeps out of `read_metadata` the
/// offsets near `usize::MAX` whose sum would overflow there.
fn precheck(buf: &[u8]) -> std::result::Result<usize, String> {
    let Some((len_bytes, rest)) = buf.split_first_chunk::<8>() else {
        return Err(format!(
            "{} bytes is too short for a safetensors file (an 8-byte header length, then a \
             JSON header)",
            buf.len()
        ));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit (not a \
             safetensors file?)"
        ));
    }
    let (header, data) = usize::try_from(header_len)
        .ok()
        .and_then(|n| rest.split_at_checked(n))
        .ok_or_else(|| {
            format!(
                "header length {header_len} is larger than the rest of the file ({} bytes): \
                 truncated, or not a safetensors file",
                rest.len()
            )
        })?;
    let header = std::str::from_utf8(header).map_err(|e| format!("header is not UTF-8: {e}"))?;
    let entries: BTreeMap<String, Value> =
        serde_json::from_str(header).map_err(|e| format!("header is not valid JSON: {e}"))?;

    let mut spans = Vec::with_capacity(entries.len());
    for (name, entry) in &entries {
        if name == METADATA_KEY {
            continue;
        }
        let info = TensorInfo::deserialize(entry)
            .map_err(|e| format!("tensor {name:?}: bad header entry: {e}"))?;
        let (start, end) = info.data_offsets;
        let shape = &info.shape;
        let dtype = info.dtype;
        let size = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|numel| numel.checked_mul(dtype.bitsize()))
            .ok_or_else(|| {
                format!("tensor {name:?}: shape {shape:?} of {dtype} overflows the address space")
            })?;
        if size % 8 != 0 {
            return Err(format!(
                "tensor {name:?}: shape {shape:?} of {dtype} is not a whole number of bytes"
            ));
        }
        let size = size / 8;
        if end < start {
            return Err(format!(
                "tensor {name:?}: data_offsets [{start}, {end}] end before they start"
            ));
        }
        if end > data.len() {
            return Err(format!(
                "tensor {name:?}: data_offsets [{start}, {end}] run past the end of the data \
                 section ({} bytes): truncated file?",
                data.len()
            ));
        }
        if end - start != size {
            return Err(format!(
                "tensor {name:?}: shape {shape:?} of {dtype} is {size} bytes, but data_offsets \
                 [{start}, {end}] span {}",
                end - start
            ));
        }
        spans.push((start, end, name.as_str()));
    }
    spans.sort_unstable();
    let mut pos = 0;
    let mut prev = None;
    for (start, end, name) in spans {
        if start < pos {
            return Err(format!(
                "tensor {name:?} (data_offsets [{start}, {end}]) overlaps tensor {:?}",
                prev.unwrap_or("")
            ));
        }
        if start > pos {
            return Err(format!(
                "{} unused bytes before tensor {name:?} (data_offsets [{start}, {end}])",
                start - pos
            ));
        }
        pos = end;
        prev = Some(name);
    }
    if pos != data.len() {
        return Err(format!(
            "the tensors cover {pos} of the {} bytes of the data section",
            data.len()
        ));
    }
    Ok(8 + header.len())
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// The element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorDType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Any other safetensors type, by its safetensors name (`"F64"`, `"U8"`, `"BOOL"`, …):
    /// viewable as raw bytes but not convertible.
    Other(&'static str),
}

impl TensorDType {
    /// The safetensors name: `"F32"`, `"BF16"`, …
    pub fn name(self) -> &'static str {
        match self {
            TensorDType::F32 => "F32",
            TensorDType::F16 => "F16",
            TensorDType::BF16 => "BF16",
            TensorDType::I64 => "I64",
            TensorDType::I32 => "I32",
            TensorDType::Other(name) => name,
        }
    }

    fn from_safetensors(dtype: Dtype) -> TensorDType {
        match dtype {
            Dtype::F32 => TensorDType::F32,
            Dtype::F16 => TensorDType::F16,
            Dtype::BF16 => TensorDType::BF16,
            Dtype::I64 => TensorDType::I64,
            Dtype::I32 => TensorDType::I32,
            Dtype::BOOL => TensorDType::Other("BOOL"),
            Dtype::F4 => TensorDType::Other("F4"),
            Dtype::F6_E2M3 => TensorDType::Other("F6_E2M3"),
            Dtype::F6_E3M2 => TensorDType::Other("F6_E3M2"),
            Dtype::U8 => TensorDType::Other("U8"),
            Dtype::I8 => TensorDType::Other("I8"),
            Dtype::F8_E5M2 => TensorDType::Other("F8_E5M2"),
            Dtype::F8_E4M3 => TensorDType::Other("F8_E4M3"),
            Dtype::F8_E8M0 => TensorDType::Other("F8_E8M0"),
            Dtype::F8_E4M3FNUZ => TensorDType::Other("F8_E4M3FNUZ"),
            Dtype::F8_E5M2FNUZ => TensorDType::Other("F8_E5M2FNUZ"),
            Dtype::I16 => TensorDType::Other("I16"),
            Dtype::U16 => TensorDType::Other("U16"),
            Dtype::U32 => TensorDType::Other("U32"),
            Dtype::C64 => TensorDType::Other("C64"),
            Dtype::F64 => TensorDType::Other("F64"),
            Dtype::U64 => TensorDType::Other("U64"),
            _ => TensorDType::Other("unknown"),
        }
    }
}

impl fmt::Display for TensorDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor of a [`Checkpoint`]: its name, element type, shape and little-endian bytes
/// (borrowed from the mapped file, at any alignment).
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    /// The name as Hugging Face writes it (`"encoder.layer.0.attention.self.query.weight"`).
    pub name: &'a str,
    /// The stored element type.
    pub dtype: TensorDType,
    /// The shape, row-major (outermost first).
    pub shape: &'a [usize],
    bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// The number of elements (the product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        // The loader checked that this product fits (it sizes the stored bytes).
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }

    /// The stored bytes, little-endian, unaligned.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// [`Error::BadTensor`] unless the shape is exactly `shape`.
    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(self.bad(format!("expected shape {shape:?}, found {:?}", self.shape)))
        }
    }

    /// The elements as f32, from F32, F16 or BF16 (exact: every F16 and BF16 value is an f32).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self.dtype {
            TensorDType::F32 => Ok(read_f32(self.bytes).into_owned()),
            TensorDType::F16 => Ok(widen(&read_f16(self.bytes))),
            TensorDType::BF16 => Ok(widen(&read_bf16(self.bytes))),
            other => Err(self.unconvertible(other, "f32", "F32, F16 or BF16")),
        }
    }

    /// The elements as f16: F16 as stored; F32 rounded to nearest (ties to even; beyond the
    /// f16 range, ±infinity); BF16 through f32, rounded the same way.
    pub fn to_f16(&self) -> Result<Vec<f16>> {
        match self.dtype {
            TensorDType::F16 => Ok(read_f16(self.bytes).into_owned()),
            TensorDType::F32 => Ok(narrow(&read_f32(self.bytes))),
            TensorDType::BF16 => Ok(narrow(&widen(&read_bf16(self.bytes)))),
            other => Err(self.unconvertible(other, "f16", "F32, F16 or BF16")),
        }
    }

    /// The elements as bf16: BF16 as stored; F32 rounded to nearest (ties to even); F16
    /// through f32, rounded the same way.
    pub fn to_bf16(&self) -> Result<Vec<bf16>> {
        match self.dtype {
            TensorDType::BF16 => Ok(read_bf16(self.bytes).into_owned()),
            TensorDType::F32 => Ok(narrow(&read_f32(self.bytes))),
            TensorDType::F16 => Ok(narrow(&widen(&read_f16(self.bytes)))),
            other => Err(self.unconvertible(other, "bf16", "F32, F16 or BF16")),
        }
    }

    /// The elements as i64, from I64 or I32 (sign-extended).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        match self.dtype {
            TensorDType::I64 => {
                let (chunks, _) = self.bytes.as_chunks::<8>();
                Ok(chunks.iter().map(|c| i64::from_le_bytes(*c)).collect())
            }
            TensorDType::I32 => {
                let (chunks, _) = self.bytes.as_chunks::<4>();
                Ok(chunks
                    .iter()
                    .map(|c| i64::from(i32::from_le_bytes(*c)))
                    .collect())
            }
            other => Err(self.unconvertible(other, "i64", "I64 or I32")),
        }
    }

    fn bad(&self, what: String) -> Error {
        Error::BadTensor {
            name: self.name.to_owned(),
            what,
        }
    }

    fn unconvertible(&self, dtype: TensorDType, to: &str, from: &str) -> Error {
        self.bad(format!(
            "element type {dtype} cannot be read as {to} (only {from})"
        ))
    }
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// Reinterprets little-endian bytes as `T` without copying where the platform is little-endian
/// and the bytes happen to be aligned; otherwise decodes them one element at a time.
fn read_le<'b, T: bytemuck::Pod, const N: usize>(
    bytes: &'b [u8],
    decode: impl Fn([u8; N]) -> T,
) -> Cow<'b, [T]> {
    #[cfg(target_endian = "little")]
    if let Ok(aligned) = bytemuck::try_cast_slice::<u8, T>(bytes) {
        return Cow::Borrowed(aligned);
    }
    let (chunks, _) = bytes.as_chunks::<N>();
    Cow::Owned(chunks.iter().map(|c| decode(*c)).collect())
}

fn read_f32(bytes: &[u8]) -> Cow<'_, [f32]> {
    read_le(bytes, f32::from_le_bytes)
}

fn read_f16(bytes: &[u8]) -> Cow<'_, [f16]> {
    read_le(bytes, f16::from_le_bytes)
}

fn read_bf16(bytes: &[u8]) -> Cow<'_, [bf16]> {
    read_le(bytes, bf16::from_le_bytes)
}

/// f16 / bf16 → f32 (exact), vectorised by `half` where the CPU allows.
fn widen<H>(src: &[H]) -> Vec<f32>
where
    [H]: HalfFloatSliceExt,
{
    let mut out = vec![0.0f32; src.len()];
    src.convert_to_f32_slice(&mut out);
    out
}

/// f32 → f16 / bf16, rounded to nearest (ties to even), vectorised by `half` where it can.
fn narrow<H: Copy + Default>(src: &[f32]) -> Vec<H>
where
    [H]: HalfFloatSliceExt,
{
    let mut out = vec![H::default(); src.len()];
    out.convert_from_f32_slice(src);
    out
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// A parsed `config.json` (a JSON object), with typed accessors whose errors name the key.
///
/// A key whose value is `null` counts as absent for the `*_or` and `opt_*` accessors (Hugging
/// Face writes `"n_inner": null` for "use the default"); the plain accessors refuse it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Always a `Value::Object`.
    json: Value,
}

impl Config {
    /// Parses the text of a `config.json` (errors name `config.json`).
    pub fn parse(json: &str) -> Result<Config> {
        Config::parse_at(json, Path::new(CONFIG_FILE))
    }

    fn parse_at(json: &str, path: &Path) -> Result<Config> {
        let corrupt = |what: String| Error::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let value: Value =
            serde_json::from_str(json).map_err(|e| corrupt(format!("invalid JSON: {e}")))?;
        if !value.is_object() {
            return Err(corrupt(format!(
                "expected a JSON object, found {}",
                describe(&value)
            )));
        }
        Ok(Config { json: value })
    }

    /// The whole JSON object.
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// A string; missing, `null` or another type is an error.
    pub fn str(&self, key: &str) -> Result<&str> {
        let value = self.required(key, "a string")?;
        value
            .as_str()
            .ok_or_else(|| wrong_type(key, "a string", value))
    }

    /// A string, or `default` if the key is missing or `null`; another type is an error.
    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.optional(key) {
            None => Ok(default),
            Some(value) => value
                .as_str()
                .ok_or_else(|| wrong_type(key, "a string", value)),
        }
    }

    /// A non-negative integer no larger than 2^40; missing, `null`, another type, a negative
    /// or fractional number, or an absurdly large one is an error.
    pub fn usize(&self, key: &str) -> Result<usize> {
        to_usize(key, self.required(key, "a non-negative integer")?)
    }

    /// [`Config::usize`], or `default` if the key is missing or `null`.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    /// [`Config::usize`], or `None` if the key is missing or `null`.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.optional(key).map(|v| to_usize(key, v)).transpose()
    }

    /// A finite number (an integer is accepted); missing, `null` or another type is an error.
    pub fn f64(&self, key: &str) -> Result<f64> {
        to_f64(key, self.required(key, "a number")?)
    }

    /// [`Config::f64`], or `default` if the key is missing or `null`.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        self.optional(key)
            .map_or(Ok(default), |value| to_f64(key, value))
    }

    /// A boolean, or `default` if the key is missing or `null`; another type is an error.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.optional(key) {
            None => Ok(default),
            Some(value) => value
                .as_bool()
                .ok_or_else(|| wrong_type(key, "true or false", value)),
        }
    }

    /// `"model_type"` (`"bert"`, `"gpt2"`, `"t5"`, …).
    pub fn model_type(&self) -> Result<&str> {
        self.str("model_type")
    }

    /// The value of `key`, `None` if it is missing or `null`.
    fn optional(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn required(&self, key: &str, expected: &str) -> Result<&Value> {
        match self.json.get(key) {
            None => Err(config_error(key, format!("missing (expected {expected})"))),
            Some(Value::Null) => Err(config_error(key, format!("null (expected {expected})"))),
            Some(value) => Ok(value),
        }
    }
}

fn config_error(key: &str, what: String) -> Error {
    Error::Config {
        key: key.to_owned(),
        what,
    }
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> Error {
    config_error(
        key,
        format!("expected {expected}, found {}", describe(found)),
    )
}

fn to_usize(key: &str, value: &Value) -> Result<usize> {
    let n = value
        .as_u64()
        .ok_or_else(|| wrong_type(key, "a non-negative integer", value))?;
    if n > MAX_CONFIG_USIZE {
        return Err(config_error(
            key,
            format!("{n} is implausibly large (over 2^40): corrupt config?"),
        ));
    }
    usize::try_from(n)
        .map_err(|_| config_error(key, format!("{n} does not fit in this platform's usize")))
}

fn to_f64(key: &str, value: &Value) -> Result<f64> {
    match value.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        Some(x) => Err(config_error(key, format!("{x} is not finite"))),
        None => Err(wrong_type(key, "a number", value)),
    }
}

/// A short description of a JSON value for error messages: its type and (clipped) text.
fn describe(value: &Value) -> String {
    let kind = match value {
        Value::Null => return "null".to_owned(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => return "an array".to_owned(),
        Value::Object(_) => return "an object".to_owned(),
    };
    let text = value.to_string();
    const MAX_CHARS: usize = 40;
    if text.chars().count() > MAX_CHARS {
        let clipped: String = text.chars().take(MAX_CHARS).collect();
        format!("{kind} ({clipped}…)")
    } else {
        format!("{kind} ({text})")
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// A tensor for [`save`].
#[derive(Debug, Clone, PartialEq)]
pub enum OutTensor {
    /// f32 elements, row-major.
    F32 {
        /// The shape; its product must be `data.len()`.
        shape: Vec<usize>,
        /// The elements.
        data: Vec<f32>,
    },
    /// i64 elements (token ids), row-major.
    I64 {
        /// The shape; its product must be `data.len()`.
        shape: Vec<usize>,
        /// The elements.
        data: Vec<i64>,
    },
}

/// A tensor as `safetensors` serialises it.
struct OutView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    bytes: Cow<'a, [u8]>,
}

impl View for OutView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Little-endian bytes of plain numbers (borrowed where the platform is little-endian).
fn le_bytes<T: bytemuck::Pod, const N: usize>(
    data: &[T],
    encode: impl Fn(T) -> [u8; N],
) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(|&x| encode(x)).collect())
    }
}

/// Writes `tensors` to the safetensors file `path` (replacing it atomically: the file is
/// written next to it, then renamed), with `{"format": "pt"}` metadata so that both
/// `safetensors.numpy` and `safetensors.torch` read it. The layout is the format's canonical
/// one (the `safetensors` crate orders data by element type, then name), whatever the order
/// given; readers look tensors up by name. A shape whose product is not the number of
/// elements, or a name given twice, is [`Error::Invalid`].
pub fn save(path: impl AsRef<Path>, tensors: &[(String, OutTensor)]) -> Result<()> {
    let path = path.as_ref();
    let invalid = |what: String| Error::Invalid(format!("{}: {what}", path.display()));
    let mut seen = BTreeSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if name == METADATA_KEY {
            return Err(invalid(format!("{METADATA_KEY:?} cannot name a tensor")));
        }
        if !seen.insert(name.as_str()) {
            return Err(invalid(format!("tensor {name:?} given twice")));
        }
        let (dtype, shape, len, bytes) = match tensor {
            OutTensor::F32 { shape, data } => (
                Dtype::F32,
                shape,
                data.len(),
                le_bytes(data, f32::to_le_bytes),
            ),
            OutTensor::I64 { shape, data } => (
                Dtype::I64,
                shape,
                data.len(),
                le_bytes(data, i64::to_le_bytes),
            ),
        };
        let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if numel != Some(len) {
            return Err(invalid(format!(
                "tensor {name:?}: shape {shape:?} does not hold the {len} elements given"
            )));
        }
        views.push((
            name.as_str(),
            OutView {
                dtype,
                shape,
                bytes,
            },
        ));
    }
    let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| match e {
        SafeTensorError::IoError(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        other => invalid(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("tessera-loader-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
            std::fs::write(self.0.join(name), bytes).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CONFIG: &str = r#"{"model_type": "gpt2", "n_embd": 4, "n_inner": null,
        "layer_norm_epsilon": 1e-5, "scale_attn_weights": true, "vocab_size": 7,
        "initializer_factor": 1, "activation_function": "gelu_new"}"#;

    /// A safetensors file with the given raw header text and data section.
    fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    /// A well-formed safetensors file from (name, dtype, shape, bytes), via the crate.
    fn st_file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                (
                    *name,
                    OutView {
                        dtype: *dtype,
                        shape,
                        bytes: Cow::Borrowed(bytes.as_slice()),
                    },
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn f32_bytes(xs: &[f32]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn one_shard(bytes: Vec<u8>) -> Result<Checkpoint> {
        Checkpoint::from_bytes(CONFIG, vec![("shard.safetensors".to_owned(), bytes)])
    }

    /// The error's message; panics if `r` is Ok.
    fn err_text<T: fmt::Debug>(r: Result<T>) -> (Error, String) {
        let e = r.expect_err("expected an error");
        let text = e.to_string();
        (e, text)
    }

    fn corrupt_text(bytes: Vec<u8>) -> String {
        let (e, text) = err_text(one_shard(bytes));
        assert!(
            matches!(&e, Error::Corrupt { path, .. } if path == Path::new("shard.safetensors")),
            "{e:?}"
        );
        text
    }

    #[test]
    fn save_then_open_round_trips() {
        let dir = TempDir::new("roundtrip");
        let weights = vec![1.5f32, -2.0, 0.0, f32::MAX, f32::MIN_POSITIVE, -0.0];
        let ids = vec![0i64, -1, i64::MAX, i64::MIN];
        let tensors = vec![
            (
                "w".to_owned(),
                OutTensor::F32 {
                    shape: vec![2, 3],
                    data: weights.clone(),
                },
            ),
            (
                "ids".to_owned(),
                OutTensor::I64 {
                    shape: vec![4],
                    data: ids.clone(),
                },
            ),
            (
                "scalar".to_owned(),
                OutTensor::F32 {
                    shape: vec![],
                    data: vec![3.25],
                },
            ),
            (
                "empty".to_owned(),
                OutTensor::F32 {
                    shape: vec![0, 5],
                    data: vec![],
                },
            ),
        ];
        save(dir.0.join(WEIGHTS_FILE), &tensors).unwrap();
        dir.write(CONFIG_FILE, CONFIG);

        let ck = Checkpoint::open(&dir.0).unwrap();
        assert_eq!(ck.dir(), Some(dir.0.as_path()));
        assert_eq!(ck.names(), ["empty", "ids", "scalar", "w"]);
        assert_eq!(ck.len(), 4);
        assert!(ck.contains("w") && !ck.contains("x"));

        let w = ck.tensor("w").unwrap();
        assert_eq!(
            (w.name, w.dtype, w.shape),
            ("w", TensorDType::F32, &[2, 3][..])
        );
        assert_eq!(w.numel(), 6);
        w.expect_shape(&[2, 3]).unwrap();
        let back = w.to_f32().unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            weights.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let i = ck.tensor("ids").unwrap();
        assert_eq!(i.dtype, TensorDType::I64);
        assert_eq!(i.to_i64().unwrap(), ids);
        let s = ck.tensor("scalar").unwrap();
        assert_eq!((s.shape, s.numel()), (&[][..], 1));
        assert_eq!(s.to_f32().unwrap(), [3.25]);
        let e = ck.tensor("empty").unwrap();
        assert_eq!(e.numel(), 0);
        assert!(e.to_f32().unwrap().is_empty());

        let config = ck.config();
        assert_eq!(config.model_type().unwrap(), "gpt2");
        assert_eq!(config.usize("n_embd").unwrap(), 4);
        assert_eq!(config.json()["vocab_size"], 7);

        // `save` replaces an existing file (even one that is mapped right now).
        save(
            dir.0.join(WEIGHTS_FILE),
            &[(
                "only".to_owned(),
                OutTensor::I64 {
                    shape: vec![1],
                    data: vec![9],
                },
            )],
        )
        .unwrap();
        assert_eq!(w.to_f32().unwrap().len(), 6);
        let again = Checkpoint::open(&dir.0).unwrap();
        assert_eq!(again.names(), ["only"]);
    }

    #[test]
    fn save_refuses_mismatched_shapes_and_duplicates() {
        let dir = TempDir::new("save-invalid");
        let path = dir.0.join("out.safetensors");
        let bad_len = [(
            "logits".to_owned(),
            OutTensor::F32 {
                shape: vec![2, 2],
                data: vec![0.0; 3],
            },
        )];
        let (e, text) = err_text(save(&path, &bad_len));
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        assert!(text.contains("logits") && text.contains("[2, 2]"), "{text}");
        let overflow = [(
            "x".to_owned(),
            OutTensor::I64 {
                shape: vec![usize::MAX, 2],
                data: vec![],
            },
        )];
        assert!(matches!(save(&path, &overflow), Err(Error::Invalid(_))));
        let t = OutTensor::I64 {
            shape: vec![1],
            data: vec![1],
        };
        let twice = [("a".to_owned(), t.clone()), ("a".to_owned(), t)];
        let (_, text) = err_text(save(&path, &twice));
        assert!(text.contains("twice"), "{text}");
        assert!(!path.exists());
        let (e, _) = err_text(save(dir.0.join("no/such/dir/x.safetensors"), &[]));
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
    }

    #[test]
    fn half_conversions_are_exact_or_round_to_nearest_even() {
        let f16_bits: Vec<u16> = vec![
            0x0000, 0x8000, 0x0001, 0x03ff, 0x0400, 0x3c00, 0x3c01, 0x7bff, 0x7c00, 0xfc00, 0xc000,
            0x7e00,
        ];
        let bf16_bits: Vec<u16> = vec![
            0x0000, 0x8000, 0x0001, 0x007f, 0x0080, 0x3f80, 0x3f81, 0x7f7f, 0x7f80, 0xff80, 0xc000,
            0x7fc0,
        ];
        // f32 values that sit exactly between two f16 values (ties) and just off them.
        let one_ulp16 = 2f32.powi(-10);
        let f32_vals = vec![
            1.0 + one_ulp16 / 2.0,                  // tie → even (1.0)
            1.0 + 3.0 * one_ulp16 / 2.0,            // tie → even (1 + 2 ulp)
            1.0 + one_ulp16 / 2.0 + 2f32.powi(-20), // just above the tie → up
            65520.0,                                // f16 overflow boundary → inf
            65519.0,                                // → 65504 (f16::MAX)
            2f32.powi(-25),                         // tie between 0 and the smallest subnormal → 0
            f32::NAN,
            -0.0,
            1.0 + 2f32.powi(-8),       // bf16 tie → 1.0
            1.0 + 3.0 * 2f32.powi(-8), // bf16 tie → 1 + 2^-6
        ];
        let bytes16: Vec<u8> = f16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let bytesb16: Vec<u8> = bf16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let n = f16_bits.len();
        let file = st_file(&[
            ("h", Dtype::F16, vec![n], bytes16),
            ("b", Dtype::BF16, vec![n], bytesb16),
            ("f", Dtype::F32, vec![f32_vals.len()], f32_bytes(&f32_vals)),
            (
                "i32",
                Dtype::I32,
                vec![3],
                [-1i32, 7, i32::MIN]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            ("u8", Dtype::U8, vec![2], vec![1, 2]),
        ]);
        let ck = one_shard(file).unwrap();

        // f16 → f32: exact (compare with the definition: sign, exponent, mantissa).
        let h = ck.tensor("h").unwrap();
        assert_eq!(h.dtype, TensorDType::F16);
        let wide = h.to_f32().unwrap();
        let expect: Vec<f32> = vec![
            0.0,
            -0.0,
            2f32.powi(-24),
            1023.0 * 2f32.powi(-24),
            2f32.powi(-14),
            1.0,
            1.0 + one_ulp16,
            65504.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -2.0,
        ];
        for (i, (got, want)) in wide.iter().zip(&expect).enumerate() {
            assert_eq!(got.to_bits(), want.to_bits(), "f16 element {i}");
        }
        assert!(wide[n - 1].is_nan());
        // f16 → f16 is the stored bits.
        let same: Vec<u16> = h.to_f16().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(same, f16_bits);

        // bf16 → f32: exact (the top 16 bits of the f32).
        let b = ck.tensor("b").unwrap();
        let wide = b.to_f32().unwrap();
        for (i, (&bits, got)) in bf16_bits.iter().zip(&wide).enumerate() {
            if bits == 0x7fc0 {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), u32::from(bits) << 16, "bf16 element {i}");
            }
        }
        let same: Vec<u16> = b.to_bf16().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(same, bf16_bits);

        // f32 → f16 / bf16: round to nearest, ties to even.
        let f = ck.tensor("f").unwrap();
        let narrow16: Vec<u16> = f.to_f16().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            &narrow16[..6],
            &[0x3c00, 0x3c02, 0x3c01, 0x7c00, 0x7bff, 0x0000]
        );
        assert!(f16::from_bits(narrow16[6]).is_nan());
        assert_eq!(narrow16[7], 0x8000);
        let narrowb: Vec<u16> = f.to_bf16().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(&narrowb[8..], &[0x3f80, 0x3f82]);
        for (x, got) in f32_vals.iter().zip(&narrowb) {
            if !x.is_nan() {
                assert_eq!(*got, bf16::from_f32(*x).to_bits());
            }
        }

        // f16 ↔ bf16 go through f32 and round there.
        let hb: Vec<bf16> = h.to_bf16().unwrap();
        for (x, got) in h.to_f32().unwrap().iter().zip(&hb) {
            if !x.is_nan() {
                assert_eq!(got.to_bits(), bf16::from_f32(*x).to_bits());
            }
        }
        let bh: Vec<f16> = b.to_f16().unwrap();
        for (x, got) in b.to_f32().unwrap().iter().zip(&bh) {
            if !x.is_nan() {
                assert_eq!(got.to_bits(), f16::from_f32(*x).to_bits());
            }
        }
        assert_eq!(bh[7], f16::INFINITY); // bf16::MAX is far beyond f16

        // Integers.
        assert_eq!(
            ck.tensor("i32").unwrap().to_i64().unwrap(),
            [-1, 7, i64::from(i32::MIN)]
        );

        // Conversions a dtype does not support name the tensor.
        let (e, text) = err_text(ck.tensor("i32").unwrap().to_f32());
        assert!(
            matches!(e, Error::BadTensor { ref name, .. } if name == "i32"),
            "{e:?}"
        );
        assert!(text.contains("I32"), "{text}");
        assert!(ck.tensor("f").unwrap().to_i64().is_err());
        let u8t = ck.tensor("u8").unwrap();
        assert_eq!(u8t.dtype, TensorDType::Other("U8"));
        assert_eq!(u8t.bytes(), [1, 2]);
        for r in [
            u8t.to_f32().map(drop),
            u8t.to_f16().map(drop),
            u8t.to_bf16().map(drop),
            u8t.to_i64().map(drop),
        ] {
            assert!(matches!(r, Err(Error::BadTensor { .. })));
        }
    }

    #[test]
    fn unaligned_data_reads_the_same() {
        let xs = [1.0f32, -3.5, 1e-40, 7.0];
        let ids = [5i64, -6];
        let mut data = f32_bytes(&xs);
        data.extend(ids.iter().flat_map(|x| x.to_le_bytes()));
        let h16: Vec<u8> = [0x3c00u16, 0xc000]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        data.extend(&h16);
        let header = r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},
            "ids":{"dtype":"I64","shape":[2],"data_offsets":[16,32]},
            "h":{"dtype":"F16","shape":[2],"data_offsets":[32,36]}}"#;
        // Pad the header so that the data section starts at every alignment.
        let mut unaligned = 0;
        for pad in 0..8 {
            let header = format!("{header}{}", " ".repeat(pad));
            let ck = one_shard(raw_file(&header, &data)).unwrap();
            let x = ck.tensor("x").unwrap();
            unaligned += usize::from(x.bytes().as_ptr().align_offset(4) != 0);
            let got = x.to_f32().unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                xs.map(f32::to_bits)
            );
            assert_eq!(ck.tensor("ids").unwrap().to_i64().unwrap(), ids);
            assert_eq!(ck.tensor("h").unwrap().to_f32().unwrap(), [1.0, -2.0]);
            assert_eq!(
                x.to_f16().unwrap(),
                xs.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()
            );
        }
        assert!(
            unaligned > 0,
            "no case put the data section at an unaligned address"
        );
    }

    #[test]
    fn sharded_checkpoint_resolves_names_to_their_shard() {
        let dir = TempDir::new("sharded");
        dir.write(CONFIG_FILE, CONFIG);
        let shard1 = st_file(&[
            ("a", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
            ("c", Dtype::F32, vec![1], f32_bytes(&[3.0])),
        ]);
        let shard2 = st_file(&[("b", Dtype::F32, vec![3], f32_bytes(&[4.0, 5.0, 6.0]))]);
        dir.write("model-00001-of-00002.safetensors", &shard1);
        dir.write("model-00002-of-00002.safetensors", &shard2);
        let index = r#"{"metadata": {"total_size": 24}, "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "./model-00002-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors"}}"#;
        dir.write(INDEX_FILE, index);

        let ck = Checkpoint::open(&dir.0).unwrap();
        assert_eq!(ck.names(), ["a", "b", "c"]);
        assert_eq!(ck.shards.len(), 2, "each shard is mapped once");
        assert_eq!(ck.tensor("a").unwrap().to_f32().unwrap(), [1.0, 2.0]);
        assert_eq!(ck.tensor("b").unwrap().to_f32().unwrap(), [4.0, 5.0, 6.0]);
        assert_eq!(ck.tensor("c").unwrap().to_f32().unwrap(), [3.0]);
        assert_eq!(ck.config().model_type().unwrap(), "gpt2");

        // The same from memory.
        let shards = vec![
            (
                "model-00002-of-00002.safetensors".to_owned(),
                shard2.clone(),
            ),
            (
                "model-00001-of-00002.safetensors".to_owned(),
                shard1.clone(),
            ),
        ];
        let mem = Checkpoint::from_bytes_with_index(CONFIG, index, shards).unwrap();
        assert_eq!(mem.names(), ["a", "b", "c"]);
        assert_eq!(mem.tensor("b").unwrap().to_f32().unwrap(), [4.0, 5.0, 6.0]);
        assert_eq!(mem.dir(), None);

        // Without an index, the in-memory shards are merged.
        let merged = Checkpoint::from_bytes(
            CONFIG,
            vec![
                ("one".to_owned(), shard1.clone()),
                ("two".to_owned(), shard2.clone()),
            ],
        )
        .unwrap();
        assert_eq!(merged.names(), ["a", "b", "c"]);

        // A name the map assigns to the wrong shard.
        dir.write(
            INDEX_FILE,
            r#"{"weight_map": {"a": "model-00002-of-00002.safetensors",
                               "b": "model-00002-of-00002.safetensors"}}"#,
        );
        let (e, text) = err_text(Checkpoint::open(&dir.0));
        assert!(
            matches!(&e, Error::Corrupt { path, .. } if path.ends_with(INDEX_FILE)),
            "{e:?}"
        );
        assert!(
            text.contains("\"a\"") && text.contains("model-00002-of-00002"),
            "{text}"
        );

        // A shard that is not there.
        dir.write(
            INDEX_FILE,
            r#"{"weight_map": {"a": "model-00003-of-00002.safetensors"}}"#,
        );
        let (e, text) = err_text(Checkpoint::open(&dir.0));
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(text.contains("model-00003-of-00002.safetensors"), "{text}");

        // model.safetensors wins over an index when both are there.
        dir.write(WEIGHTS_FILE, &shard2);
        assert_eq!(Checkpoint::open(&dir.0).unwrap().names(), ["b"]);
    }

    #[test]
    fn shard_paths_may_not_leave_the_directory() {
        let dir = TempDir::new("escape");
        dir.write(CONFIG_FILE, CONFIG);
        for bad in [
            "../model.safetensors",
            "sub/../../x.safetensors",
            "/etc/passwd",
            "",
            ".",
        ] {
            let index = format!(r#"{{"weight_map": {{"w": {}}}}}"#, Value::from(bad));
            dir.write(INDEX_FILE, &index);
            let (e, text) = err_text(Checkpoint::open(&dir.0));
            assert!(
                matches!(&e, Error::Corrupt { path, .. } if path.ends_with(INDEX_FILE)),
                "{bad:?}: {e:?}"
            );
            assert!(text.contains("\"w\""), "{text}");
            let (e, _) = err_text(Checkpoint::from_bytes_with_index(CONFIG, &index, vec![]));
            assert!(matches!(e, Error::Corrupt { .. }), "{bad:?}: {e:?}");
        }
        assert!(shard_rel_path("../x").unwrap_err().contains("leaves"));
        assert_eq!(shard_rel_path("./a/./b").unwrap(), Path::new("a/b"));
    }

    #[test]
    fn index_json_errors_name_the_index() {
        for (index, needle) in [
            ("{", "invalid JSON"),
            ("[1]", "object"),
            ("{}", "weight_map"),
            (r#"{"weight_map": []}"#, "weight_map"),
            (r#"{"weight_map": {"w": 3}}"#, "\"w\""),
        ] {
            let (e, text) = err_text(Checkpoint::from_bytes_with_index(CONFIG, index, vec![]));
            assert!(matches!(&e, Error::Corrupt { path, .. } if path == Path::new(INDEX_FILE)));
            assert!(text.contains(needle), "{index}: {text}");
        }
        let (_, text) = err_text(Checkpoint::from_bytes_with_index(
            CONFIG,
            r#"{"weight_map": {"w": "missing.safetensors"}}"#,
            vec![],
        ));
        assert!(
            text.contains("missing.safetensors") && text.contains("not given"),
            "{text}"
        );
    }

    #[test]
    fn a_directory_without_weights_or_config_is_an_io_error() {
        let dir = TempDir::new("empty");
        let (e, text) = err_text(Checkpoint::open(&dir.0));
        assert!(
            matches!(e, Error::Io { .. }) && text.contains(CONFIG_FILE),
            "{text}"
        );
        dir.write(CONFIG_FILE, CONFIG);
        let (e, text) = err_text(Checkpoint::open(&dir.0));
        assert!(
            matches!(e, Error::Io { .. }) && text.contains(INDEX_FILE),
            "{text}"
        );
        dir.write(CONFIG_FILE, "{\"a\": ");
        let (e, text) = err_text(Checkpoint::open(&dir.0));
        assert!(
            matches!(e, Error::Corrupt { .. }) && text.contains(CONFIG_FILE),
            "{text}"
        );
        // An empty weights file maps (to nothing) and is refused.
        dir.write(CONFIG_FILE, CONFIG);
        dir.write(WEIGHTS_FILE, b"");
        let (e, text) = err_text(Checkpoint::open(&dir.0));
        assert!(
            matches!(e, Error::Corrupt { .. }) && text.contains(WEIGHTS_FILE),
            "{text}"
        );
    }

    #[test]
    fn corrupt_files_are_refused_with_the_file_named() {
        let good = st_file(&[
            ("a", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
            ("b", Dtype::F32, vec![1], f32_bytes(&[3.0])),
        ]);
        one_shard(good.clone()).unwrap();

        // Truncated: one byte short, and cut inside the header.
        let text = corrupt_text(good[..good.len() - 1].to_vec());
        assert!(
            text.contains("shard.safetensors") && text.contains("truncated"),
            "{text}"
        );
        let text = corrupt_text(good[..20].to_vec());
        assert!(text.contains("header length"), "{text}");
        let text = corrupt_text(good[..5].to_vec());
        assert!(text.contains("too short"), "{text}");
        // Trailing bytes after the last tensor.
        let mut long = good.clone();
        long.push(0);
        assert!(corrupt_text(long).contains("cover"));

        // Header length larger than the file, and absurdly large.
        let mut big = good.clone();
        big[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
        let text = corrupt_text(big);
        assert!(
            text.contains("header length") && text.contains("larger"),
            "{text}"
        );
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(corrupt_text(huge).contains("header length"));

        // Bad JSON / not UTF-8 / not an object / bad entries.
        assert!(corrupt_text(raw_file("{\"a\": ", &[])).contains("JSON"));
        assert!(corrupt_text(raw_file("[]", &[])).contains("JSON"));
        let mut bad_utf8 = raw_file("{}  ", &[]);
        bad_utf8[9] = 0xff;
        assert!(corrupt_text(bad_utf8).contains("UTF-8"));
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        ));
        assert!(text.contains("\"t\""), "{text}");
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        ));
        assert!(text.contains("\"t\""), "{text}");
        let text = corrupt_text(raw_file(r#"{"__metadata__": {"format": 1}}"#, &[]));
        assert!(text.contains("invalid safetensors"), "{text}");

        // Offsets out of range, reversed, overlapping, with gaps, misordered.
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
            &[0; 4],
        ));
        assert!(
            text.contains("\"t\"") && text.contains("past the end"),
            "{text}"
        );
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}"#,
            &[0; 4],
        ));
        assert!(text.contains("before they start"), "{text}");
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#,
            &[0; 8],
        ));
        assert!(text.contains("overlaps"), "{text}");
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#,
            &[0; 8],
        ));
        assert!(text.contains("unused"), "{text}");
        // Listed out of order in the header but tiling the data: fine.
        let ck = one_shard(raw_file(
            r#"{"u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
            &f32_bytes(&[1.0, 2.0]),
        ))
        .unwrap();
        assert_eq!(ck.tensor("u").unwrap().to_f32().unwrap(), [2.0]);

        // Byte length ≠ numel × dtype size, sub-byte sizes, shape product overflow.
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
            &[0; 8],
        ));
        assert!(
            text.contains("\"t\"") && text.contains("12 bytes"),
            "{text}"
        );
        let text = corrupt_text(raw_file(
            r#"{"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}"#,
            &[0; 1],
        ));
        assert!(text.contains("whole number of bytes"), "{text}");
        let text = corrupt_text(raw_file(
            &format!(
                r#"{{"t": {{"dtype": "F32", "shape": [{0}, {0}], "data_offsets": [0, 0]}}}}"#,
                usize::MAX
            ),
            &[],
        ));
        assert!(text.contains("overflows"), "{text}");
        // Offsets near usize::MAX (whose sum would overflow inside `read_metadata`).
        let m = (1usize << 61) - 1;
        let mut header = String::from("{");
        for k in 0..8 {
            header += &format!(
                r#""t{k}": {{"dtype": "U8", "shape": [{m}], "data_offsets": [{}, {}]}},"#,
                k * m,
                (k + 1) * m
            );
        }
        header.pop();
        header.push('}');
        assert!(corrupt_text(raw_file(&header, &[])).contains("past the end"));

        // The same name in two shards.
        let other = st_file(&[("a", Dtype::F32, vec![1], f32_bytes(&[9.0]))]);
        let (e, text) = err_text(Checkpoint::from_bytes(
            CONFIG,
            vec![
                ("first".to_owned(), good.clone()),
                ("second".to_owned(), other),
            ],
        ));
        assert!(
            matches!(&e, Error::Corrupt { path, .. } if path == Path::new("second")),
            "{e:?}"
        );
        assert!(text.contains("\"a\"") && text.contains("first"), "{text}");
    }

    #[test]
    fn missing_tensors_and_wrong_shapes_name_the_tensor() {
        let ck = one_shard(st_file(&[(
            "encoder.weight",
            Dtype::F32,
            vec![2, 3],
            f32_bytes(&[0.0; 6]),
        )]))
        .unwrap();
        let (e, text) = err_text(ck.tensor("decoder.weight"));
        assert!(matches!(e, Error::MissingTensor { ref name } if name == "decoder.weight"));
        assert!(text.contains("decoder.weight"), "{text}");
        let t = ck.tensor("encoder.weight").unwrap();
        let (e, text) = err_text(t.expect_shape(&[3, 2]));
        assert!(matches!(e, Error::BadTensor { .. }), "{e:?}");
        assert!(
            text.contains("encoder.weight") && text.contains("[3, 2]") && text.contains("[2, 3]"),
            "{text}"
        );
        assert!(t.expect_shape(&[6]).is_err());
        t.expect_shape(&[2, 3]).unwrap();
    }

    #[test]
    fn config_accessors_name_the_key() {
        let c = Config::parse(
            r#"{"model_type": "t5", "d_model": 512, "n_inner": null, "eps": 1e-6,
                "factor": 1, "tie": false, "neg": -3, "frac": 2.5, "big": 1099511627777,
                "name": 7, "flag": "yes", "act": "relu"}"#,
        )
        .unwrap();
        assert_eq!(c.model_type().unwrap(), "t5");
        assert_eq!(c.usize("d_model").unwrap(), 512);
        assert_eq!(c.usize_or("d_model", 1).unwrap(), 512);
        assert_eq!(c.usize_or("absent", 9).unwrap(), 9);
        assert_eq!(c.usize_or("n_inner", 9).unwrap(), 9);
        assert_eq!(c.opt_usize("n_inner").unwrap(), None);
        assert_eq!(c.opt_usize("absent").unwrap(), None);
        assert_eq!(c.opt_usize("d_model").unwrap(), Some(512));
        assert_eq!(c.f64("eps").unwrap(), 1e-6);
        assert_eq!(c.f64("factor").unwrap(), 1.0);
        assert_eq!(c.f64_or("absent", 0.5).unwrap(), 0.5);
        assert!(!c.bool_or("tie", true).unwrap());
        assert!(c.bool_or("absent", true).unwrap());
        assert_eq!(c.str_or("act", "gelu").unwrap(), "relu");
        assert_eq!(c.str_or("absent", "gelu").unwrap(), "gelu");
        let (_, text) = err_text(c.usize("big"));
        assert!(text.contains("2^40"), "{text}");

        let cases: Vec<(&str, Result<()>)> = vec![
            ("absent", c.usize("absent").map(drop)),
            ("n_inner", c.usize("n_inner").map(drop)),
            ("neg", c.usize("neg").map(drop)),
            ("frac", c.usize("frac").map(drop)),
            ("act", c.usize_or("act", 1).map(drop)),
            ("neg", c.opt_usize("neg").map(drop)),
            ("big", c.usize("big").map(drop)),
            ("name", c.str("name").map(drop)),
            ("name", c.str_or("name", "x").map(drop)),
            ("absent", c.str("absent").map(drop)),
            ("act", c.f64("act").map(drop)),
            ("act", c.f64_or("act", 1.0).map(drop)),
            ("flag", c.bool_or("flag", false).map(drop)),
            (
                "model_type",
                Config::parse("{}").unwrap().model_type().map(drop),
            ),
        ];
        for (key, r) in cases {
            let (e, text) = err_text(r);
            assert!(
                matches!(&e, Error::Config { key: k, .. } if k == key),
                "{key}: {e:?}"
            );
            assert!(text.contains(&format!("{key:?}")), "{text}");
        }
        let (_, text) = err_text(c.str("name"));
        assert!(text.contains("string") && text.contains("7"), "{text}");

        for bad in ["[1, 2]", "\"gpt2\"", "{", "", "null"] {
            let (e, text) = err_text(Config::parse(bad));
            assert!(matches!(e, Error::Corrupt { .. }), "{bad}: {e:?}");
            assert!(text.contains(CONFIG_FILE), "{text}");
        }
        // A wrong config fails `from_bytes` before any shard is looked at.
        assert!(matches!(
            Checkpoint::from_bytes("[]", vec![]),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn checkpoints_are_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Checkpoint>();
        send_sync::<TensorView<'_>>();
    }

    #[test]
    fn describe_clips_long_values_on_char_boundaries() {
        let long = Value::from("é".repeat(100));
        let d = describe(&long);
        assert!(d.starts_with("a string (\"é") && d.ends_with("…)"), "{d}");
        assert_eq!(describe(&Value::Null), "null");
    }
}
