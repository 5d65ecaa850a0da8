//! mutual_nn_counts: SelaVPR's scores from tests/fixtures/mnn.safetensors (ties and the
//! single-match quirk included) on every device, the CPU against a direct f64 count on fresh random
//! maps of awkward sizes, the first-index rule on a hand-made tie whose count depends on it, the
//! GPUs against the CPU, and errors.

mod common;

use common::{seed, ODD_SIZES};
use vpr_engine::ops::mnn::mutual_nn_counts;
use vpr_engine::{DType, Device, Error, Tensor};

fn counts(a: &Tensor, b: &Tensor, device: &Device) -> Vec<i64> {
    let (a, b) = (a.to_device(device).unwrap(), b.to_device(device).unwrap());
    let c = mutual_nn_counts(&a, &b).unwrap();
    assert_eq!(c.dtype(), DType::I64);
    c.to_device(&Device::Cpu).unwrap().to_vec::<i64>().unwrap()
}

fn all_devices() -> Vec<Device> {
    std::iter::once(Device::Cpu)
        .chain(common::gpu_devices())
        .collect()
}

#[test]
fn matches_selavpr_fixture() {
    let f = common::fixture_tensors("mnn.safetensors");
    let mut names: Vec<&str> = f.keys().filter_map(|k| k.strip_suffix(".counts")).collect();
    names.sort();
    assert_eq!(names, ["pairs", "query", "single", "ties"]);
    let tensor = |key: String| {
        let (shape, v) = &f[&key];
        Tensor::from_f64(v, shape, DType::F32, &Device::Cpu).unwrap()
    };
    for device in all_devices() {
        for name in &names {
            let (a, b) = (tensor(format!("{name}.a")), tensor(format!("{name}.b")));
            let want: Vec<i64> = f[&format!("{name}.counts")]
                .1
                .iter()
                .map(|&v| v as i64)
                .collect();
            assert_eq!(counts(&a, &b, &device), want, "{device} {name}");
        }
    }
}

/// The count from the definition: similarities in f64 (no rounding to f32: random maps have no
/// near ties), first index on ties, counted on a's side, one match scoring 0.
fn reference(a: &[f64], b: &[f64], la: usize, lb: usize, d: usize) -> i64 {
    let s = |i: usize, j: usize| (0..d).map(|k| a[i * d + k] * b[j * d + k]).sum::<f64>();
    let first_max = |n: usize, v: &dyn Fn(usize) -> f64| {
        (0..n).fold(0, |best, x| if v(x) > v(best) { x } else { best })
    };
    let mutual = (0..la)
        .filter(|&i| {
            let j = first_max(lb, &|j| s(i, j));
            first_max(la, &|i2| s(i2, j)) == i
        })
        .count() as i64;
    if mutual == 1 {
        0
    } else {
        mutual
    }
}

#[test]
fn cpu_matches_direct_count_on_odd_sizes() {
    let s = seed("mnn_cpu_matches_direct_count");
    let mut case = 0;
    for &la in ODD_SIZES {
        for &(lb, d) in &[(1, 3), (7, 1), (33, 17), (257, 5)] {
            let pairs = 2;
            let k = s.wrapping_add(case * 2);
            case += 1;
            let rand = |shape: &[usize], k| {
                Tensor::rand_uniform(shape, -1.0, 1.0, k, DType::F32, &Device::Cpu).unwrap()
            };
            let (a, b) = (rand(&[pairs, la, d], k), rand(&[pairs, lb, d], k + 1));
            let got = counts(&a, &b, &Device::Cpu);
            let (va, vb) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
            for (p, &g) in got.iter().enumerate() {
                let want = reference(&va[p * la * d..], &vb[p * lb * d..], la, lb, d);
                assert_eq!(
                    g, want,
                    "pair {p} of La {la} Lb {lb} D {d}; VPR_TEST_SEED={s}"
                );
            }
        }
    }
}

#[test]
fn equal_similarities_go_to_the_lower_index_on_every_device() {
    // S = a b^T = [[1, 1, 0], [0, 2, 3]]: row 0 ties columns 0 and 1. With the first index, row 0
    // picks column 0, whose best row is 0: two mutual matches, (0, 0) and (1, 2). With the last
    // index it would pick column 1, whose best row is 1: a single match, scored 0.
    let a = Tensor::from_vec(vec![1f32, 0., 0., 0., 1., 1.], &[1, 2, 3], &Device::Cpu).unwrap();
    let b = Tensor::from_vec(
        vec![1f32, 0., 0., 1., 2., 0., 0., 0., 3.],
        &[1, 3, 3],
        &Device::Cpu,
    )
    .unwrap();
    for device in all_devices() {
        assert_eq!(counts(&a, &b, &device), [2], "{device}");
        // swapped, S^T = [[1, 0], [1, 2], [0, 3]] ties in column 0: its best row is 0 with the
        // first index (matches (0, 0) and (2, 1): 2) and 1 with the last ((2, 1) alone: 0)
        assert_eq!(counts(&b, &a, &device), [2], "{device} swapped");
    }
}

#[test]
fn single_mutual_match_scores_zero_and_duplicates_tie_exactly() {
    // every location of b the same: all of a picks location 0, whose best is one position of a
    let a = Tensor::rand_uniform(&[1, 9, 4], -1.0, 1.0, 5, DType::F32, &Device::Cpu).unwrap();
    let row = [0.5f32, -0.25, 1.0, 0.75];
    let b = Tensor::from_vec(row.repeat(6), &[1, 6, 4], &Device::Cpu).unwrap();
    let mut twin = a.to_vec::<f32>().unwrap();
    twin.extend(a.to_vec::<f32>().unwrap());
    let twice = Tensor::from_vec(twin, &[2, 9, 4], &Device::Cpu).unwrap();
    for device in all_devices() {
        assert_eq!(counts(&a, &b, &device), [0], "{device}");
        // a against [a, a] as one map of 18 locations: each of a's rows ties between j and j + 9
        // and takes j, so the count is a's against itself
        let joined = twice.reshape(&[1, 18, 4]).unwrap();
        let self_count = counts(&a, &a, &device)[0];
        assert_eq!(counts(&a, &joined, &device), [self_count], "{device}");
    }
}

#[test]
fn every_conformance_case_passes_on_the_gpus() {
    common::assert_conformance(vpr_engine::ops::mnn::conformance, "mnn conformance");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let t = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &Device::Cpu).unwrap();
    let f32s = |shape: &[usize]| t(shape, DType::F32);
    let shape_err = |r: vpr_engine::Result<Tensor>, expect: &str| match r {
        Err(Error::Shape(m)) => assert!(m.contains(expect), "{m:?} lacks {expect:?}"),
        other => panic!(
            "expected a shape error with {expect:?}, got {:?}",
            other.map(|t| t.shape().to_vec())
        ),
    };
    shape_err(
        mutual_nn_counts(&f32s(&[4, 3]), &f32s(&[1, 4, 3])),
        "[pairs, locations, dim]",
    );
    shape_err(
        mutual_nn_counts(&f32s(&[2, 4, 3]), &f32s(&[1, 4, 3])),
        "[1, La, 3]",
    );
    shape_err(
        mutual_nn_counts(&f32s(&[1, 4, 3]), &f32s(&[1, 4, 5])),
        "dim = 5",
    );
    match mutual_nn_counts(&t(&[1, 4, 3], DType::F16), &f32s(&[1, 4, 3])) {
        Err(Error::DType(m)) => assert!(m.contains("f32"), "{m}"),
        other => panic!(
            "expected a dtype error, got {:?}",
            other.map(|t| t.shape().to_vec())
        ),
    }
    // empty maps have no matches
    let c = mutual_nn_counts(&f32s(&[3, 0, 2]), &f32s(&[3, 5, 2])).unwrap();
    assert_eq!(c.to_vec::<i64>().unwrap(), [0, 0, 0]);
    for device in all_devices() {
        assert_eq!(
            counts(&f32s(&[0, 4, 2]), &f32s(&[0, 5, 2]), &device),
            [0i64; 0]
        );
        assert_eq!(
            counts(&f32s(&[1, 4, 0]), &f32s(&[2, 5, 0]), &device),
            [0, 0]
        );
    }
}
