//! NEON variant (placeholder: the scalar kernels until the SIMD ones land).
use super::Table;

/// The table for this CPU.
pub(super) fn table() -> &'static Table {
    &super::scalar::TABLE
}
