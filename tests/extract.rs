//! The extraction pipeline against a probe model that records the batches it is given: image
//! listing order, rows in path order, batching of consecutive same-size images, batch-size
//! independence, the normalised pixels reaching the model, the size rules, bad images, and the
//! output files.

use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use vpr_engine::eval::extract::{
    check_resize, extract_descriptors, list_images, paths_file, prepare_image, write_outputs,
    ExtractOptions,
};
use vpr_engine::io::npy;
use vpr_engine::models::{InputSize, InputSpec, ModelInfo, PlaceModel};
use vpr_engine::{Device, Result, Tensor};

/// A model whose descriptor of an image is `[height, width, its first pixel's 3 values, the
/// mean of all its values]`, and which records the shape of every batch it sees.
struct Probe {
    info: ModelInfo,
    batches: Mutex<Vec<Vec<usize>>>,
}

impl Probe {
    fn new(size: InputSize) -> Probe {
        Probe {
            info: ModelInfo {
                description: "probe -> 6".into(),
                dim: 6,
                input: InputSpec {
                    mean: [0.25, 0.5, 0.125],
                    std: [0.5, 0.2, 0.75],
                    size,
                    antialias: true,
                },
                device: Device::Cpu,
            },
            batches: Mutex::new(Vec::new()),
        }
    }

    /// The descriptor of one prepared image `[h, w, 3]`.
    fn describe_one(h: usize, w: usize, pixels: &[f32]) -> Vec<f32> {
        let mean = pixels.iter().map(|&v| v as f64).sum::<f64>() / pixels.len() as f64;
        vec![
            h as f32,
            w as f32,
            pixels[0],
            pixels[1],
            pixels[2],
            mean as f32,
        ]
    }

    fn batch_shapes(&self) -> Vec<Vec<usize>> {
        self.batches.lock().unwrap().clone()
    }
}

impl PlaceModel for Probe {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        assert_eq!(
            images.device().is_cpu(),
            self.info.device.is_cpu(),
            "the batch is not on the model's device"
        );
        let shape = images.shape().to_vec();
        self.batches.lock().unwrap().push(shape.clone());
        let [n, h, w, c] = shape[..] else {
            panic!("batch of shape {shape:?}")
        };
        let pixels = images.to_vec::<f32>()?;
        let out: Vec<f32> = pixels
            .chunks_exact(h * w * c)
            .flat_map(|im| Probe::describe_one(h, w, im))
            .collect();
        Tensor::from_vec(out, &[n, 6], &self.info.device)
    }
}

/// A fresh folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("extract-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves an image of `height` x `width` whose pixels depend on `seed` and their position (as
/// PNG or JPEG by the extension), creating folders on the way.
fn save_image(path: &Path, height: u32, width: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let im = RgbImage::from_fn(width, height, |x, y| {
        let v = seed * 37 + x * 11 + y * 5;
        Rgb([
            (v % 256) as u8,
            ((v / 2) % 256) as u8,
            ((v * 3) % 256) as u8,
        ])
    });
    im.save_with_format(
        path,
        image::ImageFormat::from_path(path).expect("a .png or .jpg name"),
    )
    .unwrap();
}

/// What the pipeline should give for `path`: the probe's descriptor of the prepared image.
fn expected_row(
    path: &Path,
    spec: &InputSpec,
    resize: Option<[usize; 2]>,
    antialias: bool,
) -> Vec<f32> {
    let im = prepare_image(path, spec, resize, antialias).unwrap();
    Probe::describe_one(im.height, im.width, &im.data)
}

fn options(batch_size: usize, loader_threads: usize) -> ExtractOptions {
    ExtractOptions {
        batch_size,
        resize: None,
        antialias: None,
        loader_threads,
        local: None,
    }
}

#[test]
fn lists_images_recursively_in_python_sorted_order() {
    let dir = temp_dir("listing");
    for name in [
        "x.PnG",
        "sub/deep/c.jpeg",
        "a/x.png",
        "a.png",
        "a-b.png",
        "B.JPG",
        ".hidden.png",
        ".cache/d.png",
        "a/.e.jpg",
    ] {
        save_image(&dir.join(name), 4, 4, 1);
    }
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.join("a/readme.md"), "not an image").unwrap();
    std::fs::create_dir_all(dir.join("empty.png")).unwrap(); // a folder named like an image
    let listed: Vec<String> = list_images(&dir)
        .unwrap()
        .iter()
        .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
        .collect();
    // sorted(glob(...)) order: whole path strings by code point ('-' < '.' < '/' < 'B' < 'a'),
    // not path components (which would put a/x.png before a-b.png); glob skips hidden names
    assert_eq!(
        listed,
        [
            "B.JPG",
            "a-b.png",
            "a.png",
            "a/x.png",
            "sub/deep/c.jpeg",
            "x.PnG"
        ]
    );
}

#[test]
fn missing_and_empty_folders_are_errors() {
    let dir = temp_dir("empty");
    std::fs::write(dir.join("notes.txt"), "").unwrap();
    let err = list_images(&dir).unwrap_err().to_string();
    assert!(err.contains("no .jpg, .jpeg or .png image under"), "{err}");
    let err = list_images(&dir.join("missing")).unwrap_err().to_string();
    assert!(
        err.contains("missing") && err.contains("No such file"),
        "{err}"
    );
    let err = list_images(&dir.join("notes.txt")).unwrap_err().to_string();
    assert!(err.contains("notes.txt is not a folder"), "{err}");
}

#[test]
fn rows_follow_the_sorted_paths_and_batches_group_equal_sizes() {
    let dir = temp_dir("batching");
    // [height, width] of 00.png ... 07.png
    let sizes = [
        [8, 6],
        [8, 6],
        [5, 7],
        [8, 6],
        [8, 6],
        [8, 6],
        [8, 6],
        [6, 8],
    ];
    for (i, [h, w]) in sizes.iter().enumerate() {
        save_image(&dir.join(format!("{i:02}.png")), *h, *w, i as u32);
    }
    let paths = list_images(&dir).unwrap();
    let model = Probe::new(InputSize::Any);
    let mut done = Vec::new();
    let got = extract_descriptors(&model, &paths, &options(3, 3), &mut |n| done.push(n)).unwrap();
    assert_eq!([got.rows, got.cols], [8, 6]);
    for (i, path) in paths.iter().enumerate() {
        assert_eq!(
            got.data[i * 6..(i + 1) * 6],
            expected_row(path, &model.info.input, None, true),
            "row {i} is not {}",
            path.display()
        );
    }
    // same-size runs split at the batch size, never merged across a size change
    assert_eq!(
        model.batch_shapes(),
        [
            vec![2, 8, 6, 3],
            vec![1, 5, 7, 3],
            vec![3, 8, 6, 3],
            vec![1, 8, 6, 3],
            vec![1, 6, 8, 3]
        ]
    );
    assert_eq!(done, [2, 3, 6, 7, 8]);
}

#[test]
fn batch_size_and_loader_threads_do_not_change_the_rows() {
    let dir = temp_dir("batch-size");
    for i in 0..9u32 {
        let (h, w) = if i % 4 == 3 { (7, 5) } else { (6, 9) };
        let ext = if i % 3 == 0 { "jpg" } else { "png" };
        save_image(&dir.join(format!("img{i}.{ext}")), h, w, i);
    }
    let paths = list_images(&dir).unwrap();
    let model = Probe::new(InputSize::Any);
    let one_by_one = extract_descriptors(&model, &paths, &options(1, 1), &mut |_| {}).unwrap();
    assert!(model.batch_shapes().iter().all(|s| s[0] == 1));
    for (batch_size, threads) in [(4, 1), (4, 4), (100, 2), (2, 16)] {
        let got = extract_descriptors(&model, &paths, &options(batch_size, threads), &mut |_| {})
            .unwrap();
        assert_eq!(
            got, one_by_one,
            "batch size {batch_size}, {threads} loaders"
        );
    }
}

#[test]
fn the_model_sees_its_own_normalised_pixels() {
    let dir = temp_dir("normalise");
    let path = dir.join("flat.png");
    let colour = [200u8, 17, 96];
    RgbImage::from_pixel(5, 3, Rgb(colour)).save(&path).unwrap();
    let model = Probe::new(InputSize::Any);
    let got = extract_descriptors(&model, &[path], &options(1, 1), &mut |_| {}).unwrap();
    // ToTensor then Normalize with the model's (not ImageNet's) mean and std, in f32
    let want: Vec<f32> = (0..3)
        .map(|c| (colour[c] as f32 / 255.0 - model.info.input.mean[c]) / model.info.input.std[c])
        .collect();
    assert_eq!(got.data[..2], [3.0, 5.0]);
    assert_eq!(got.data[2..5], want[..]);
    let mean = want.iter().map(|&v| v as f64).sum::<f64>() / 3.0;
    assert!((got.data[5] as f64 - mean).abs() < 1e-6, "{got:?}");
}

#[test]
fn size_rules_resize_or_refuse() {
    let dir = temp_dir("sizes");
    save_image(&dir.join("a.png"), 10, 14, 1);
    save_image(&dir.join("b.png"), 9, 21, 2);
    let paths = list_images(&dir).unwrap();

    // the model's own size: every image resized, so they share one batch
    let model = Probe::new(InputSize::Resize {
        height: 4,
        width: 6,
    });
    let got = extract_descriptors(&model, &paths, &options(8, 2), &mut |_| {}).unwrap();
    assert_eq!(model.batch_shapes(), [vec![2, 4, 6, 3]]);
    assert_eq!(
        got.data[6..12],
        expected_row(&paths[1], &model.info.input, None, true)
    );

    // a model whose file says no antialias gets plain bilinear resizing, unless overridden
    let mut plain = Probe::new(InputSize::Resize {
        height: 4,
        width: 6,
    });
    plain.info.input.antialias = false;
    let got = extract_descriptors(&plain, &paths, &options(8, 2), &mut |_| {}).unwrap();
    let want = expected_row(&paths[1], &plain.info.input, None, false);
    assert_eq!(got.data[6..12], want);
    assert_ne!(want, expected_row(&paths[1], &plain.info.input, None, true));
    let opts = ExtractOptions {
        antialias: Some(true),
        ..options(8, 2)
    };
    let got = extract_descriptors(&plain, &paths, &opts, &mut |_| {}).unwrap();
    assert_eq!(
        got.data[6..12],
        expected_row(&paths[1], &plain.info.input, None, true)
    );

    // --resize wins over the model's rule
    let resize = Some([7, 7]);
    let opts = ExtractOptions {
        resize,
        ..options(8, 2)
    };
    let got = extract_descriptors(&model, &paths, &opts, &mut |_| {}).unwrap();
    assert_eq!(model.batch_shapes()[1], [2, 7, 7, 3]);
    assert_eq!(
        got.data[..6],
        expected_row(&paths[0], &model.info.input, resize, true)
    );

    // a fixed-size model takes no other size
    let fixed = Probe::new(InputSize::Fixed {
        height: 4,
        width: 6,
    });
    let err = check_resize(&fixed.info.input, resize)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--resize 7x7: the model only takes 4x6 images"),
        "{err}"
    );
    let err = extract_descriptors(&fixed, &paths, &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("only takes 4x6"), "{err}");
    assert!(fixed.batch_shapes().is_empty());

    // a patch model needs multiples of its patch: from --resize, else from the image
    let patches = Probe::new(InputSize::Multiple(5));
    let err = check_resize(&patches.info.input, resize)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiples of 5"), "{err}");
    let err = extract_descriptors(&patches, &paths, &options(8, 1), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.png")
            && err.contains("10x14 is not a multiple of the model's patch size 5"),
        "{err}"
    );
    let opts = ExtractOptions {
        resize: Some([10, 15]),
        ..options(8, 1)
    };
    extract_descriptors(&patches, &paths, &opts, &mut |_| {}).unwrap();
    assert_eq!(patches.batch_shapes(), [vec![2, 10, 15, 3]]);
}

#[test]
fn a_corrupt_image_is_an_error_naming_it() {
    let dir = temp_dir("corrupt");
    for i in 0..12 {
        save_image(&dir.join(format!("{i:02}.png")), 6, 6, i);
    }
    std::fs::write(dir.join("04.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
    std::fs::write(dir.join("09.jpg"), b"not a jpeg").unwrap();
    let paths = list_images(&dir).unwrap();
    let model = Probe::new(InputSize::Any);
    // the first bad image in path order is reported, and the loaders stop without a hang
    for (batch_size, threads) in [(1, 1), (2, 3), (16, 2)] {
        let err = extract_descriptors(&model, &paths, &options(batch_size, threads), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("04.png") && err.contains("cannot decode the image"),
            "{err}"
        );
    }
}

#[test]
fn batches_reach_the_models_device() {
    let dir = temp_dir("device");
    save_image(&dir.join("a.png"), 4, 5, 3);
    save_image(&dir.join("b.png"), 4, 5, 4);
    let paths = list_images(&dir).unwrap();
    let mut model = Probe::new(InputSize::Any);
    let on_cpu = extract_descriptors(&model, &paths, &options(2, 1), &mut |_| {}).unwrap();
    model.info.device = Device::new("vgpu").unwrap();
    let on_vgpu = extract_descriptors(&model, &paths, &options(2, 1), &mut |_| {}).unwrap();
    assert_eq!(on_cpu, on_vgpu);
}

#[test]
fn outputs_are_the_npy_and_the_paths_file() {
    let dir = temp_dir("outputs");
    save_image(&dir.join("images/b.png"), 3, 3, 1);
    save_image(&dir.join("images/a.jpg"), 3, 3, 2);
    let paths = list_images(&dir.join("images")).unwrap();
    let model = Probe::new(InputSize::Any);
    let descriptors = extract_descriptors(&model, &paths, &options(4, 2), &mut |_| {}).unwrap();
    let out = dir.join("db.npy");
    write_outputs(&out, &paths, &descriptors).unwrap();
    assert_eq!(npy::read(&out).unwrap(), descriptors);
    let listing = std::fs::read_to_string(dir.join("db.paths.txt")).unwrap();
    let images = dir.join("images");
    assert_eq!(
        listing,
        format!(
            "{}\n{}\n",
            images.join("a.jpg").display(),
            images.join("b.png").display()
        )
    );
    // no temporary file is left beside them
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["db.npy", "db.paths.txt", "images"]);

    assert_eq!(
        paths_file(Path::new("out/D.npy")),
        Path::new("out/D.paths.txt")
    );
    assert_eq!(paths_file(Path::new("D.NPY")), Path::new("D.paths.txt"));
    assert_eq!(paths_file(Path::new("D")), Path::new("D.paths.txt"));
    assert_eq!(paths_file(Path::new("D.bin")), Path::new("D.bin.paths.txt"));
}
