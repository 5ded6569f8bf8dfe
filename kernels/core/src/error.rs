use thiserror::Error;

/// Result alias used by every public Tessera kernel.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a kernel refused its input. Every public kernel validates lengths, strides and
/// shapes before touching memory and reports the first problem it finds.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A slice is shorter than its shape and leading dimension need.
    #[error(
        "{name}: slice holds {actual} elements but a {rows}x{cols} matrix with leading dimension {ld} needs {needed}"
    )]
    SliceTooShort {
        /// The operand, e.g. `"A"`.
        name: &'static str,
        /// Rows of the operand as stored.
        rows: usize,
        /// Columns of the operand as stored.
        cols: usize,
        /// Its leading dimension (elements between consecutive rows).
        ld: usize,
        /// Elements needed.
        needed: usize,
        /// Elements given.
        actual: usize,
    },
    /// A slice has the wrong length for a vector operand.
    #[error("{name}: expected {expected} elements, got {actual}")]
    LengthMismatch {
        /// The operand.
        name: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A leading dimension is smaller than the row it must hold.
    #[error("{name}: leading dimension {ld} is smaller than the row length {cols}")]
    LeadingDimension {
        /// The operand.
        name: &'static str,
        /// The leading dimension given.
        ld: usize,
        /// The row length it must cover.
        cols: usize,
    },
    /// Two operands disagree on a dimension.
    #[error("shape mismatch: {what}")]
    ShapeMismatch {
        /// Which dimensions disagree and how.
        what: String,
    },
    /// A size computation (e.g. rows × leading dimension) overflows `usize`.
    #[error("size overflow: {what}")]
    Overflow {
        /// The product that overflowed.
        what: String,
    },
    /// An instruction set was requested that this CPU (or this build) does not provide.
    #[error("instruction set {isa} is not available on this CPU")]
    IsaUnavailable {
        /// The requested instruction set.
        isa: &'static str,
    },
    /// Any other invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}
