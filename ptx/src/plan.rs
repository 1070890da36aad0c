//! The slice planner: the launches (block offset, sub-grid) that cover a grid exactly once, in
//! row-major order, each at most a given number of blocks, and that number from a target slice
//! duration and the measured cost of a block.
//!
//! Slices are boxes, not ranges of a linear block index: whole z-planes, else whole rows of one
//! plane, else a run of blocks within one row. A box needs only `ctaid + offset` in the kernel
//! (no division), and because a run may be any length down to one block within a row, boxes are as
//! fine as a linear split where it matters (a slice smaller than a row); they are coarser only in
//! that a slice never spans two rows or planes, so a plane or row count that does not divide evenly
//! leaves one shorter slice per row or plane.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub const fn new(x: u32, y: u32, z: u32) -> Dim3 {
        Dim3 { x, y, z }
    }

    pub fn volume(self) -> u64 {
        self.x as u64 * self.y as u64 * self.z as u64
    }
}

/// One launch of a sliced kernel: blocks `offset .. offset + grid` of the original grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub offset: Dim3,
    pub grid: Dim3,
}

impl Slice {
    /// The bytes of the slice parameter for this launch of a grid `original`: offset x, y, z, then the
    /// original grid x, y, z, each a little-endian `u32` (the layout the rewrite's prologue reads).
    pub fn param_bytes(&self, original: Dim3) -> [u8; 24] {
        let words = [self.offset.x, self.offset.y, self.offset.z, original.x, original.y, original.z];
        let mut out = [0u8; 24];
        for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// Blocks per slice so that a slice lasts about `target_ns`, given the measured device time of one
/// block (`block_cost_ns`: a launch's time over its block count) and the fewest blocks worth a launch
/// (`min_blocks`, e.g. the blocks the device runs at once: below one wave a slice gets no shorter).
pub fn blocks_per_slice(target_ns: u64, block_cost_ns: u64, min_blocks: u64) -> u64 {
    (target_ns / block_cost_ns.max(1)).max(min_blocks).max(1)
}

/// The launches that cover `grid` exactly once, in row-major order (x fastest), each of at most
/// `max_blocks` blocks (at least one). An empty grid gives no launch.
pub fn plan_slices(grid: Dim3, max_blocks: u64) -> Vec<Slice> {
    let n = max_blocks.max(1);
    let plane = grid.x as u64 * grid.y as u64;
    let mut out = Vec::new();
    if grid.volume() == 0 {
        return out;
    }
    if n >= plane {
        let k = (n / plane).min(grid.z as u64) as u32;
        for z in (0..grid.z).step_by(k as usize) {
            out.push(Slice { offset: Dim3::new(0, 0, z), grid: Dim3::new(grid.x, grid.y, k.min(grid.z - z)) });
        }
    } else if n >= grid.x as u64 {
        let k = (n / grid.x as u64) as u32;
        for z in 0..grid.z {
            for y in (0..grid.y).step_by(k as usize) {
                out.push(Slice { offset: Dim3::new(0, y, z), grid: Dim3::new(grid.x, k.min(grid.y - y), 1) });
            }
        }
    } else {
        let k = n as u32;
        for z in 0..grid.z {
            for y in 0..grid.y {
                for x in (0..grid.x).step_by(k as usize) {
                    out.push(Slice { offset: Dim3::new(x, y, z), grid: Dim3::new(k.min(grid.x - x), 1, 1) });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How many times each block of `grid` is covered, row-major.
    fn coverage(grid: Dim3, slices: &[Slice]) -> Vec<u32> {
        let mut seen = vec![0u32; grid.volume() as usize];
        for s in slices {
            for z in s.offset.z..s.offset.z + s.grid.z {
                for y in s.offset.y..s.offset.y + s.grid.y {
                    for x in s.offset.x..s.offset.x + s.grid.x {
                        assert!(x < grid.x && y < grid.y && z < grid.z, "slice {s:?} leaves grid {grid:?}");
                        seen[((z as u64 * grid.y as u64 + y as u64) * grid.x as u64 + x as u64) as usize] += 1;
                    }
                }
            }
        }
        seen
    }

    /// Linear index of a slice's first block.
    fn first_block(grid: Dim3, s: &Slice) -> u64 {
        (s.offset.z as u64 * grid.y as u64 + s.offset.y as u64) * grid.x as u64 + s.offset.x as u64
    }

    proptest! {
        #[test]
        fn every_block_once_in_row_major_order(x in 1u32..40, y in 1u32..12, z in 1u32..6, n in 0u64..3000) {
            let grid = Dim3::new(x, y, z);
            let slices = plan_slices(grid, n);
            prop_assert!(coverage(grid, &slices).iter().all(|&c| c == 1));
            for s in &slices {
                prop_assert!(s.grid.volume() >= 1 && s.grid.volume() <= n.max(1));
            }
            // Row-major: each slice starts where the previous one ended.
            let mut next = 0;
            for s in &slices {
                prop_assert_eq!(first_block(grid, s), next);
                next += s.grid.volume();
            }
        }

        #[test]
        fn no_more_launches_than_needed_per_row(x in 1u32..64, n in 1u64..64) {
            // Within one row the split is as fine as a linear one: ceil(x / n) launches.
            let slices = plan_slices(Dim3::new(x, 1, 1), n);
            prop_assert_eq!(slices.len() as u64, (x as u64).div_ceil(n));
        }
    }

    #[test]
    fn shapes_of_the_three_cases() {
        let g = Dim3::new(4, 3, 2);
        assert_eq!(plan_slices(g, 100), vec![Slice { offset: Dim3::new(0, 0, 0), grid: g }]);
        assert_eq!(plan_slices(g, 12).len(), 2);
        assert_eq!(plan_slices(g, 8)[1], Slice { offset: Dim3::new(0, 2, 0), grid: Dim3::new(4, 1, 1) });
        assert_eq!(plan_slices(g, 3)[1], Slice { offset: Dim3::new(3, 0, 0), grid: Dim3::new(1, 1, 1) });
        assert!(plan_slices(Dim3::new(0, 1, 1), 5).is_empty());
    }

    #[test]
    fn slice_size_from_duration() {
        assert_eq!(blocks_per_slice(100_000, 2_000, 1), 50);
        assert_eq!(blocks_per_slice(100_000, 0, 1), 100_000);
        assert_eq!(blocks_per_slice(100, 2_000, 132), 132);
        assert_eq!(blocks_per_slice(100, 2_000, 0), 1);
        let bytes = Slice { offset: Dim3::new(1, 2, 3), grid: Dim3::new(1, 1, 1) }.param_bytes(Dim3::new(4, 5, 256));
        assert_eq!(bytes[..4], [1, 0, 0, 0]);
        assert_eq!(bytes[20..], [0, 1, 0, 0]);
    }
}
