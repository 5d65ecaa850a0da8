//! CosPlace's classes and groups (datasets/train_dataset.py): an image's class is its UTM cell
//! of `m` metres and its heading sector of `alpha` degrees; classes `n` cells or `l` sectors
//! apart share a group, so there are `n * n * l` groups (50 with the defaults, of which the
//! original trains the first 8 in first-appearance order).

use super::python::floor_div;
use super::{group_images, load_or_build_table, GroupTable};
use crate::error::{Error, Result};
use crate::eval::dataset::{list_folder, parse_heading, parse_utm};
use std::path::{Path, PathBuf};

/// The grouping settings, with the paper's values as `Default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CosPlaceGrouping {
    /// Side of a class cell in metres (10).
    pub m: u32,
    /// Width of a heading sector in degrees (30).
    pub alpha: u32,
    /// Cells between two classes of a group along east and north (5).
    pub n: u32,
    /// Sectors between two classes of a group (2).
    pub l: u32,
    /// Classes with fewer images are dropped (10).
    pub min_images_per_class: usize,
}

impl Default for CosPlaceGrouping {
    fn default() -> CosPlaceGrouping {
        CosPlaceGrouping {
            m: 10,
            alpha: 30,
            n: 5,
            l: 2,
            min_images_per_class: 10,
        }
    }
}

impl CosPlaceGrouping {
    /// The settings part of the cache file's name, as the original names its cache.
    fn tag(&self) -> String {
        format!(
            "M{}_N{}_alpha{}_L{}_mipc{}",
            self.m, self.n, self.alpha, self.l, self.min_images_per_class
        )
    }

    fn validate(&self) -> Result<()> {
        if self.m == 0 || self.alpha == 0 || self.n == 0 || self.l == 0 {
            return Err(Error::Argument(format!(
                "CosPlace grouping M={} alpha={} N={} L={}: each must be at least 1",
                self.m, self.alpha, self.n, self.l
            )));
        }
        Ok(())
    }

    /// (class, group) of an image at (east, north) with `heading`, as
    /// `get__class_id__group_id` computes them: Python's float `//` then `int()`, then integer
    /// `%` and `//`.
    fn keys(&self, [east, north]: [f64; 2], heading: f64) -> ([i64; 3], [i64; 3]) {
        let (m, alpha) = (f64::from(self.m), f64::from(self.alpha));
        let class = [
            (floor_div(east, m) * m) as i64,
            (floor_div(north, m) * m) as i64,
            (floor_div(heading, alpha) * alpha) as i64,
        ];
        let (m, alpha) = (i64::from(self.m), i64::from(self.alpha));
        let (n, l) = (i64::from(self.n), i64::from(self.l));
        let group = [
            class[0].rem_euclid(m * n) / m,
            class[1].rem_euclid(m * n) / m,
            class[2].rem_euclid(alpha * l) / alpha,
        ];
        (class, group)
    }
}

/// The training images and their groups of classes.
#[derive(Clone, Debug, PartialEq)]
pub struct CosPlaceGroups {
    /// Every image of the training folder, in `list_folder` order.
    pub images: Vec<PathBuf>,
    /// `groups[g][c]`: the indices into `images` of class `c` of group `g` (see the module
    /// `data` for the orders).
    pub groups: GroupTable,
}

impl CosPlaceGroups {
    /// The table of `train_dir` (its images recursively in sorted order, or those listed in
    /// `<train_dir>_images_paths.txt`), read from `<parent>/cache/<folder>_M.._N.._alpha.._L.._mipc...txt`
    /// when that was written for the same settings and the same image list, else built and
    /// written there. Errors name the folder or the file: an empty or unreadable folder, a name
    /// without UTM coordinates or heading, no class with `min_images_per_class` images.
    pub fn load_or_build(train_dir: &Path, settings: &CosPlaceGrouping) -> Result<CosPlaceGroups> {
        settings.validate()?;
        let images = list_folder(train_dir)?;
        let groups = load_or_build_table("CosPlace", train_dir, &settings.tag(), &images, || {
            build(train_dir, &images, settings)
        })?;
        Ok(CosPlaceGroups { images, groups })
    }
}

fn build(train_dir: &Path, images: &[PathBuf], settings: &CosPlaceGrouping) -> Result<GroupTable> {
    let keys = images
        .iter()
        .map(|path| Ok(settings.keys(parse_utm(path)?, parse_heading(path)?)))
        .collect::<Result<Vec<_>>>()?;
    let grouped = group_images(&keys, settings.min_images_per_class);
    if grouped.groups.is_empty() {
        return Err(Error::Argument(format!(
            "{}: no class has {} images (min_images_per_class): the {} images fall in {} classes \
             of {} m x {} degrees, the largest with {} images",
            train_dir.display(),
            settings.min_images_per_class,
            images.len(),
            grouped.classes_seen,
            settings.m,
            settings.alpha,
            grouped.largest_class
        )));
    }
    Ok(grouped.groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_groups_follow_the_original_arithmetic() {
        let s = CosPlaceGrouping::default();
        // (551234.56 // 10 * 10, ..., 359.5 // 30 * 30) and their positions mod 50 m / 60 degrees
        assert_eq!(
            s.keys([551234.56, 4180129.99], 359.5),
            ([551230, 4180120, 330], [3, 2, 1])
        );
        assert_eq!(
            s.keys([551250.0, 4180100.0], 0.0),
            ([551250, 4180100, 0], [0, 0, 0])
        );
        assert_eq!(s.tag(), "M10_N5_alpha30_L2_mipc10");
    }
}
