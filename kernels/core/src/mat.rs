/// A read-only row-major matrix view: a plain slice plus an explicit shape.
///
/// Element `(r, c)` lives at `data[r * ld + c]`. Constructing a view checks nothing; the
/// kernel that receives it validates the shape against the slice (and names the operand in
/// its error), so a view can never cause an out-of-bounds read.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    /// The storage.
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Leading dimension: elements between the starts of consecutive rows (≥ `cols`).
    pub ld: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A view of `data` as `rows x cols` with leading dimension `ld`.
    pub fn new(data: &'a [T], rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            ld,
        }
    }

    /// A densely packed view (`ld == cols`).
    pub fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }
}

/// A mutable row-major matrix view; see [`MatRef`].
#[derive(Debug)]
pub struct MatMut<'a, T> {
    /// The storage.
    pub data: &'a mut [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Leading dimension (≥ `cols`).
    pub ld: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A view of `data` as `rows x cols` with leading dimension `ld`.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            ld,
        }
    }

    /// A densely packed view (`ld == cols`).
    pub fn dense(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols)
    }

    /// Reborrows as a shorter-lived mutable view.
    pub fn rb_mut(&mut self) -> MatMut<'_, T> {
        MatMut::new(self.data, self.rows, self.cols, self.ld)
    }

    /// A read-only view of the same matrix.
    pub fn as_ref(&self) -> MatRef<'_, T> {
        MatRef::new(self.data, self.rows, self.cols, self.ld)
    }
}

/// How the `B` operand of a GEMM is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transpose {
    /// `B` is stored as `[k, n]`: `op(B) = B`.
    No,
    /// `B` is stored as `[n, k]` (the layout of a Hugging Face `Linear` weight): `op(B) = Bᵀ`.
    Yes,
}
