//! Shape, stride and length validation with checked arithmetic.
//!
//! Every public kernel calls these before it reads or writes anything, so a wrong length,
//! a leading dimension smaller than the row, or a product that overflows `usize` is an
//! [`Error`], never an out-of-bounds access.

use crate::{Error, Result};

/// `a * b`, or [`Error::Overflow`] naming the product.
pub fn checked_mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::Overflow {
        what: format!("{what}: {a} x {b}"),
    })
}

/// Number of elements a row-major `rows x cols` matrix with leading dimension `ld` spans:
/// `(rows - 1) * ld + cols`, or 0 when the matrix is empty.
///
/// Errors when `ld < cols` or the extent overflows `usize`.
pub fn matrix_extent(name: &'static str, rows: usize, cols: usize, ld: usize) -> Result<usize> {
    if ld < cols {
        return Err(Error::LeadingDimension { name, ld, cols });
    }
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(ld)
        .and_then(|x| x.checked_add(cols))
        .ok_or_else(|| Error::Overflow {
            what: format!("{name}: ({rows} - 1) x {ld} + {cols}"),
        })
}

/// Checks that a slice of `len` elements holds a row-major `rows x cols` matrix with leading
/// dimension `ld`; returns the extent it spans.
pub fn check_matrix(
    name: &'static str,
    rows: usize,
    cols: usize,
    ld: usize,
    len: usize,
) -> Result<usize> {
    let needed = matrix_extent(name, rows, cols, ld)?;
    if len < needed {
        return Err(Error::SliceTooShort {
            name,
            rows,
            cols,
            ld,
            needed,
            actual: len,
        });
    }
    Ok(needed)
}

/// Checks that a vector operand has exactly `expected` elements.
pub fn check_len(name: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(Error::LengthMismatch {
            name,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Checks that two dimensions that must agree do.
pub fn check_dim(what: &str, left: usize, right: usize) -> Result<()> {
    if left != right {
        return Err(Error::ShapeMismatch {
            what: format!("{what}: {left} != {right}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_of_empty_and_full_matrices() {
        assert_eq!(matrix_extent("A", 0, 5, 5), Ok(0));
        assert_eq!(matrix_extent("A", 3, 0, 0), Ok(0));
        assert_eq!(matrix_extent("A", 3, 4, 4), Ok(12));
        assert_eq!(matrix_extent("A", 3, 4, 10), Ok(24));
    }

    #[test]
    fn leading_dimension_below_row_is_refused_even_when_empty() {
        assert!(matches!(
            matrix_extent("A", 0, 5, 4),
            Err(Error::LeadingDimension { ld: 4, cols: 5, .. })
        ));
    }

    #[test]
    fn overflow_is_refused() {
        assert!(matches!(
            matrix_extent("A", usize::MAX, 2, 2),
            Err(Error::Overflow { .. })
        ));
        assert!(matches!(
            checked_mul(usize::MAX, 3, "m*k"),
            Err(Error::Overflow { .. })
        ));
    }

    #[test]
    fn short_slice_is_refused() {
        assert!(matches!(
            check_matrix("B", 2, 3, 5, 7),
            Err(Error::SliceTooShort {
                needed: 8,
                actual: 7,
                ..
            })
        ));
        assert_eq!(check_matrix("B", 2, 3, 5, 8), Ok(8));
    }
}

/// Dimensions of a validated GEMM `C[m,n] = α·A[m,k]·op(B) + β·C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDims {
    /// Rows of `A` and `C`.
    pub m: usize,
    /// Columns of `C` and of `op(B)`.
    pub n: usize,
    /// The reduction length: columns of `A`, rows of `op(B)`.
    pub k: usize,
}

/// Validates the operands of `C = α·A·op(B) + β·C`: `A` is `m x k`, `B` is `k x n`
/// (`Transpose::No`) or `n x k` (`Transpose::Yes`), `C` is `m x n`; every slice long enough
/// for its shape and leading dimension; no size overflows.
pub fn check_gemm<A, B, C>(
    a: &crate::MatRef<'_, A>,
    b: &crate::MatRef<'_, B>,
    trans_b: crate::Transpose,
    c: &crate::MatRef<'_, C>,
) -> Result<GemmDims> {
    check_matrix("A", a.rows, a.cols, a.ld, a.data.len())?;
    check_matrix("B", b.rows, b.cols, b.ld, b.data.len())?;
    check_matrix("C", c.rows, c.cols, c.ld, c.data.len())?;
    let (m, k) = (a.rows, a.cols);
    let (bk, n) = match trans_b {
        crate::Transpose::No => (b.rows, b.cols),
        crate::Transpose::Yes => (b.cols, b.rows),
    };
    check_dim("columns of A vs the reduction length of op(B)", k, bk)?;
    check_dim("rows of C vs rows of A", c.rows, m)?;
    check_dim("columns of C vs columns of op(B)", c.cols, n)?;
    // The flop count 2·m·n·k must be representable (benches and schedulers compute it).
    checked_mul(m, n, "m*n").and_then(|mn| checked_mul(mn, k, "m*n*k"))?;
    Ok(GemmDims { m, n, k })
}
