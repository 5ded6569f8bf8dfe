//! Attention operands: shapes, head layouts, masks and biases, and their validation.
//!
//! Attention computes, for every batch entry `b`, query head `h` and query row `i`,
//!
//! ```text
//! o[b, i, h, :] = Σ_j softmax_j(scale · q[b, i, h, :] · k[b, j, g, :] + bias[b, h, i, j] + mask[b, i, j]) · v[b, j, g, :]
//! ```
//!
//! where `g = h / (n_heads / n_kv_heads)` is the key/value head that query head `h` shares
//! (grouped-query attention; `n_kv_heads == n_heads` is plain multi-head attention,
//! `n_kv_heads == 1` multi-query attention), and the mask is 0 or −∞:
//!
//! * **causal**: query row `i` sits at position `q_offset + i` of the key sequence and sees
//!   keys `j <= q_offset + i` only (`q_offset` is the number of cached past tokens when a
//!   chunk of new tokens attends to a cache);
//! * **key padding**: per batch entry, either a length (keys `j >= len` are padding) or a
//!   boolean mask over the keys (`true` = attend).
//!
//! A query row whose keys are all masked has no softmax; its output is **zero**, never NaN.
//!
//! Every 4-d operand is `[batch, seq, heads, head_dim]` with `head_dim` contiguous and the
//! other three dimensions at arbitrary element strides ([`HeadLayout`]), which covers both the
//! Hugging Face `[batch, seq, heads·head_dim]` activations and `[batch, heads, seq, head_dim]`
//! caches without copies.

use crate::{Error, Result};

/// Largest supported `head_dim`.
pub const MAX_HEAD_DIM: usize = 1024;

/// Element strides of a `[batch, seq, heads, head_dim]` operand whose `head_dim` elements
/// are contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Elements between consecutive batch entries.
    pub batch_stride: usize,
    /// Elements between consecutive positions of the sequence.
    pub seq_stride: usize,
    /// Elements between consecutive heads.
    pub head_stride: usize,
}

impl HeadLayout {
    /// Dense `[batch, seq, heads, head_dim]` (Hugging Face activations: a row of
    /// `heads · head_dim` per token).
    pub fn bshd(seq: usize, heads: usize, head_dim: usize) -> HeadLayout {
        HeadLayout {
            batch_stride: seq * heads * head_dim,
            seq_stride: heads * head_dim,
            head_stride: head_dim,
        }
    }

    /// Dense `[batch, heads, seq, head_dim]`.
    pub fn bhsd(seq: usize, heads: usize, head_dim: usize) -> HeadLayout {
        HeadLayout {
            batch_stride: seq * heads * head_dim,
            seq_stride: head_dim,
            head_stride: seq * head_dim,
        }
    }

    /// Offset of element `(b, s, h, 0)`. Only meaningful after [`HeadLayout::extent`]
    /// succeeded for dimensions that contain `(b, s, h)`.
    #[inline]
    pub fn offset(&self, b: usize, s: usize, h: usize) -> usize {
        b * self.batch_stride + s * self.seq_stride + h * self.head_stride
    }

    /// Elements an operand of this shape spans (0 when any dimension is 0), with checked
    /// arithmetic.
    pub fn extent(&self, batch: usize, seq: usize, heads: usize, head_dim: usize) -> Result<usize> {
        if batch == 0 || seq == 0 || heads == 0 || head_dim == 0 {
            return Ok(0);
        }
        let term = |n: usize, stride: usize| (n - 1).checked_mul(stride);
        term(batch, self.batch_stride)
            .and_then(|x| x.checked_add(term(seq, self.seq_stride)?))
            .and_then(|x| x.checked_add(term(heads, self.head_stride)?))
            .and_then(|x| x.checked_add(head_dim))
            .ok_or_else(|| Error::Overflow {
                what: format!(
                    "extent of a [{batch}, {seq}, {heads}, {head_dim}] operand with {self:?}"
                ),
            })
    }

    /// Whether distinct `(b, s, h, c)` map to distinct offsets, so that an output in this
    /// layout can be written by several threads without two of them touching one element.
    pub fn is_disjoint(&self, batch: usize, seq: usize, heads: usize, head_dim: usize) -> bool {
        if batch == 0 || seq == 0 || heads == 0 || head_dim == 0 {
            return true;
        }
        let mut dims = [
            (self.batch_stride, batch),
            (self.seq_stride, seq),
            (self.head_stride, heads),
        ];
        dims.sort_unstable();
        // Sorted by stride, each dimension must step over everything inside it.
        let mut span = head_dim as u128;
        for (stride, n) in dims {
            if n <= 1 {
                continue;
            }
            if (stride as u128) < span {
                return false;
            }
            span += stride as u128 * (n as u128 - 1);
        }
        true
    }
}

/// A read-only `[batch, seq, heads, head_dim]` operand.
#[derive(Debug, Clone, Copy)]
pub struct Heads<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// Where each `(b, s, h)` row starts.
    pub layout: HeadLayout,
}

impl<'a, T> Heads<'a, T> {
    /// An operand over `data` with `layout`.
    pub fn new(data: &'a [T], layout: HeadLayout) -> Self {
        Heads { data, layout }
    }
}

/// A writable `[batch, seq, heads, head_dim]` operand.
#[derive(Debug)]
pub struct HeadsMut<'a, T> {
    /// The elements.
    pub data: &'a mut [T],
    /// Where each `(b, s, h)` row starts.
    pub layout: HeadLayout,
}

impl<'a, T> HeadsMut<'a, T> {
    /// An operand over `data` with `layout`.
    pub fn new(data: &'a mut [T], layout: HeadLayout) -> Self {
        HeadsMut { data, layout }
    }
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query rows per sequence.
    pub q_len: usize,
    /// Key/value rows per sequence (may differ from `q_len`: cross-attention, caches).
    pub kv_len: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; must divide `n_heads`.
    pub n_kv_heads: usize,
    /// Elements per head (1 to [`MAX_HEAD_DIM`]).
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads.max(1)
    }
}

/// Which keys each sequence of the batch may attend to.
#[derive(Debug, Clone, Copy, Default)]
pub enum KeyPadding<'a> {
    /// Every key.
    #[default]
    None,
    /// `lengths[b]` keys of sequence `b` (keys `j >= lengths[b]` are padding); one length per
    /// batch entry, each at most `kv_len`.
    Lengths(&'a [usize]),
    /// `mask[b * kv_len + j]` says whether sequence `b` attends key `j` (Hugging Face's
    /// `attention_mask`); `batch · kv_len` entries.
    Mask(&'a [bool]),
}

/// T5's bucketed relative-position bias: `bias[h, i, j] = table[bucket(j − (q_offset + i)) ·
/// n_heads + h]`, computed on the fly so that long sequences never materialize it.
#[derive(Debug, Clone, Copy)]
pub struct RelativeBias<'a> {
    /// `[num_buckets, n_heads]` row-major (Hugging Face's `relative_attention_bias.weight`).
    pub table: &'a [f32],
    /// Buckets (`relative_attention_num_buckets`, 32 in T5).
    pub num_buckets: usize,
    /// Distance beyond which all positions share the last bucket (128 in T5).
    pub max_distance: usize,
    /// Encoder (`true`: keys on both sides get separate buckets) or decoder.
    pub bidirectional: bool,
}

impl RelativeBias<'_> {
    /// The bucket of `relative_position = key_position − query_position`, as T5 computes it
    /// (`T5Attention._relative_position_bucket`, including its f32 logarithm).
    pub fn bucket(&self, relative_position: i64) -> usize {
        relative_position_bucket(
            relative_position,
            self.bidirectional,
            self.num_buckets,
            self.max_distance,
        )
    }
}

/// T5's relative-position bucket (`T5Attention._relative_position_bucket`), computed in f32
/// as PyTorch does. Requires `max_distance > max_exact` (checked by [`check_attention`]).
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = num_buckets;
    let mut base = 0usize;
    let rp: u64 = if bidirectional {
        buckets /= 2;
        if relative_position > 0 {
            base = buckets;
        }
        relative_position.unsigned_abs()
    } else {
        // −min(rp, 0): only keys before the query get distinct buckets.
        if relative_position < 0 {
            relative_position.unsigned_abs()
        } else {
            0
        }
    };
    let max_exact = (buckets / 2) as u64;
    if rp < max_exact {
        return base + rp as usize;
    }
    let log_ratio = ((rp as f32) / (max_exact as f32)).ln();
    let denom = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large = max_exact as f32 + log_ratio / denom * (buckets as f32 - max_exact as f32);
    // `.to(torch.long)` truncates toward zero; the value is non-negative here.
    let large = (large as u64).min(buckets as u64 - 1);
    base + large as usize
}

/// An additive bias on the scores.
#[derive(Debug, Clone, Copy, Default)]
pub enum Bias<'a> {
    /// No bias.
    #[default]
    None,
    /// A materialized bias: element `(b, h, i, j)` at
    /// `b·batch_stride + h·head_stride + i·q_stride + j` (key index contiguous). A zero stride
    /// broadcasts over that dimension (e.g. one `[heads, q, k]` bias for the whole batch).
    Dense {
        /// The elements.
        data: &'a [f32],
        /// Elements between batch entries (0 to broadcast).
        batch_stride: usize,
        /// Elements between heads (0 to broadcast).
        head_stride: usize,
        /// Elements between query rows (0 to broadcast).
        q_stride: usize,
    },
    /// A bucketed relative-position table (T5).
    Relative(RelativeBias<'a>),
}

/// Everything about an attention call besides its operands.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams<'a> {
    /// Multiplies `q · k` (BERT and GPT-2: `1/√head_dim`; T5: 1).
    pub scale: f32,
    /// Whether query row `i` only sees keys `j <= q_offset + i`.
    pub causal: bool,
    /// Position of query row 0 in the key sequence (for the causal mask and the relative
    /// bias): 0 for a whole sequence, the number of cached tokens for a chunk that extends
    /// a cache.
    pub q_offset: usize,
    /// Per-sequence key padding.
    pub padding: KeyPadding<'a>,
    /// Additive score bias.
    pub bias: Bias<'a>,
}

impl AttentionParams<'_> {
    /// Bidirectional attention with scale `1/√head_dim`, no mask and no bias.
    pub fn new(head_dim: usize) -> Self {
        AttentionParams {
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            causal: false,
            q_offset: 0,
            padding: KeyPadding::None,
            bias: Bias::None,
        }
    }
}

impl<'a> AttentionParams<'a> {
    /// With the causal mask, query row 0 at key position `q_offset`.
    pub fn causal(mut self, q_offset: usize) -> Self {
        self.causal = true;
        self.q_offset = q_offset;
        self
    }

    /// With this score scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// With this key padding.
    pub fn with_padding(mut self, padding: KeyPadding<'a>) -> Self {
        self.padding = padding;
        self
    }

    /// With this bias.
    pub fn with_bias(mut self, bias: Bias<'a>) -> Self {
        self.bias = bias;
        self
    }

    /// Whether sequence `b` attends key `j` by its padding (not the causal mask). `b` and `j`
    /// must be in range of validated parameters.
    #[inline]
    pub fn key_allowed(&self, kv_len: usize, b: usize, j: usize) -> bool {
        match self.padding {
            KeyPadding::None => true,
            KeyPadding::Lengths(l) => j < l[b],
            KeyPadding::Mask(m) => m[b * kv_len + j],
        }
    }
}

fn check_operand(
    name: &'static str,
    len: usize,
    layout: &HeadLayout,
    dims: (usize, usize, usize, usize),
) -> Result<()> {
    let (batch, seq, heads, d) = dims;
    let needed = layout.extent(batch, seq, heads, d)?;
    if len < needed {
        return Err(Error::InvalidArgument(format!(
            "{name}: slice holds {len} elements but a [{batch}, {seq}, {heads}, {d}] operand with {layout:?} needs {needed}"
        )));
    }
    Ok(())
}

/// Validates an attention call: head counts, every operand's extent, the output's
/// disjointness, the padding and the bias. Every fast kernel and the reference call this
/// before touching memory.
pub fn check_attention(
    shape: &AttentionShape,
    q: (usize, &HeadLayout),
    k: (usize, &HeadLayout),
    v: (usize, &HeadLayout),
    o: (usize, &HeadLayout),
    params: &AttentionParams<'_>,
) -> Result<()> {
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        n_heads,
        n_kv_heads,
        head_dim,
    } = *shape;
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(Error::InvalidArgument(format!(
            "n_kv_heads ({n_kv_heads}) must be positive and divide n_heads ({n_heads})"
        )));
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(Error::InvalidArgument(format!(
            "head_dim {head_dim} is outside 1..={MAX_HEAD_DIM}"
        )));
    }
    check_operand("Q", q.0, q.1, (batch, q_len, n_heads, head_dim))?;
    check_operand("K", k.0, k.1, (batch, kv_len, n_kv_heads, head_dim))?;
    check_operand("V", v.0, v.1, (batch, kv_len, n_kv_heads, head_dim))?;
    check_operand("O", o.0, o.1, (batch, q_len, n_heads, head_dim))?;
    if !o.1.is_disjoint(batch, q_len, n_heads, head_dim) {
        return Err(Error::InvalidArgument(format!(
            "O: layout {:?} maps two elements of a [{batch}, {q_len}, {n_heads}, {head_dim}] output to one place",
            o.1
        )));
    }
    if params.q_offset.checked_add(q_len).is_none() {
        return Err(Error::Overflow {
            what: format!("q_offset {} + q_len {q_len}", params.q_offset),
        });
    }
    match params.padding {
        KeyPadding::None => {}
        KeyPadding::Lengths(l) => {
            if l.len() != batch {
                return Err(Error::LengthMismatch {
                    name: "padding lengths",
                    expected: batch,
                    actual: l.len(),
                });
            }
            if let Some((b, &len)) = l.iter().enumerate().find(|(_, len)| **len > kv_len) {
                return Err(Error::InvalidArgument(format!(
                    "padding length {len} of sequence {b} exceeds kv_len {kv_len}"
                )));
            }
        }
        KeyPadding::Mask(m) => {
            let expected = batch.checked_mul(kv_len).ok_or_else(|| Error::Overflow {
                what: format!("padding mask {batch} x {kv_len}"),
            })?;
            if m.len() != expected {
                return Err(Error::LengthMismatch {
                    name: "padding mask",
                    expected,
                    actual: m.len(),
                });
            }
        }
    }
    match params.bias {
        Bias::None => {}
        Bias::Dense {
            data,
            batch_stride,
            head_stride,
            q_stride,
        } => {
            if batch > 0 && q_len > 0 && n_heads > 0 && kv_len > 0 {
                let term = |n: usize, s: usize| (n - 1).checked_mul(s);
                let needed = term(batch, batch_stride)
                    .and_then(|x| x.checked_add(term(n_heads, head_stride)?))
                    .and_then(|x| x.checked_add(term(q_len, q_stride)?))
                    .and_then(|x| x.checked_add(kv_len))
                    .ok_or_else(|| Error::Overflow {
                        what: "extent of the dense bias".into(),
                    })?;
                if data.len() < needed {
                    return Err(Error::InvalidArgument(format!(
                        "bias: slice holds {} elements but a [{batch}, {n_heads}, {q_len}, {kv_len}] bias with strides ({batch_stride}, {head_stride}, {q_stride}, 1) needs {needed}",
                        data.len()
                    )));
                }
            }
        }
        Bias::Relative(r) => {
            let expected = r
                .num_buckets
                .checked_mul(n_heads)
                .ok_or_else(|| Error::Overflow {
                    what: "relative bias table".into(),
                })?;
            if r.table.len() != expected {
                return Err(Error::LengthMismatch {
                    name: "relative bias table ([num_buckets, n_heads])",
                    expected,
                    actual: r.table.len(),
                });
            }
            let buckets = if r.bidirectional {
                r.num_buckets / 2
            } else {
                r.num_buckets
            };
            let max_exact = buckets / 2;
            if max_exact == 0 || r.max_distance <= max_exact {
                return Err(Error::InvalidArgument(format!(
                    "relative bias: need num_buckets >= {} and max_distance > {max_exact}, got {} and {}",
                    if r.bidirectional { 4 } else { 2 },
                    r.num_buckets,
                    r.max_distance
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t5_buckets_match_transformers() {
        // Values of `T5Attention._relative_position_bucket` (transformers 4.x) for
        // num_buckets = 32, max_distance = 128.
        let bi = |rp| relative_position_bucket(rp, true, 32, 128);
        let uni = |rp| relative_position_bucket(rp, false, 32, 128);
        // Bidirectional: 16 buckets per side, 8 exact.
        assert_eq!(bi(0), 0);
        assert_eq!(bi(-1), 1);
        assert_eq!(bi(1), 17);
        assert_eq!(bi(-7), 7);
        assert_eq!(bi(-8), 8);
        assert_eq!(bi(7), 23);
        // 8 + log(rp/8)/log(16)*8: rp = 16 -> 8 + 2 = 10; rp = 127 -> 8 + 7.97 -> 15.
        assert_eq!(bi(-16), 10);
        assert_eq!(bi(-127), 15);
        assert_eq!(bi(-1000), 15);
        assert_eq!(bi(1000), 31);
        // Unidirectional: keys after the query share bucket 0; 32 buckets, 16 exact.
        assert_eq!(uni(5), 0);
        assert_eq!(uni(-5), 5);
        assert_eq!(uni(-15), 15);
        // 16 + log(rp/16)/log(8)*16: rp = 32 -> 16 + 5.33 -> 21.
        assert_eq!(uni(-32), 21);
        assert_eq!(uni(-5000), 31);
    }

    #[test]
    fn layouts_report_overlap() {
        let l = HeadLayout::bshd(5, 3, 4);
        assert!(l.is_disjoint(2, 5, 3, 4));
        assert_eq!(l.extent(2, 5, 3, 4).unwrap(), 2 * 5 * 3 * 4);
        let overlapping = HeadLayout {
            batch_stride: 60,
            seq_stride: 12,
            head_stride: 3,
        };
        assert!(!overlapping.is_disjoint(2, 5, 3, 4));
        // A single head may use any head stride.
        assert!(overlapping.is_disjoint(2, 5, 1, 4));
        assert!(
            HeadLayout {
                batch_stride: usize::MAX,
                seq_stride: 1,
                head_stride: 1
            }
            .extent(3, 1, 1, 1)
            .is_err()
        );
    }

    #[test]
    fn validation_refuses_bad_shapes() {
        let shape = AttentionShape {
            batch: 1,
            q_len: 2,
            kv_len: 3,
            n_heads: 4,
            n_kv_heads: 3,
            head_dim: 8,
        };
        let ql = HeadLayout::bshd(2, 4, 8);
        let kl = HeadLayout::bshd(3, 3, 8);
        let p = AttentionParams::new(8);
        let r = check_attention(&shape, (64, &ql), (72, &kl), (72, &kl), (64, &ql), &p);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let shape = AttentionShape {
            n_kv_heads: 2,
            ..shape
        };
        let kl = HeadLayout::bshd(3, 2, 8);
        assert!(check_attention(&shape, (64, &ql), (48, &kl), (48, &kl), (64, &ql), &p).is_ok());
        assert!(check_attention(&shape, (63, &ql), (48, &kl), (48, &kl), (64, &ql), &p).is_err());
        let lens = [4usize];
        let p2 = p.with_padding(KeyPadding::Lengths(&lens));
        assert!(check_attention(&shape, (64, &ql), (48, &kl), (48, &kl), (64, &ql), &p2).is_err());
        let mask = [true; 2];
        let p3 = p.with_padding(KeyPadding::Mask(&mask));
        assert!(check_attention(&shape, (64, &ql), (48, &kl), (48, &kl), (64, &ql), &p3).is_err());
        let bias = [0.0f32; 23];
        let p4 = p.with_bias(Bias::Dense {
            data: &bias,
            batch_stride: 0,
            head_stride: 6,
            q_stride: 3,
        });
        assert!(check_attention(&shape, (64, &ql), (48, &kl), (48, &kl), (64, &ql), &p4).is_err());
    }
}
