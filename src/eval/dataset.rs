//! Geo-tagged test sets as the VPR community's dataset tools lay them out: a folder of database
//! images and a folder of queries, each image named `@east@north@zone@letter@lat@lon@...@.jpg`
//! with its UTM position, and the positives of each query (the database images within a
//! distance of it).

use crate::error::{Error, Result};
use crate::eval::extract::list_images;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How an image must be named, for error messages.
const NAME_FORMAT: &str = "expected a name like @east@north@zone@letter@lat@lon@...@.jpg";

/// The database and query images of a geo-tagged test set with their UTM (east, north)
/// positions, each list in the order the descriptors are in.
#[derive(Clone, Debug)]
pub struct EvalDataset {
    pub database: Vec<PathBuf>,
    pub queries: Vec<PathBuf>,
    pub database_utm: Vec<[f64; 2]>,
    pub queries_utm: Vec<[f64; 2]>,
}

impl EvalDataset {
    /// `DIR/database` and `DIR/queries`, else `DIR/images/test/database` and
    /// `DIR/images/test/queries` (the layout is the first where either folder exists; the
    /// other must exist too).
    pub fn open(dir: &Path) -> Result<EvalDataset> {
        require_folder(dir)?;
        let test_split = dir.join("images").join("test");
        for base in [dir, test_split.as_path()] {
            let (database, queries) = (base.join("database"), base.join("queries"));
            if database.is_dir() || queries.is_dir() {
                return EvalDataset::from_folders(&database, &queries);
            }
        }
        Err(Error::Argument(format!(
            "{}: found neither database/ and queries/ folders in it nor {}/database and {}/queries",
            dir.display(),
            test_split.display(),
            test_split.display()
        )))
    }

    /// Two explicit folders (like VPR-methods-evaluation's `--database_folder` and
    /// `--queries_folder`). Every image must be named with its position: the error names the
    /// first that is not (database first).
    pub fn from_folders(database: &Path, queries: &Path) -> Result<EvalDataset> {
        let database = list_folder(database)?;
        let queries = list_folder(queries)?;
        let positions = |paths: &[PathBuf]| {
            paths
                .iter()
                .map(|p| parse_utm(p))
                .collect::<Result<Vec<_>>>()
        };
        Ok(EvalDataset {
            database_utm: positions(&database)?,
            queries_utm: positions(&queries)?,
            database,
            queries,
        })
    }

    /// Database indices within `radius` metres of each query, ascending: Euclidean on
    /// (east, north) and inclusive, `dx² + dy² <= radius²` in f64 exactly as scikit-learn's
    /// `radius_neighbors` compares reduced distances, so the boundary cases agree with it.
    /// `radius` must be finite and at least 0 (0: the same position only).
    pub fn positives(&self, radius: f64) -> Result<Vec<Vec<usize>>> {
        if !(radius.is_finite() && radius >= 0.0) {
            return Err(Error::Argument(format!(
                "positive distance threshold {radius}: must be a finite number of metres >= 0"
            )));
        }
        let radius_squared = radius * radius;
        if radius_squared.is_infinite() {
            // Every squared distance compares <= infinity, as in the f64 comparison.
            return Ok(vec![
                (0..self.database.len()).collect();
                self.queries_utm.len()
            ]);
        }
        let grid = Grid::new(&self.database_utm, &self.queries_utm, radius);
        Ok(self
            .queries_utm
            .iter()
            .map(|query| grid.within(query, radius_squared))
            .collect())
    }
}

/// Database positions bucketed into square cells at least `radius` wide, so that the positions
/// within `radius` of any point are in its cell or the eight around it: a lookup costs the
/// points of nine cells instead of the whole database.
struct Grid<'a> {
    points: &'a [[f64; 2]],
    cell: f64,
    /// Point indices sorted by cell, then index.
    order: Vec<usize>,
    /// The run of `order` in each occupied cell.
    cells: HashMap<(i64, i64), Range<usize>>,
}

impl<'a> Grid<'a> {
    fn new(points: &'a [[f64; 2]], queries: &[[f64; 2]], radius: f64) -> Grid<'a> {
        // A relative margin of 2^-20 on the width keeps every coordinate within 2^20 cells of
        // the origin, so the rounding of `coordinate / cell` (under 2^-32 cells) cannot put a
        // point within `radius` two cells away; the floor keeps a width of 0 (radius 0 with
        // every point at the origin) away, and is far above the distances whose squares
        // underflow to 0.
        const MARGIN: f64 = 1.0 / (1u64 << 20) as f64;
        let largest = points
            .iter()
            .chain(queries)
            .flatten()
            .fold(0f64, |m, c| m.max(c.abs()));
        let cell = radius * (1.0 + MARGIN) + largest * MARGIN + 1e-150;
        let mut keyed: Vec<((i64, i64), usize)> = points
            .iter()
            .enumerate()
            .map(|(i, p)| (cell_of(p, cell), i))
            .collect();
        keyed.sort_unstable();
        let mut cells = HashMap::new();
        let mut start = 0;
        for end in 1..=keyed.len() {
            if end == keyed.len() || keyed[end].0 != keyed[start].0 {
                cells.insert(keyed[start].0, start..end);
                start = end;
            }
        }
        Grid {
            points,
            cell,
            order: keyed.into_iter().map(|(_, i)| i).collect(),
            cells,
        }
    }

    /// Indices of the points with `dx² + dy² <= radius_squared` from `query`, ascending.
    fn within(&self, query: &[f64; 2], radius_squared: f64) -> Vec<usize> {
        let (cx, cy) = cell_of(query, self.cell);
        let mut found = Vec::new();
        for x in cx - 1..=cx + 1 {
            for y in cy - 1..=cy + 1 {
                let Some(run) = self.cells.get(&(x, y)) else {
                    continue;
                };
                found.extend(self.order[run.clone()].iter().copied().filter(|&i| {
                    let [px, py] = self.points[i];
                    let (dx, dy) = (query[0] - px, query[1] - py);
                    dx * dx + dy * dy <= radius_squared
                }));
            }
        }
        found.sort_unstable();
        found
    }
}

/// The cell holding `point` in a grid of `cell`-wide squares.
fn cell_of(point: &[f64; 2], cell: f64) -> (i64, i64) {
    (
        (point[0] / cell).floor() as i64,
        (point[1] / cell).floor() as i64,
    )
}

/// An `Error::Io` naming `folder` when it does not exist, an `Error::Argument` when it is not
/// a folder.
fn require_folder(folder: &Path) -> Result<()> {
    let meta = std::fs::metadata(folder).map_err(|source| Error::Io {
        path: folder.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(Error::Argument(format!(
            "{} is not a folder",
            folder.display()
        )));
    }
    Ok(())
}

/// The images of one folder in descriptor order: the paths listed in `<folder>_images_paths.txt`
/// (beside the folder; relative to the folder, one per line, blank lines ignored; every listed
/// path must be an existing file) when that file exists, else every image under the folder,
/// recursively, sorted like Python's `sorted()` (`list_images`).
pub fn list_folder(folder: &Path) -> Result<Vec<PathBuf>> {
    require_folder(folder)?;
    match paths_file(folder) {
        Some(list) if list.exists() => read_paths_file(folder, &list),
        _ => list_images(folder),
    }
}

/// `<folder>_images_paths.txt` beside `folder` (none for a path without a final name, like `..`).
fn paths_file(folder: &Path) -> Option<PathBuf> {
    let mut name = folder.file_name()?.to_os_string();
    name.push("_images_paths.txt");
    Some(folder.with_file_name(name))
}

fn read_paths_file(folder: &Path, list: &Path) -> Result<Vec<PathBuf>> {
    let bad = |message: String| Error::Format {
        path: list.display().to_string(),
        message,
    };
    if folder.to_str().is_none() {
        return Err(Error::Argument(format!(
            "{}: folder paths must be UTF-8 to hold the images listed in {}",
            folder.display(),
            list.display()
        )));
    }
    let text = std::fs::read_to_string(list).map_err(|source| Error::Io {
        path: list.display().to_string(),
        source,
    })?;
    let mut paths = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if Path::new(line).is_absolute() {
            return Err(bad(format!(
                "line {}: {line} is absolute, but the listed paths are relative to {}",
                number + 1,
                folder.display()
            )));
        }
        let path = folder.join(line);
        if !path.is_file() {
            return Err(bad(format!(
                "line {}: {} is not an existing file (the listed paths are relative to {})",
                number + 1,
                path.display(),
                folder.display()
            )));
        }
        paths.push(path);
    }
    if paths.is_empty() {
        return Err(bad(format!(
            "lists no image of {} (the file is empty)",
            folder.display()
        )));
    }
    Ok(paths)
}

/// (east, north) from a name `@east@north@zone@letter@lat@lon@...@.jpg`: fields 1 and 2 of the
/// file name split on '@' (only the file name, so folder names with '@' do not matter), each a
/// finite number as Python's `float()` reads it (surrounding whitespace allowed). An error naming
/// the path otherwise.
pub fn parse_utm(path: &Path) -> Result<[f64; 2]> {
    let fields = name_fields(path, "a position")?;
    let (Some(east), Some(north)) = (fields.get(1), fields.get(2)) else {
        return Err(name_error(
            path,
            format!("the file name has no UTM coordinates; {NAME_FORMAT}"),
        ));
    };
    Ok([
        name_number(path, "UTM east", east)?,
        name_number(path, "UTM north", north)?,
    ])
}

/// The heading in degrees from a name `@east@north@zone@letter@lat@lon@pano_id@tile@heading@...`:
/// field 9 of the file name split on '@', a finite number as `float()` reads it (CosPlace's
/// crops and EigenPlaces' panoramas). An error naming the path otherwise.
pub fn parse_heading(path: &Path) -> Result<f64> {
    let fields = name_fields(path, "a heading")?;
    let Some(heading) = fields.get(9) else {
        return Err(name_error(
            path,
            "the file name has no heading (field 9); expected a name like \
             @east@north@zone@letter@lat@lon@pano_id@tile@heading@...@.jpg"
                .to_string(),
        ));
    };
    name_number(path, "heading", heading)
}

/// The file name of `path` split on '@' (field 0 is what precedes the first '@').
fn name_fields<'a>(path: &'a Path, what: &str) -> Result<Vec<&'a str>> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        name_error(
            path,
            format!("no UTF-8 file name to read {what} from; {NAME_FORMAT}"),
        )
    })?;
    Ok(name.split('@').collect())
}

/// A finite number from a field of the file name of `path`, as Python's `float()` reads it.
fn name_number(path: &Path, what: &str, text: &str) -> Result<f64> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(value),
        _ => Err(name_error(
            path,
            format!("{what} {text:?} in the file name is not a finite number; {NAME_FORMAT}"),
        )),
    }
}

fn name_error(path: &Path, message: String) -> Error {
    Error::Format {
        path: path.display().to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(database_utm: Vec<[f64; 2]>, queries_utm: Vec<[f64; 2]>) -> EvalDataset {
        let names = |n: usize, what: &str| -> Vec<PathBuf> {
            (0..n)
                .map(|i| PathBuf::from(format!("{what}{i}.jpg")))
                .collect()
        };
        EvalDataset {
            database: names(database_utm.len(), "d"),
            queries: names(queries_utm.len(), "q"),
            database_utm,
            queries_utm,
        }
    }

    fn parse(name: &str) -> Result<[f64; 2]> {
        parse_utm(Path::new(name))
    }

    fn error_of(result: Result<[f64; 2]>) -> String {
        result.expect_err("a bad name parsed").to_string()
    }

    #[test]
    fn positions_come_from_the_first_two_fields_of_the_file_name() {
        let name = "queries/@0552345.67@4180123.45@10@S@37.76865@-122.42134@x@01@090@@@@@@.jpg";
        assert_eq!(parse(name).unwrap(), [552345.67, 4180123.45]);
        assert_eq!(
            parse("@-0001234.50@-0000007.25@x@.png").unwrap(),
            [-1234.5, -7.25]
        );
        assert_eq!(parse("@5@6@.jpg").unwrap(), [5.0, 6.0]);
        assert_eq!(parse("prefix@1e3@ 2.5 @.jpg").unwrap(), [1000.0, 2.5]);
        // '@' in folder names is not read: only the file name is split
        assert_eq!(
            parse("data@home/db@12@34@/@100.5@200.25@10@S@.jpg").unwrap(),
            [100.5, 200.25]
        );
    }

    #[test]
    fn names_without_a_position_are_errors_naming_the_path() {
        let no_at = error_of(parse("db/image0001.jpg"));
        assert!(no_at.starts_with("db/image0001.jpg: "), "{no_at}");
        assert!(no_at.contains("no UTM coordinates"), "{no_at}");
        let one_field = error_of(parse("db/@552345.67.jpg"));
        assert!(one_field.contains("no UTM coordinates"), "{one_field}");
        // the north field runs into the extension when the closing '@' is missing
        let open = error_of(parse("db/@1@2.jpg"));
        assert!(open.contains("north \"2.jpg\""), "{open}");
        let text = error_of(parse("db/@east@4180123.45@.jpg"));
        assert!(text.starts_with("db/@east@4180123.45@.jpg: "), "{text}");
        assert!(text.contains("east \"east\""), "{text}");
        let empty = error_of(parse("db/@@4180123.45@.jpg"));
        assert!(empty.contains("east \"\""), "{empty}");
        for not_finite in ["@nan@1@.jpg", "@1@inf@.jpg", "@1@1e999@.jpg"] {
            let e = error_of(parse(not_finite));
            assert!(e.contains("not a finite number"), "{not_finite}: {e}");
        }
        // a folder with coordinates does not lend them to a file without
        let folder = error_of(parse("@1@2@/image.jpg"));
        assert!(folder.contains("no UTM coordinates"), "{folder}");
    }

    #[test]
    fn headings_come_from_field_9_of_the_file_name() {
        let name = "train/@0552345.67@4180123.45@10@S@37.76865@-122.42134@pano@01@090@@@@@@.jpg";
        assert_eq!(parse_heading(Path::new(name)).unwrap(), 90.0);
        let fractional = "@1@2@10@S@@@@@ 045.5 @@@@@@.jpg";
        assert_eq!(parse_heading(Path::new(fractional)).unwrap(), 45.5);
        let short = parse_heading(Path::new("db/@1@2@10@S@.jpg"))
            .unwrap_err()
            .to_string();
        assert!(short.starts_with("db/@1@2@10@S@.jpg: "), "{short}");
        assert!(short.contains("no heading"), "{short}");
        let text = parse_heading(Path::new("@1@2@3@4@5@6@7@8@north@.jpg")).unwrap_err();
        assert!(text.to_string().contains("heading \"north\""), "{text}");
    }

    #[test]
    fn positives_include_the_exact_radius_and_duplicates() {
        let database = vec![
            [100.0, 100.0],
            [115.0, 120.0], // dx 15, dy 20: exactly 25 m
            [115.0, 120.0], // the same position again
            [100.0, 125.0], // exactly 25 m north
            [100.0, 125.000001],
            [75.0, 100.0],  // exactly 25 m west
            [125.0, 125.0], // 35.4 m
        ];
        let queries = vec![[100.0, 100.0], [1000.0, 1000.0], [115.0, 120.0]];
        let ds = dataset(database, queries);
        let positives = ds.positives(25.0).unwrap();
        assert_eq!(positives[0], vec![0, 1, 2, 3, 5]);
        assert!(positives[1].is_empty());
        assert_eq!(positives[2], vec![0, 1, 2, 3, 4, 6]);
        let same_place = ds.positives(0.0).unwrap();
        assert_eq!(same_place, vec![vec![0], vec![], vec![1, 2]]);
    }

    #[test]
    fn radius_zero_matches_signed_zeros_and_nothing_nearby() {
        let ds = dataset(
            vec![[0.0, -0.0], [-0.0, 0.0], [1e-300, 0.0], [0.0, 0.0]],
            vec![[0.0, 0.0], [-0.0, -0.0]],
        );
        // (1e-300)^2 underflows to 0, so that point counts at radius 0 as the f64 test says
        assert_eq!(ds.positives(0.0).unwrap(), vec![vec![0, 1, 2, 3]; 2]);
        let apart = dataset(vec![[5.0, 5.0], [5.0, 5.000000000000001]], vec![[5.0, 5.0]]);
        assert_eq!(apart.positives(0.0).unwrap(), vec![vec![0]]);
    }

    #[test]
    fn a_huge_radius_takes_everything() {
        let ds = dataset(vec![[-1e300, 0.0], [1e300, 5.0]], vec![[0.0, 0.0]]);
        assert_eq!(ds.positives(1e200).unwrap(), vec![vec![0, 1]]);
        assert_eq!(ds.positives(1.0).unwrap(), vec![Vec::<usize>::new()]);
    }

    #[test]
    fn negative_or_nan_radius_is_an_error() {
        let ds = dataset(vec![[0.0, 0.0]], vec![[0.0, 0.0]]);
        for radius in [-1.0, f64::NAN, f64::INFINITY, -0.5] {
            let e = ds.positives(radius).expect_err("a bad radius was taken");
            assert!(matches!(e, Error::Argument(_)), "{radius}: {e}");
            assert!(e.to_string().contains("threshold"), "{e}");
        }
    }

    #[test]
    fn the_paths_file_sits_beside_the_folder() {
        assert_eq!(
            paths_file(Path::new("data/database")),
            Some(PathBuf::from("data/database_images_paths.txt"))
        );
        assert_eq!(
            paths_file(Path::new("data/queries/")),
            Some(PathBuf::from("data/queries_images_paths.txt"))
        );
        assert_eq!(paths_file(Path::new("..")), None);
    }
}
