//! Training data of the classification-trained systems: the class and group tables CosPlace
//! and EigenPlaces train on, built from image names (`@east@north@...@heading@...@.jpg`) exactly
//! as their training scripts build them, and cached beside the dataset.
//!
//! Both scripts put every image in a class (a cell of the UTM grid, and for CosPlace a heading
//! sector), drop the classes with too few images, and split the classes into groups of cells
//! far enough apart that no two classes of a group look alike; one classifier is trained per
//! group. The groups are listed in the order their first image appears in the image list, each
//! group's classes in the order CPython iterates the set the script collects them in (see
//! `python.rs`), each class's images in list order: so class `c` of group `g` here is row `c`
//! of the original's classifier `g`.

pub mod cosplace;
pub mod eigenplaces;
mod python;
mod svd;

pub use cosplace::{CosPlaceGrouping, CosPlaceGroups};
pub use eigenplaces::{
    crop_panorama, crop_start, focal_point, principal_axes, EigenPlacesGrouping, EigenPlacesGroups,
    PanoCrop, ViewDataset,
};

use crate::error::{Error, Result};
use crate::io::{io_error, AtomicFile};
use python::{tuple_hash, SetOrder};
use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};

/// Groups of classes, each class the indices of its images: `groups[g][c]`.
pub type GroupTable = Vec<Vec<Vec<u32>>>;

/// What grouping saw, for the error when no class is left.
struct Grouped {
    groups: GroupTable,
    classes_seen: usize,
    largest_class: usize,
}

/// Groups images given each image's class and group keys (integer tuples) as the scripts do:
/// classes of fewer than `min_images` images dropped, groups in first-appearance order over
/// the images of the classes kept, classes in CPython set order within a group.
fn group_images<C, G>(keys: &[(C, G)], min_images: usize) -> Grouped
where
    C: AsRef<[i64]> + Eq + Hash + Copy,
    G: Eq + Hash + Copy,
{
    let mut class_ids: HashMap<C, usize> = HashMap::new();
    let mut members: Vec<Vec<u32>> = Vec::new();
    let mut hashes: Vec<u64> = Vec::new();
    for (image, (class, _)) in keys.iter().enumerate() {
        let id = *class_ids.entry(*class).or_insert_with(|| {
            members.push(Vec::new());
            hashes.push(tuple_hash(class.as_ref()));
            members.len() - 1
        });
        members[id].push(image as u32);
    }
    let mut group_ids: HashMap<G, usize> = HashMap::new();
    let mut sets: Vec<SetOrder> = Vec::new();
    for (class, group) in keys {
        let id = class_ids[class];
        if members[id].len() < min_images {
            continue;
        }
        let g = *group_ids.entry(*group).or_insert_with(|| {
            sets.push(SetOrder::new());
            sets.len() - 1
        });
        sets[g].add(hashes[id], id, |other| other == id);
    }
    let largest_class = members.iter().map(Vec::len).max().unwrap_or(0);
    let classes_seen = members.len();
    let groups = sets
        .iter()
        .map(|set| {
            set.order()
                .into_iter()
                .map(|id| std::mem::take(&mut members[id]))
                .collect()
        })
        .collect();
    Grouped {
        groups,
        classes_seen,
        largest_class,
    }
}

/// Where the table of a training folder is cached: `<parent>/cache/<folder name>_<settings>.txt`
/// beside the folder (the dataset's `cache/` for `DIR/train`).
fn cache_path(folder: &Path, settings: &str) -> Result<PathBuf> {
    let full = std::fs::canonicalize(folder).map_err(|source| io_error(folder, source))?;
    let name = full.file_name().map(|n| n.to_string_lossy().into_owned());
    let (Some(name), Some(parent)) = (name, full.parent()) else {
        return Err(Error::Argument(format!(
            "{}: the training folder cannot be the root (its table is cached beside it)",
            folder.display()
        )));
    };
    Ok(parent.join("cache").join(format!("{name}_{settings}.txt")))
}

/// The lines that tie a cached table to its settings and its image list: a table is reused only
/// when these match (the same settings, the same number of images, the same first and last, the
/// same FNV-1a hash of every path in order).
fn cache_header(kind: &str, settings: &str, folder: &Path, images: &[PathBuf]) -> Vec<String> {
    let relative = |p: &PathBuf| p.strip_prefix(folder).unwrap_or(p).display().to_string();
    let mut hash: u64 = 0xcbf29ce484222325;
    for path in images {
        for byte in relative(path).bytes().chain([b'\n']) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3);
        }
    }
    vec![
        format!("vpr-engine {kind} class table v1"),
        format!("settings {settings}"),
        format!("images {}", images.len()),
        format!("first {}", images.first().map(relative).unwrap_or_default()),
        format!("last {}", images.last().map(relative).unwrap_or_default()),
        format!("paths {hash:016x}"),
    ]
}

/// The cached table at `path` if it exists, its header is `header` and its body is well formed
/// with indices below `images`; `None` (rebuild) otherwise.
fn read_cache(path: &Path, header: &[String], images: usize) -> Option<GroupTable> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    for expected in header {
        if lines.next()? != expected {
            return None;
        }
    }
    let count = |line: Option<&str>, word: &str| -> Option<usize> {
        line?.strip_prefix(word)?.strip_prefix(' ')?.parse().ok()
    };
    let group_count = count(lines.next(), "groups")?;
    let mut groups = Vec::with_capacity(group_count);
    for _ in 0..group_count {
        let class_count = count(lines.next(), "group")?;
        let mut classes = Vec::with_capacity(class_count);
        for _ in 0..class_count {
            let class = lines
                .next()?
                .split(' ')
                .map(|x| x.parse::<u32>().ok().filter(|&i| (i as usize) < images))
                .collect::<Option<Vec<u32>>>()?;
            classes.push(class);
        }
        groups.push(classes);
    }
    (lines.next().is_none() && !groups.is_empty()).then_some(groups)
}

/// Writes the table under `header` (`cache/` created as needed), atomically.
fn write_cache(path: &Path, header: &[String], groups: &GroupTable) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
    }
    let mut text = header.join("\n");
    text.push_str(&format!("\ngroups {}\n", groups.len()));
    for classes in groups {
        text.push_str(&format!("group {}\n", classes.len()));
        for class in classes {
            let indices: Vec<String> = class.iter().map(u32::to_string).collect();
            text.push_str(&indices.join(" "));
            text.push('\n');
        }
    }
    let mut file = AtomicFile::create(path)?;
    file.write_bytes(text.as_bytes())?;
    file.commit()
}

/// The cached table of `folder`'s `images` for `settings`, or `build()` written to the cache.
fn load_or_build_table(
    kind: &str,
    folder: &Path,
    settings: &str,
    images: &[PathBuf],
    build: impl FnOnce() -> Result<GroupTable>,
) -> Result<GroupTable> {
    let path = cache_path(folder, settings)?;
    let header = cache_header(kind, settings, folder, images);
    if let Some(groups) = read_cache(&path, &header, images.len()) {
        return Ok(groups);
    }
    let groups = build()?;
    write_cache(&path, &header, &groups)?;
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_first_appearance_and_drop_small_classes() {
        // classes 10, 20, 30 in groups 1, 2, 1; class 30 has one image
        let keys = [([20i64], 2u8), ([10], 1), ([20], 2), ([30], 1), ([10], 1)];
        let grouped = group_images(&keys, 2);
        assert_eq!(grouped.groups, vec![vec![vec![0, 2]], vec![vec![1, 4]]]);
        assert_eq!(grouped.classes_seen, 3);
        assert_eq!(grouped.largest_class, 2);
        assert!(group_images(&keys, 3).groups.is_empty());
    }

    #[test]
    fn cached_tables_read_back_and_stale_ones_do_not() {
        let dir = std::env::temp_dir().join(format!("vpr-data-cache-{}", std::process::id()));
        let path = dir.join("cache").join("train_x.txt");
        let images: Vec<PathBuf> = (0..5).map(|i| dir.join(format!("{i}.jpg"))).collect();
        let header = cache_header("test", "x", &dir, &images);
        assert_eq!(header[3], "first 0.jpg");
        let groups = vec![vec![vec![0, 1], vec![4]], vec![vec![2, 3]]];
        write_cache(&path, &header, &groups).unwrap();
        assert_eq!(read_cache(&path, &header, 5), Some(groups));
        let other = cache_header("test", "x", &dir, &images[..4]);
        assert_eq!(read_cache(&path, &other, 5), None);
        // an index past the images makes the table stale too
        assert_eq!(read_cache(&path, &header, 4), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
