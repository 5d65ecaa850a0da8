//! The fitting tools of `vpr_engine::fit`: k-means against an f64 Lloyd reference and exact
//! recovery of separated clusters, on the CPU and the GPUs; OpenIBL's alpha initialisation against
//! a hand computation; PCA-whitening against numpy (tools/fixtures/pca.py).

mod common;

use common::{assert_close, fixture_tensors, gpu_devices, seed};
use vpr_engine::fit::kmeans::{initial_rows, split_empty_clusters, SPLIT_EPS};
use vpr_engine::fit::{fit_pca, kmeans, netvlad_init, KMeansOptions, PcaParams};
use vpr_engine::tensor::Rng;
use vpr_engine::{Device, Tensor};

fn all_devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    devices
}

/// `clusters` Gaussian blobs of `per` points each in `dim` dimensions: centres drawn with
/// standard deviation `spread`, points with `noise`; rows shuffled. Returns (rows, labels).
fn blobs(
    rng: &mut Rng,
    clusters: usize,
    per: usize,
    dim: usize,
    spread: f64,
    noise: f64,
) -> (Vec<f32>, Vec<usize>) {
    let centres: Vec<f64> = (0..clusters * dim).map(|_| spread * rng.normal()).collect();
    let mut labels: Vec<usize> = (0..clusters * per).map(|i| i / per).collect();
    for i in (1..labels.len()).rev() {
        labels.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let rows = labels
        .iter()
        .flat_map(|&c| (0..dim).map(move |j| (c, j)))
        .map(|(c, j)| (centres[c * dim + j] + noise * rng.normal()) as f32)
        .collect();
    (rows, labels)
}

/// Lloyd's algorithm in f64 from the same initial rows, with the same tie and split rules.
fn lloyd_f64(x: &[f32], dim: usize, options: &KMeansOptions) -> (Vec<f64>, Vec<usize>) {
    let n = x.len() / dim;
    let k = options.k;
    let mut c: Vec<f64> = initial_rows(n, k, options.seed)
        .into_iter()
        .flat_map(|r| x[r * dim..(r + 1) * dim].iter().map(|&v| v as f64))
        .collect();
    let mut sizes = vec![0; k];
    for _ in 0..options.iterations {
        let mut sums = vec![0f64; k * dim];
        sizes = vec![0; k];
        for row in x.chunks_exact(dim) {
            let dist = |j: usize| -> f64 {
                row.iter()
                    .zip(&c[j * dim..(j + 1) * dim])
                    .map(|(&a, &b)| (a as f64 - b).powi(2))
                    .sum()
            };
            let best = (0..k).min_by(|&a, &b| dist(a).total_cmp(&dist(b))).unwrap();
            sizes[best] += 1;
            for (s, &v) in sums[best * dim..].iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        for j in 0..k {
            for e in 0..dim {
                c[j * dim + e] = sums[j * dim + e] / sizes[j].max(1) as f64;
            }
        }
        if sizes.contains(&0) {
            let mut c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
            split_empty_clusters(&mut c32, &mut sizes.clone(), dim);
            c = c32.into_iter().map(f64::from).collect();
        }
    }
    (c, sizes)
}

#[test]
fn kmeans_agrees_with_an_f64_lloyd_reference() {
    let s = seed("kmeans_agrees_with_an_f64_lloyd_reference");
    let mut rng = Rng::new(s);
    let (dim, k) = (16, 6);
    let (x, _) = blobs(&mut rng, k, 50, dim, 5.0, 1.0);
    let options = KMeansOptions {
        k,
        iterations: 15,
        seed: s ^ 1,
    };
    let data = Tensor::from_slice(&x, &[x.len() / dim, dim], &Device::Cpu).unwrap();
    let fit = kmeans(&data, &options).unwrap();
    let (want, want_sizes) = lloyd_f64(&x, dim, &options);
    assert_eq!(fit.sizes, want_sizes, "cluster sizes (seed {s})");
    assert_close(
        &fit.centroids.to_f64_vec().unwrap(),
        &want,
        1e-5,
        "centroids",
        s,
    );
    assert_eq!(fit.objective.len(), 15);
    for w in fit.objective.windows(2) {
        assert!(
            w[1] <= w[0] * (1.0 + 1e-6),
            "objective rose: {:?} (seed {s})",
            fit.objective
        );
    }
}

#[test]
fn kmeans_recovers_separated_clusters_on_every_device() {
    let s = seed("kmeans_recovers_separated_clusters_on_every_device");
    let mut rng = Rng::new(s);
    let (dim, k, per) = (8, 5, 24);
    let (x, labels) = blobs(&mut rng, k, per, dim, 10.0, 0.1);
    let n = labels.len();
    // Lloyd's algorithm cannot leave a local minimum that starts with two seeds in one blob, so
    // the draw is one that seeds every blob (the seed search is part of the test's setup)
    let init_seed = (0u64..)
        .find(|&t| {
            let mut hit: Vec<usize> = initial_rows(n, k, t).iter().map(|&r| labels[r]).collect();
            hit.sort_unstable();
            hit.dedup();
            hit.len() == k
        })
        .unwrap();
    let options = KMeansOptions {
        k,
        iterations: 5,
        seed: init_seed,
    };
    let mut means = vec![0f64; k * dim];
    for (row, &c) in x.chunks_exact(dim).zip(&labels) {
        for (m, &v) in means[c * dim..].iter_mut().zip(row) {
            *m += v as f64 / per as f64;
        }
    }
    let mut cpu_centroids = None;
    for device in all_devices() {
        let data = Tensor::from_slice(&x, &[n, dim], &device).unwrap();
        let fit = kmeans(&data, &options).unwrap();
        assert_eq!(fit.sizes, vec![per; k], "{device}: sizes (seed {s})");
        assert_eq!(fit.splits, 0);
        let got = fit.centroids.to_f64_vec().unwrap();
        // each centroid is one blob's mean: match them through the nearest mean
        for j in 0..k {
            let blob = (0..k)
                .min_by(|&a, &b| {
                    let d = |c: usize| -> f64 {
                        (0..dim)
                            .map(|e| (got[j * dim + e] - means[c * dim + e]).powi(2))
                            .sum()
                    };
                    d(a).total_cmp(&d(b))
                })
                .unwrap();
            assert_close(
                &got[j * dim..(j + 1) * dim],
                &means[blob * dim..(blob + 1) * dim],
                1e-5,
                &format!("{device}: centroid {j}"),
                s,
            );
        }
        match &cpu_centroids {
            None => cpu_centroids = Some(got),
            Some(cpu) => assert_close(&got, cpu, 1e-5, &format!("{device} against the CPU"), s),
        }
    }
}

#[test]
fn kmeans_is_the_same_on_the_cpu_and_the_gpus() {
    let s = seed("kmeans_is_the_same_on_the_cpu_and_the_gpus");
    let mut rng = Rng::new(s);
    let (dim, k) = (33, 7);
    let (x, _) = blobs(&mut rng, k, 19, dim, 3.0, 1.0);
    let options = KMeansOptions {
        k,
        iterations: 6,
        seed: s,
    };
    let run = |device: &Device| {
        let data = Tensor::from_slice(&x, &[x.len() / dim, dim], device).unwrap();
        kmeans(&data, &options).unwrap()
    };
    let cpu = run(&Device::Cpu);
    for device in gpu_devices() {
        let gpu = run(&device);
        assert_eq!(gpu.sizes, cpu.sizes, "{device}: sizes (seed {s})");
        assert_close(
            &gpu.centroids.to_f64_vec().unwrap(),
            &cpu.centroids.to_f64_vec().unwrap(),
            1e-5,
            &format!("{device}: centroids"),
            s,
        );
        assert_close(&gpu.objective, &cpu.objective, 1e-5, "objective", s);
    }
}

#[test]
fn empty_clusters_are_split_from_the_largest() {
    // sizes 0, 5, 9, 0, 9: cluster 0 splits the first 9-cluster (2), then cluster 3 splits the
    // other (4, now the largest)
    let dim = 3;
    let mut c: Vec<f32> = (0..5 * dim).map(|i| i as f32 + 1.0).collect();
    let before = c.clone();
    let mut sizes = vec![0, 5, 9, 0, 9];
    assert_eq!(split_empty_clusters(&mut c, &mut sizes, dim), 2);
    assert_eq!(sizes, vec![4, 5, 5, 4, 5]);
    let (up, down) = (1.0 + SPLIT_EPS, 1.0 - SPLIT_EPS);
    for (new, old) in [(0, 2), (3, 4)] {
        let v = &before[old * dim..(old + 1) * dim];
        assert_eq!(
            &c[new * dim..(new + 1) * dim],
            &[v[0] * up, v[1] * down, v[2] * up]
        );
        assert_eq!(
            &c[old * dim..(old + 1) * dim],
            &[v[0] * down, v[1] * up, v[2] * down]
        );
    }
    assert_eq!(&c[dim..2 * dim], &before[dim..2 * dim]);

    // duplicated rows give duplicated initial centroids, whose copies get no rows (exact ties go to
    // the lower index): they are split instead of left at 0 or NaN
    let x: Vec<f32> = (0..12).flat_map(|i| [(i % 2) as f32, 1.0]).collect();
    let data = Tensor::from_slice(&x, &[12, 2], &Device::Cpu).unwrap();
    let fit = kmeans(
        &data,
        &KMeansOptions {
            k: 4,
            iterations: 3,
            seed: 7,
        },
    )
    .unwrap();
    assert!(fit.splits > 0);
    assert_eq!(fit.sizes.iter().sum::<usize>(), 12);
    assert!(fit
        .centroids
        .to_f64_vec()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn kmeans_rejects_bad_input() {
    let data = Tensor::zeros(&[3, 2], vpr_engine::DType::F32, &Device::Cpu).unwrap();
    let options = |k| KMeansOptions {
        k,
        iterations: 1,
        seed: 0,
    };
    assert!(kmeans(&data, &options(4)).is_err());
    assert!(kmeans(&data, &options(0)).is_err());
    assert!(kmeans(&data.reshape(&[6]).unwrap(), &options(1)).is_err());
}

#[test]
fn netvlad_alpha_by_hand() {
    // unit centres [1, 0], [0, 1], [-1/sqrt2, -1/sqrt2]; scores and gaps per descriptor:
    // [1, 0] -> 1, 0, -0.707: gap 1; [0.6, 0.8] -> 0.6, 0.8, -0.990: gap 0.2;
    // [1/sqrt2, 1/sqrt2] -> a tie for first place: gap 0. Mean 0.4, alpha = ln(100) / 0.4.
    let r = std::f32::consts::FRAC_1_SQRT_2;
    let centroids = [2.0f32, 0.0, 0.0, 3.0, -1.0, -1.0];
    let descriptors = [1.0f32, 0.0, 0.6, 0.8, r, r];
    let alpha = 100f64.ln() / 0.4;
    let unit = [1.0, 0.0, 0.0, 1.0, -r as f64, -r as f64];
    for device in all_devices() {
        let c = Tensor::from_slice(&centroids, &[3, 2], &device).unwrap();
        let x = Tensor::from_slice(&descriptors, &[3, 2], &device).unwrap();
        let init = netvlad_init(&c, &x).unwrap();
        assert!(
            (init.mean_gap - 0.4).abs() < 1e-6,
            "{device}: mean gap {}",
            init.mean_gap
        );
        assert!(
            (init.alpha / alpha - 1.0).abs() < 1e-6,
            "{device}: alpha {}",
            init.alpha
        );
        let want: Vec<f64> = unit.iter().map(|u| u * init.alpha).collect();
        assert_close(
            &init.conv_weight.to_f64_vec().unwrap(),
            &want,
            1e-6,
            "conv weight",
            0,
        );
        assert_eq!(init.centroids.to_vec::<f32>().unwrap(), centroids);
    }
    let c = Tensor::from_slice(&[1.0f32, 0.0], &[1, 2], &Device::Cpu).unwrap();
    let x = Tensor::from_slice(&[1.0f32, 0.0], &[1, 2], &Device::Cpu).unwrap();
    assert!(
        netvlad_init(&c, &x).is_err(),
        "one cluster has no runner-up"
    );
}

/// Flips `got`'s column `c` of a [rows, cols] matrix where `sign[c]` is negative.
fn flip_columns(got: &[f64], cols: usize, sign: &[f64]) -> Vec<f64> {
    got.iter()
        .enumerate()
        .map(|(i, &v)| v * sign[i % cols])
        .collect()
}

fn check_pca_case(case: &str) {
    let f = fixture_tensors("pca.safetensors");
    let get = |name: &str| f[&format!("{case}.{name}")].clone();
    let (x_shape, x) = get("x");
    let (_, eigenvalues) = get("eigenvalues");
    let dim = eigenvalues.len();
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let data = Tensor::from_slice(&x32, &x_shape, &Device::Cpu).unwrap();
    let fit = fit_pca(&data, dim).unwrap();
    assert_eq!(fit.dual, case == "dual");
    let what = |name: &str| format!("pca {case}: {name}");
    assert_close(
        &fit.eigenvalues,
        &eigenvalues,
        1e-6,
        &what("eigenvalues"),
        0,
    );
    // the sign of each eigenvector is free: align ours to numpy's
    let (_, vectors) = get("eigenvectors");
    let sign: Vec<f64> = (0..dim)
        .map(|c| {
            let dot: f64 = (0..vectors.len() / dim)
                .map(|i| fit.eigenvectors[i * dim + c] * vectors[i * dim + c])
                .sum();
            dot.signum()
        })
        .collect();
    assert_close(
        &flip_columns(&fit.eigenvectors, dim, &sign),
        &vectors,
        1e-5,
        &what("eigenvectors"),
        0,
    );
    let p = &fit.params;
    let as64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_close(
        &flip_columns(&as64(&p.u), dim, &sign),
        &get("U").1,
        1e-5,
        &what("U"),
        0,
    );
    assert_close(&as64(&p.lams), &get("lams").1, 1e-6, &what("lams"), 0);
    assert_close(&as64(&p.mu), &get("mu").1, 1e-6, &what("mu"), 0);
    assert_close(
        &flip_columns(&as64(&p.utmu), dim, &sign),
        &get("Utmu").1,
        1e-5,
        &what("Utmu"),
        0,
    );
    let layer = p.layer(true, &Device::Cpu).unwrap();
    let d = p.input_dim;
    let row_sign: Vec<f64> = (0..dim * d).map(|i| sign[i / d]).collect();
    let weight = layer.weight.to_f64_vec().unwrap();
    let flipped: Vec<f64> = weight.iter().zip(&row_sign).map(|(w, s)| w * s).collect();
    assert_close(&flipped, &get("weight").1, 1e-5, &what("weight"), 0);
    let bias = flip_columns(&layer.bias.to_f64_vec().unwrap(), dim, &sign);
    assert_close(&bias, &get("bias").1, 1e-5, &what("bias"), 0);
}

#[test]
fn pca_dual_matches_numpy() {
    check_pca_case("dual");
}

#[test]
fn pca_primal_matches_numpy() {
    check_pca_case("primal");
}

#[test]
fn whitening_decorrelates_the_training_data() {
    let s = seed("whitening_decorrelates_the_training_data");
    let mut rng = Rng::new(s);
    // rank 12 plus noise, 30 descriptors of 64 dimensions (dual), 10 components
    let (n, d, dim) = (30, 64, 10);
    let basis: Vec<f64> = (0..12 * d).map(|_| rng.normal()).collect();
    let x: Vec<f32> = (0..n)
        .flat_map(|_| {
            let z: Vec<f64> = (0..12).map(|_| rng.normal()).collect();
            let noise: Vec<f64> = (0..d).map(|_| 0.05 * rng.normal()).collect();
            (0..d)
                .map(|j| ((0..12).map(|r| z[r] * basis[r * d + j]).sum::<f64>() + noise[j]) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let data = Tensor::from_slice(&x, &[n, d], &Device::Cpu).unwrap();
    let p = fit_pca(&data, dim).unwrap().params;
    for device in all_devices() {
        let layer = p.layer(true, &device).unwrap();
        let y = Tensor::from_slice(&x, &[n, d], &device)
            .unwrap()
            .matmul(&layer.weight.t().unwrap())
            .unwrap()
            .add(&layer.bias)
            .unwrap()
            .to_f64_vec()
            .unwrap();
        let mean: Vec<f64> = (0..dim)
            .map(|c| (0..n).map(|i| y[i * dim + c]).sum::<f64>() / n as f64)
            .collect();
        let scale = mean.iter().map(|m| m.abs()).fold(0.0, f64::max);
        assert!(scale < 1e-4, "{device}: whitened mean {mean:?} (seed {s})");
        let mut cov = vec![0f64; dim * dim];
        for row in y.chunks_exact(dim) {
            for a in 0..dim {
                for b in 0..dim {
                    cov[a * dim + b] += row[a] * row[b] / (n - 1) as f64;
                }
            }
        }
        let identity: Vec<f64> = (0..dim * dim)
            .map(|i| f64::from(u8::from(i / dim == i % dim)))
            .collect();
        assert_close(&cov, &identity, 1e-3, &format!("{device}: covariance"), s);
    }
}

#[test]
fn eigenvalues_are_floored() {
    // 10 descriptors span at most 9 directions once centred: the 10th eigenvalue of the Gram
    // matrix is zero up to rounding, and is raised to 1e-9
    let s = seed("eigenvalues_are_floored");
    let mut rng = Rng::new(s);
    let x: Vec<f32> = (0..10 * 30).map(|_| rng.normal() as f32).collect();
    let data = Tensor::from_slice(&x, &[10, 30], &Device::Cpu).unwrap();
    let fit = fit_pca(&data, 10).unwrap();
    assert!(fit.dual);
    assert!(fit.eigenvalues[9].abs() < 1e-9, "{:?}", fit.eigenvalues);
    assert_eq!(fit.params.lams[9], 1e-9f32);
    assert!(fit.params.lams[..9].iter().all(|&l| l > 0.01));
    assert!(fit_pca(&data, 11).is_err());
    assert!(fit_pca(&data, 0).is_err());
}

#[test]
fn pca_params_round_trip_through_files() {
    let f = fixture_tensors("pca.safetensors");
    let (shape, x) = f["dual.x"].clone();
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let params = fit_pca(&Tensor::from_slice(&x32, &shape, &Device::Cpu).unwrap(), 5)
        .unwrap()
        .params;
    let dir = std::env::temp_dir().join(format!("vpr-pca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pca.safetensors");
    params.save(&path).unwrap();
    assert_eq!(PcaParams::load(&path).unwrap(), params);
    // raw little-endian float32 files, as h5dump -b LE writes an OpenIBL file's datasets
    let raw = |name: &str, v: &[f32]| {
        let p = dir.join(format!("{name}.bin"));
        std::fs::write(&p, bytemuck::cast_slice(v)).unwrap();
        p
    };
    let from_raw = PcaParams::from_raw_files(
        &raw("U", &params.u),
        &raw("lams", &params.lams),
        &raw("mu", &params.mu),
    )
    .unwrap();
    assert_eq!((from_raw.input_dim, from_raw.dim), (96, 5));
    assert_eq!(
        (&from_raw.u, &from_raw.lams, &from_raw.mu),
        (&params.u, &params.lams, &params.mu)
    );
    let utmu = |p: &PcaParams| p.utmu.iter().map(|&v| v as f64).collect::<Vec<_>>();
    assert_close(&utmu(&from_raw), &utmu(&params), 1e-6, "recomputed Utmu", 0);
    assert!(PcaParams::from_raw_files(
        &raw("U", &params.u[1..]),
        &raw("lams", &params.lams),
        &raw("mu", &params.mu)
    )
    .is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pca_params_from_an_openibl_file_through_h5dump() {
    // tools/fixtures/pca.py wrote the "dual" parameters as OpenIBL's HDF5 file and dumped U, lams
    // and mu with h5dump -b LE
    let f = fixture_tensors("pca.safetensors");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pca_h5dump");
    let p = PcaParams::from_raw_files(
        &dir.join("U.bin"),
        &dir.join("lams.bin"),
        &dir.join("mu.bin"),
    )
    .unwrap();
    assert_eq!((p.input_dim, p.dim), (96, 12));
    let as64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    for (name, got) in [("U", &p.u), ("lams", &p.lams), ("mu", &p.mu)] {
        assert_eq!(as64(got), f[&format!("dual.{name}")].1, "{name}");
    }
    assert_close(&as64(&p.utmu), &f["dual.Utmu"].1, 1e-6, "Utmu", 0);
    // OpenIBL's loader keeps the leading components of a larger fit
    let t = p.truncated(5).unwrap();
    assert_eq!((t.input_dim, t.dim), (96, 5));
    for j in 0..96 {
        assert_eq!(t.u[j * 5..j * 5 + 5], p.u[j * 12..j * 12 + 5]);
    }
    assert_eq!((&t.lams[..], &t.utmu[..]), (&p.lams[..5], &p.utmu[..5]));
    let (full, part) = (
        p.layer(true, &Device::Cpu).unwrap(),
        t.layer(true, &Device::Cpu).unwrap(),
    );
    assert_eq!(
        part.weight.to_vec::<f32>().unwrap(),
        full.weight
            .narrow(0, 0, 5)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()
    );
    assert!(p.truncated(13).is_err() && p.truncated(0).is_err());
}
