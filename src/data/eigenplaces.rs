//! EigenPlaces' classes, focal points and crops (datasets/eigenplaces_dataset.py). A class is a
//! UTM cell of `m` metres holding full 360-degree panoramas; classes `n` cells apart share a
//! group. Each group is trained as two views: lateral (angle 0) and frontal (angle 90). A
//! class's focal point lies `focal_dist` metres from the mean of its positions, along row 1 of
//! the left singular vectors of the centred positions turned by the view's angle; each
//! panorama of the class is seen through the square crop that looks at that point.

use super::python::{floor_div, modulo};
use super::svd::left_singular_vectors;
use super::{group_images, load_or_build_table, GroupTable};
use crate::error::{Error, Result};
use crate::eval::dataset::{list_folder, parse_heading, parse_utm};
use crate::io::image::Rgb8;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};

/// The grouping settings, with the paper's values as `Default`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EigenPlacesGrouping {
    /// Side of a class cell in metres (15).
    pub m: u32,
    /// Cells between two classes of a group along east and north (3): `n * n` groups.
    pub n: u32,
    /// Distance in metres from a class's mean position to its focal point (10).
    pub focal_dist: f64,
    /// Classes with fewer panoramas are dropped (5); at least 2, as a single position has no
    /// principal direction (the original fails on such a class).
    pub min_images_per_class: usize,
}

impl Default for EigenPlacesGrouping {
    fn default() -> EigenPlacesGrouping {
        EigenPlacesGrouping {
            m: 15,
            n: 3,
            focal_dist: 10.0,
            min_images_per_class: 5,
        }
    }
}

impl EigenPlacesGrouping {
    /// The settings part of the cache file's name. The focal distance is not in it: the cache
    /// holds the classes only, focal points are computed on loading.
    fn tag(&self) -> String {
        format!("M{}_N{}_mipc{}", self.m, self.n, self.min_images_per_class)
    }

    fn validate(&self) -> Result<()> {
        if self.m == 0 || self.n == 0 {
            return Err(Error::Argument(format!(
                "EigenPlaces grouping M={} N={}: each must be at least 1",
                self.m, self.n
            )));
        }
        if !self.focal_dist.is_finite() {
            return Err(Error::Argument(format!(
                "EigenPlaces focal distance {}: must be a finite number of metres",
                self.focal_dist
            )));
        }
        if self.min_images_per_class < 2 {
            return Err(Error::Argument(format!(
                "EigenPlaces min_images_per_class {}: must be at least 2, a class of one \
                 panorama has no principal direction to put its focal point on",
                self.min_images_per_class
            )));
        }
        Ok(())
    }

    /// (class, group) of a panorama at (east, north), as `get__class_id__group_id` computes them.
    fn keys(&self, [east, north]: [f64; 2]) -> ([i64; 2], [i64; 2]) {
        let m = f64::from(self.m);
        let class = [
            (floor_div(east, m) * m) as i64,
            (floor_div(north, m) * m) as i64,
        ];
        let (m, n) = (i64::from(self.m), i64::from(self.n));
        let group = [
            class[0].rem_euclid(m * n) / m,
            class[1].rem_euclid(m * n) / m,
        ];
        (class, group)
    }
}

/// One panorama as a class of one view sees it: what `crop_start` needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanoCrop {
    /// Index into `EigenPlacesGroups::panoramas`.
    pub panorama: u32,
    /// Direction from the panorama's position to the class's focal point, degrees clockwise
    /// from north in [0, 360].
    pub bearing_deg: f64,
    /// The panorama's heading (field 9 of its name, a whole number of degrees): the direction
    /// its centre column looks at.
    pub yaw_deg: f64,
}

/// The classes of one (group, view): `classes[c]` lists the panoramas of class `c` in image
/// order, each with the crop that looks at `focal_points[c]` (UTM east, north).
#[derive(Clone, Debug, PartialEq)]
pub struct ViewDataset {
    pub classes: Vec<Vec<PanoCrop>>,
    pub focal_points: Vec<[f64; 2]>,
}

/// The training panoramas and one dataset per (group, view): `views[2 g]` is group g's lateral
/// view (angle 0), `views[2 g + 1]` its frontal view (angle 90), as the original's 18 datasets.
#[derive(Clone, Debug, PartialEq)]
pub struct EigenPlacesGroups {
    pub panoramas: Vec<PathBuf>,
    pub views: Vec<ViewDataset>,
}

impl EigenPlacesGroups {
    /// The classes of `pano_dir` (its images recursively in sorted order, or those listed in
    /// `<pano_dir>_images_paths.txt`), read from `<parent>/cache/<folder>_M.._N.._mipc...txt`
    /// when that was written for the same settings and image list, else built and written
    /// there; then each class's focal points and crops. Errors name the folder or the file: an
    /// empty or unreadable folder, a name without UTM coordinates or a whole-number heading, no
    /// class with `min_images_per_class` panoramas.
    pub fn load_or_build(
        pano_dir: &Path,
        settings: &EigenPlacesGrouping,
    ) -> Result<EigenPlacesGroups> {
        settings.validate()?;
        let panoramas = list_folder(pano_dir)?;
        let positions = panoramas
            .iter()
            .map(|path| parse_utm(path))
            .collect::<Result<Vec<_>>>()?;
        let yaws = panoramas
            .iter()
            .map(|path| parse_yaw(path))
            .collect::<Result<Vec<_>>>()?;
        let groups =
            load_or_build_table("EigenPlaces", pano_dir, &settings.tag(), &panoramas, || {
                build(pano_dir, &positions, settings)
            })?;
        let mut views = Vec::with_capacity(2 * groups.len());
        for classes in &groups {
            for angle in [0.0, 90.0] {
                views.push(view(
                    classes,
                    &positions,
                    &yaws,
                    settings.focal_dist,
                    angle,
                )?);
            }
        }
        Ok(EigenPlacesGroups { panoramas, views })
    }
}

/// The heading of a panorama as `int(field 9)` reads it: a whole number of degrees.
fn parse_yaw(path: &Path) -> Result<f64> {
    let yaw = parse_heading(path)?;
    if yaw.fract() != 0.0 {
        return Err(Error::Format {
            path: path.display().to_string(),
            message: format!(
                "heading {yaw} in the file name: EigenPlaces reads a panorama's heading as a \
                 whole number of degrees"
            ),
        });
    }
    Ok(yaw)
}

fn build(
    pano_dir: &Path,
    positions: &[[f64; 2]],
    settings: &EigenPlacesGrouping,
) -> Result<GroupTable> {
    let keys: Vec<_> = positions.iter().map(|&p| settings.keys(p)).collect();
    let grouped = group_images(&keys, settings.min_images_per_class);
    if grouped.groups.is_empty() {
        return Err(Error::Argument(format!(
            "{}: no class has {} panoramas (min_images_per_class): the {} panoramas fall in {} \
             cells of {} m, the largest with {} panoramas",
            pano_dir.display(),
            settings.min_images_per_class,
            positions.len(),
            grouped.classes_seen,
            settings.m,
            grouped.largest_class
        )));
    }
    Ok(grouped.groups)
}

fn view(
    classes: &[Vec<u32>],
    positions: &[[f64; 2]],
    yaws: &[f64],
    focal_dist: f64,
    angle_deg: f64,
) -> Result<ViewDataset> {
    let mut view = ViewDataset {
        classes: Vec::with_capacity(classes.len()),
        focal_points: Vec::with_capacity(classes.len()),
    };
    for class in classes {
        let class_positions: Vec<[f64; 2]> = class.iter().map(|&i| positions[i as usize]).collect();
        let focal = focal_point(&class_positions, focal_dist, angle_deg)?;
        view.classes.push(
            class
                .iter()
                .map(|&i| PanoCrop {
                    panorama: i,
                    bearing_deg: bearing(positions[i as usize], focal),
                    yaw_deg: yaws[i as usize],
                })
                .collect(),
        );
        view.focal_points.push(focal);
    }
    Ok(view)
}

/// The left singular vectors `U` (row-major) of the centred positions, transposed (2 x n), as
/// `np.linalg.svd(..., full_matrices=False)` returns them, and the mean position (numpy's
/// `mean(0)`: a sum in order divided by n). At least 2 positions.
pub fn principal_axes(positions: &[[f64; 2]]) -> Result<([[f64; 2]; 2], [f64; 2])> {
    if positions.len() < 2 {
        return Err(Error::Argument(format!(
            "principal axes of {} position(s): at least 2 are needed",
            positions.len()
        )));
    }
    let count = positions.len() as f64;
    let sum = positions
        .iter()
        .fold([0.0, 0.0], |s, p| [s[0] + p[0], s[1] + p[1]]);
    let mean = [sum[0] / count, sum[1] / count];
    let east: Vec<f64> = positions.iter().map(|p| p[0] - mean[0]).collect();
    let north: Vec<f64> = positions.iter().map(|p| p[1] - mean[1]).collect();
    Ok((left_singular_vectors([&east, &north]), mean))
}

/// The focal point of a class: `mean + focal_dist * R(angle) U[1]` with U from
/// `principal_axes` (row index 1 as the original takes it, which is not a singular vector but
/// the second component of both) and R the counter-clockwise rotation by `angle_deg` in the
/// (east, north) plane, multiplied as numpy's `np.dot` does through OpenBLAS.
pub fn focal_point(positions: &[[f64; 2]], focal_dist: f64, angle_deg: f64) -> Result<[f64; 2]> {
    let (u, mean) = principal_axes(positions)?;
    let [d0, d1] = u[1];
    let theta = angle_deg.to_radians();
    let (cos, sin) = (theta.cos(), theta.sin());
    // dgemv on the 2 x 2 rotation: each row a product plus a fused multiply-add
    let direction = [cos.mul_add(d0, -sin * d1), sin.mul_add(d0, cos * d1)];
    Ok([
        mean[0] + direction[0] * focal_dist,
        mean[1] + direction[1] * focal_dist,
    ])
}

/// Degrees clockwise from north from `observer` to `focal`, in [0, 360]: the original's
/// `-get_angle(...) % 360` with `get_angle = -atan2(de, dn) / pi * 90 * 2` (the two negations
/// cancel exactly).
fn bearing(observer: [f64; 2], focal: [f64; 2]) -> f64 {
    let (east, north) = (focal[0] - observer[0], focal[1] - observer[1]);
    modulo(east.atan2(north) / PI * 90.0 * 2.0, 360.0)
}

/// The first column of the `side`-wide crop of a `pano_width`-wide panorama that looks along
/// `crop.bearing_deg`: column `int(((180 - yaw) mod 360) / 360 * W)` looks north, the bearing
/// adds `int((bearing / 360 * W) mod W)` columns, and the crop is centred on the result:
/// `(north + offset - side / 2) mod W`. With W = 3328 and side = 512 this is the original's
/// `get_crop` exactly.
pub fn crop_start(crop: &PanoCrop, pano_width: usize, side: usize) -> usize {
    let width = pano_width as f64;
    let offset = modulo(crop.bearing_deg / 360.0 * width, width) as i64;
    let north_deg = (180 - crop.yaw_deg as i64).rem_euclid(360);
    let north = (north_deg as f64 / 360.0 * width) as i64;
    (north + offset - (side / 2) as i64).rem_euclid(pano_width as i64) as usize
}

/// The `side` x `side` crop of rows `0..side` starting at column `start`, wrapping around the
/// panorama's right edge to its left (a 360-degree panorama is continuous there). The panorama
/// must be at least `side` high and wide and `start` inside it.
pub fn crop_panorama(pano: &Rgb8, start: usize, side: usize) -> Result<Rgb8> {
    if pano.height < side || pano.width < side || start >= pano.width {
        return Err(Error::Argument(format!(
            "a {side} x {side} crop at column {start} of a {} x {} panorama: the panorama must be \
             at least {side} pixels high and wide and the column inside it",
            pano.height, pano.width
        )));
    }
    let mut pixels = Vec::with_capacity(side * side * 3);
    for row in 0..side {
        let line = &pano.pixels[row * pano.width * 3..(row + 1) * pano.width * 3];
        let first = (pano.width - start).min(side);
        pixels.extend_from_slice(&line[start * 3..(start + first) * 3]);
        pixels.extend_from_slice(&line[..(side - first) * 3]);
    }
    Ok(Rgb8 {
        height: side,
        width: side,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_wrap_around_the_right_edge() {
        let (height, width) = (3, 5);
        let pixels = (0..height * width)
            .flat_map(|i| [i as u8, 100 + i as u8, 200])
            .collect();
        let pano = Rgb8 {
            height,
            width,
            pixels,
        };
        let crop = crop_panorama(&pano, 3, 3).unwrap();
        // row r holds columns 3, 4, 0 of pano row r
        let red: Vec<u8> = crop.pixels.chunks(3).map(|p| p[0]).collect();
        assert_eq!(red, vec![3, 4, 0, 8, 9, 5, 13, 14, 10]);
        assert_eq!(
            crop_panorama(&pano, 0, 3).unwrap().pixels[..9],
            pano.pixels[..9]
        );
        assert!(crop_panorama(&pano, 0, 4).is_err());
        assert!(crop_panorama(&pano, 5, 2).is_err());
    }

    #[test]
    fn crop_starts_follow_the_original_formula() {
        let crop = |bearing_deg, yaw_deg| PanoCrop {
            panorama: 0,
            bearing_deg,
            yaw_deg,
        };
        // yaw 180: north is column 0; bearing 90 adds a quarter turn, 832 columns
        assert_eq!(crop_start(&crop(90.0, 180.0), 3328, 512), 832 - 256);
        // yaw 0: north at column 1664; bearing 0; centred
        assert_eq!(crop_start(&crop(0.0, 0.0), 3328, 512), 1664 - 256);
        // wraps below zero, and a bearing of 360 is column 0 again
        assert_eq!(crop_start(&crop(360.0, 180.0), 3328, 512), 3328 - 256);
        assert_eq!(crop_start(&crop(1.0, 270.0), 1000, 100), 750 + 2 - 50);
    }
}
