//! Shape, strides and offset of a tensor view over its storage. Strides are in elements and may be
//! zero (broadcast dimensions); views never copy.

use crate::error::{shape_err, Result};

/// Most dimensions a tensor may have (the kernels' strided descriptors hold this many).
pub const MAX_DIMS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Row-major strides of a contiguous tensor of this shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The shape two shapes broadcast to, NumPy rules.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return shape_err!("shapes {a:?} and {b:?} cannot be broadcast together"),
        };
    }
    Ok(out)
}

/// Resolves a possibly negative dimension index against a rank.
pub fn resolve_dim(dim: isize, rank: usize, what: &str) -> Result<usize> {
    let d = if dim < 0 { dim + rank as isize } else { dim };
    if d < 0 || d as usize >= rank {
        return shape_err!("{what}: dimension {dim} is out of range for a tensor of rank {rank}");
    }
    Ok(d as usize)
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Result<Self> {
        if shape.len() > MAX_DIMS {
            return shape_err!(
                "shape {shape:?} has {} dimensions; at most {MAX_DIMS} are supported",
                shape.len()
            );
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements are stored densely in row-major order (offset may be non-zero).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// One past the largest storage index this view touches (0 for an empty view).
    pub fn storage_extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Storage index of every element, in row-major order of the view.
    pub fn storage_indices(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.numel();
        let mut index = vec![0usize; self.rank()];
        let mut pos = self.offset;
        (0..n).map(move |i| {
            if i > 0 {
                for d in (0..index.len()).rev() {
                    index[d] += 1;
                    pos += self.strides[d];
                    if index[d] < self.shape[d] {
                        break;
                    }
                    pos -= self.strides[d] * self.shape[d];
                    index[d] = 0;
                }
            }
            pos
        })
    }

    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return shape_err!(
                "cannot reshape {:?} ({} elements) to {shape:?} ({n} elements)",
                self.shape,
                self.numel()
            );
        }
        if !self.is_contiguous() {
            return shape_err!("cannot reshape the non-contiguous view {:?} (strides {:?}); call contiguous() first", self.shape, self.strides);
        }
        let mut l = Layout::contiguous(shape)?;
        l.offset = self.offset;
        Ok(l)
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Self> {
        let mut seen = vec![false; self.rank()];
        if dims.len() != self.rank()
            || dims
                .iter()
                .any(|&d| d >= self.rank() || std::mem::replace(&mut seen[d], true))
        {
            return shape_err!(
                "permute {dims:?} is not a permutation of the {} dimensions of {:?}",
                self.rank(),
                self.shape
            );
        }
        Ok(Layout {
            shape: dims.iter().map(|&d| self.shape[d]).collect(),
            strides: dims.iter().map(|&d| self.strides[d]).collect(),
            offset: self.offset,
        })
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Self> {
        if a >= self.rank() || b >= self.rank() {
            return shape_err!(
                "transpose({a}, {b}) is out of range for shape {:?}",
                self.shape
            );
        }
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        dims.swap(a, b);
        self.permute(&dims)
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return shape_err!(
                "narrow(dim {dim}, start {start}, len {len}) is out of range for shape {:?}",
                self.shape
            );
        }
        let mut l = self.clone();
        l.offset += start * self.strides[dim];
        l.shape[dim] = len;
        Ok(l)
    }

    /// A view with `shape` that repeats this one along new leading and size-1 dimensions.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Self> {
        if shape.len() < self.rank() || shape.len() > MAX_DIMS {
            return shape_err!("cannot broadcast {:?} to {shape:?}", self.shape);
        }
        let lead = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for (i, &target) in shape.iter().enumerate().skip(lead) {
            let (d, s) = (self.shape[i - lead], self.strides[i - lead]);
            strides[i] = match d {
                _ if d == target => s,
                1 => 0,
                _ => return shape_err!("cannot broadcast {:?} to {shape:?}", self.shape),
            };
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset,
        })
    }
}

/// `shape` and the strides of each operand over it, with size-1 dimensions dropped and neighbours
/// merged wherever every operand steps through them as one dimension. Iteration over the result
/// visits the same storage offsets in the same order; strided kernels then do fewer divisions.
pub fn coalesce<const N: usize>(
    shape: &[usize],
    strides: [&[usize]; N],
) -> (Vec<usize>, [Vec<usize>; N]) {
    let mut out_shape: Vec<usize> = Vec::with_capacity(shape.len());
    let mut out_strides: [Vec<usize>; N] = std::array::from_fn(|_| Vec::with_capacity(shape.len()));
    for (d, &n) in shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let mergeable = !out_shape.is_empty()
            && strides
                .iter()
                .zip(&out_strides)
                .all(|(s, o)| *o.last().unwrap() == s[d] * n);
        if mergeable {
            *out_shape.last_mut().unwrap() *= n;
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                *o.last_mut().unwrap() = s[d];
            }
        } else {
            out_shape.push(n);
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o.push(s[d]);
            }
        }
    }
    (out_shape, out_strides)
}

#[cfg(test)]
mod tests {
    use super::coalesce;

    #[test]
    fn coalesce_merges_only_compatible_dimensions() {
        // dense [2,3,4] collapses to one dimension
        assert_eq!(coalesce(&[2, 3, 4], [&[12, 4, 1]]), (vec![24], [vec![1]]));
        // a bias over rows: [5,7] with strides (7,1) and (0,1) stays two-dimensional
        assert_eq!(
            coalesce(&[5, 7], [&[7, 1], &[0, 1]]),
            (vec![5, 7], [vec![7, 1], vec![0, 1]])
        );
        // broadcast over two leading dims merges them (both stride 0 for the bias)
        assert_eq!(
            coalesce(&[2, 3, 4], [&[12, 4, 1], &[0, 0, 1]]),
            (vec![6, 4], [vec![4, 1], vec![0, 1]])
        );
        // a transpose does not merge; size-1 dims vanish; all-ones gives rank 0
        assert_eq!(
            coalesce(&[3, 1, 2], [&[1, 9, 3]]),
            (vec![3, 2], [vec![1, 3]])
        );
        assert_eq!(coalesce(&[1, 1], [&[5, 1]]), (vec![], [vec![]]));
    }
}
