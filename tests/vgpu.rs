//! The virtual GPU proves itself with kernels/selftest.cu: every emulated feature gives the known
//! answer under the in-order schedule and under shuffled ones (seeds 1-4) with 1 and 2 OS
//! threads, and every deliberately broken kernel is caught, by an error that names the problem
//! and the source line, by NaN outputs, or by a wrong answer under a shuffled schedule.
//! With `VPR_VGPU_ASAN=1` (see README) the out-of-bounds kernels are also checked for
//! AddressSanitizer reports, in a child process since a report ends the process.
//!
//! `cargo test --test vgpu -- --ignored --nocapture vgpu_timings` prints emulator timings.

mod common;

use half::{bf16, f16};
use std::sync::Arc;
use std::time::Instant;
use vpr_engine::device::kernels::module_of;
use vpr_engine::device::vgpu::built_with_asan;
use vpr_engine::device::{Gpu, GpuBuffer, KernelArgs, LaunchConfig, TensorMapDesc, VgpuOptions};
use vpr_engine::tensor::Rng;
use vpr_engine::{Device, Error};

/// (seed, OS threads): the in-order schedule and shuffled ones, on one and two threads.
const SCHEDULES: &[(u64, u32)] = &[
    (0, 1),
    (0, 2),
    (1, 1),
    (2, 2),
    (3, 1),
    (4, 2),
    (1, 2),
    (2, 1),
];

fn vgpu(seed: u64, os_threads: u32) -> Arc<Gpu> {
    let device = Device::vgpu_with(VgpuOptions {
        seed,
        os_threads,
        ..VgpuOptions::default()
    });
    device.gpu().expect("a vgpu device is a GPU").clone()
}

fn schedule_name(seed: u64, threads: u32) -> String {
    format!("seed {seed}, {threads} OS thread(s)")
}

fn launch(
    gpu: &Gpu,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    args: &mut KernelArgs,
) -> vpr_engine::Result<()> {
    gpu.launch(
        kernel,
        LaunchConfig {
            grid,
            block,
            shared_bytes: smem,
        },
        args,
    )
}

fn upload<T: bytemuck::Pod>(gpu: &Arc<Gpu>, data: &[T]) -> GpuBuffer {
    gpu.upload(bytemuck::cast_slice(data)).unwrap()
}

/// A poisoned (0xFF) output buffer of `n` elements of T.
fn output<T>(gpu: &Arc<Gpu>, n: usize) -> GpuBuffer {
    gpu.alloc(n * std::mem::size_of::<T>()).unwrap()
}

fn download<T: bytemuck::Pod>(gpu: &Gpu, buf: &GpuBuffer) -> Vec<T> {
    let bytes = gpu.download(buf, 0, buf.len_bytes()).unwrap();
    bytes
        .chunks_exact(std::mem::size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

/// Line of `// @marker` in kernels/selftest.cu, as the emulator reports it ("selftest.cu:LINE").
fn site(marker: &str) -> String {
    let source = module_of("vgpu_shfl_i32").expect("selftest module").source;
    let tag = format!("// @{marker}");
    let line = source
        .lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .unwrap_or_else(|| panic!("no {tag} in selftest.cu"));
    format!("selftest.cu:{}", line + 1)
}

/// Runs a correct kernel on `gpu` to show that the device still works.
fn assert_healthy(gpu: &Arc<Gpu>, what: &str) {
    let x: Vec<f32> = (0..128).map(|i| (i % 7) as f32).collect();
    let xb = upload(gpu, &x);
    let out = output::<f32>(gpu, 2);
    launch(
        gpu,
        "vgpu_block_sum_f32",
        (2, 1, 1),
        (64, 1, 1),
        0,
        KernelArgs::new().ptr(&xb, 0).ptr(&out, 0),
    )
    .unwrap_or_else(|e| panic!("{what}: the device does not work after the failed launch: {e}"));
    let want: Vec<f32> = x.chunks(64).map(|c| c.iter().sum()).collect();
    assert_eq!(
        download::<f32>(gpu, &out),
        want,
        "{what}: wrong result after the failed launch"
    );
}

// ---------------------------------------------------------------- correct kernels

/// Source lane of `__shfl*_sync` for `lane`, from the PTX ISA pseudo-code of `shfl.sync` with the
/// `c` operand CUDA passes (`(32 - width) << 8`, or'ed with 0x1f except for `up`).
fn shfl_source(kind: i32, width: i32, arg: i32, lane: i32) -> i32 {
    let segmask = 32 - width;
    let cval = if kind == 3 { 0 } else { 0x1f };
    let b = arg & 0x1f;
    let max_lane = (lane & segmask) | (cval & !segmask);
    let min_lane = lane & segmask;
    let (j, valid) = match kind {
        0 | 4 => {
            let j = min_lane | (b & !segmask);
            (j, j <= max_lane)
        }
        1 => (lane ^ b, (lane ^ b) <= max_lane),
        2 => (lane + b, lane + b <= max_lane),
        _ => (lane - b, lane - b >= max_lane),
    };
    if valid {
        j
    } else {
        lane
    }
}

#[test]
fn shuffles_follow_cuda_semantics() {
    let mut cases = Vec::new();
    for width in [32, 16, 8] {
        for arg in [0, 1, 5, width - 1, width + 3, 31, 37] {
            cases.extend([0, width, arg]);
            cases.extend([4, width, arg]);
        }
        for arg in [1, 2, 5, 8, 16, 31, 33] {
            cases.extend([1, width, arg]);
        }
        for arg in [0, 1, 3, width / 2, width - 1, width, 33] {
            cases.extend([2, width, arg]);
            cases.extend([3, width, arg]);
        }
    }
    let n = cases.len() / 3;
    let threads = 64;
    let value = |tid: i32| 1000 * (tid >> 5) + (tid & 31) + 1;
    for &(seed, os) in SCHEDULES {
        let gpu = vgpu(seed, os);
        let cb = upload(&gpu, &cases);
        let out = output::<i32>(&gpu, n * threads);
        launch(
            &gpu,
            "vgpu_shfl_i32",
            (1, 1, 1),
            (threads as u32, 1, 1),
            0,
            KernelArgs::new().ptr(&cb, 0).push(n as i32).ptr(&out, 0),
        )
        .unwrap();
        let got = download::<i32>(&gpu, &out);
        for (c, case) in cases.chunks(3).enumerate() {
            let (kind, width, arg) = (case[0], case[1], case[2]);
            for tid in 0..threads as i32 {
                let src = (tid & !31) + shfl_source(kind, width, arg, tid & 31);
                let want = if kind == 4 {
                    4 * value(src) + 1
                } else {
                    value(src)
                };
                assert_eq!(
                    got[c * threads + tid as usize],
                    want,
                    "shuffle kind {kind} width {width} arg {arg} thread {tid} ({})",
                    schedule_name(seed, os)
                );
            }
        }
    }
}

#[test]
fn votes_and_syncwarp() {
    let seed = common::seed("votes_and_syncwarp");
    let mut rng = Rng::new(seed);
    let pred: Vec<i32> = (0..128)
        .map(|t| match t / 32 {
            1 => 1,
            2 => 0,
            _ => (rng.below(3) as i32) * (rng.below(2) as i32),
        })
        .collect();
    for &(s, os) in SCHEDULES {
        let gpu = vgpu(s, os);
        let pb = upload(&gpu, &pred);
        let out = output::<u32>(&gpu, 5 * 128);
        launch(
            &gpu,
            "vgpu_vote_u32",
            (1, 1, 1),
            (128, 1, 1),
            0,
            KernelArgs::new().ptr(&pb, 0).ptr(&out, 0),
        )
        .unwrap();
        let got = download::<u32>(&gpu, &out);
        for t in 0..128usize {
            let (w, lane) = (t / 32 * 32, t % 32);
            let ballot = (0..32)
                .filter(|&l| pred[w + l] != 0)
                .fold(0u32, |m, l| m | 1 << l);
            let half = if lane < 16 { ballot & 0xffff } else { 0 };
            let want = [
                ballot,
                (ballot == u32::MAX) as u32,
                (ballot != 0) as u32,
                half,
                3 * (w + (lane + 1) % 32) as u32 + 1,
            ];
            assert_eq!(
                &got[5 * t..5 * t + 5],
                &want,
                "thread {t} ({}; VPR_TEST_SEED={seed})",
                schedule_name(s, os)
            );
        }
    }
}

#[test]
fn atomics_across_blocks() {
    let (blocks, threads) = (10usize, 96usize);
    let n = blocks * threads;
    for &(seed, os) in SCHEDULES {
        let gpu = vgpu(seed, os);
        let fsum = upload(&gpu, &[0f32]);
        let isum = upload(&gpu, &[0i32]);
        let imax = upload(&gpu, &[-1i32]);
        let ticket = upload(&gpu, &[0i32]);
        let order = output::<i32>(&gpu, n);
        launch(
            &gpu,
            "vgpu_atomics_i32",
            (blocks as u32, 1, 1),
            (threads as u32, 1, 1),
            0,
            KernelArgs::new()
                .ptr(&fsum, 0)
                .ptr(&isum, 0)
                .ptr(&imax, 0)
                .ptr(&ticket, 0)
                .ptr(&order, 0),
        )
        .unwrap();
        let what = schedule_name(seed, os);
        assert_eq!(
            download::<f32>(&gpu, &fsum),
            [n as f32],
            "float atomicAdd ({what})"
        );
        assert_eq!(
            download::<i32>(&gpu, &isum),
            [(n * (n - 1) / 2) as i32],
            "int atomicAdd ({what})"
        );
        assert_eq!(
            download::<i32>(&gpu, &imax),
            [n as i32 - 1],
            "atomicMax ({what})"
        );
        assert_eq!(
            download::<i32>(&gpu, &ticket),
            [n as i32],
            "atomicCAS tickets ({what})"
        );
        let mut got = download::<i32>(&gpu, &order);
        got.sort_unstable();
        assert_eq!(
            got,
            (1..=n as i32).collect::<Vec<_>>(),
            "every atomicCAS ticket taken once ({what})"
        );
    }
}

#[test]
fn block_reduction_static_and_dynamic_shared() {
    let seed = common::seed("block_reduction_static_and_dynamic_shared");
    let mut rng = Rng::new(seed);
    let blocks = 6usize;
    let x: Vec<f32> = (0..blocks * 256)
        .map(|_| rng.below(101) as f32 - 50.0)
        .collect();
    for &(s, os) in SCHEDULES {
        let gpu = vgpu(s, os);
        let xb = upload(&gpu, &x);
        for (kernel, threads) in [
            ("vgpu_block_sum_f32", 256usize),
            ("vgpu_block_sum_f32", 64),
            ("vgpu_block_sum_dyn_f32", 128),
            ("vgpu_block_sum_dyn_f32", 32),
        ] {
            let smem = if kernel.contains("dyn") {
                4 * threads as u32
            } else {
                0
            };
            let out = output::<f32>(&gpu, blocks);
            launch(
                &gpu,
                kernel,
                (blocks as u32, 1, 1),
                (threads as u32, 1, 1),
                smem,
                KernelArgs::new().ptr(&xb, 0).ptr(&out, 0),
            )
            .unwrap();
            let want: Vec<f32> = x[..blocks * threads]
                .chunks(threads)
                .map(|c| c.iter().sum())
                .collect();
            assert_eq!(
                download::<f32>(&gpu, &out),
                want,
                "{kernel} with {threads} threads ({}; VPR_TEST_SEED={seed})",
                schedule_name(s, os)
            );
        }
    }
}

/// Small integers: exact in bf16 and f16, and every product and sum of the tests is exact in f32.
fn small_ints(rng: &mut Rng, n: usize, range: i64) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(2 * range as u64 + 1) as i64 - range) as f32)
        .collect()
}

/// C + A B for row-major A (m x k), B (k x n), C (m x n).
fn matmul_add(a: &[f32], b: &[f32], c: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    (0..m * n)
        .map(|i| {
            c[i] + (0..k)
                .map(|p| a[i / n * k + p] * b[p * n + i % n])
                .sum::<f32>()
        })
        .collect()
}

#[test]
fn mma_m16n8k16_exact_on_integer_data() {
    let seed = common::seed("mma_m16n8k16_exact_on_integer_data");
    let mut rng = Rng::new(seed);
    let tiles = 4; // 2 blocks of 2 warps
    let a = small_ints(&mut rng, 256 * tiles, 8);
    let b = small_ints(&mut rng, 128 * tiles, 8);
    let c = small_ints(&mut rng, 128 * tiles, 100);
    let want: Vec<f32> = (0..tiles)
        .flat_map(|t| {
            matmul_add(
                &a[256 * t..][..256],
                &b[128 * t..][..128],
                &c[128 * t..][..128],
                16,
                16,
                8,
            )
        })
        .collect();
    let (a2, b2, c2) = (
        small_ints(&mut rng, 256, 8),
        small_ints(&mut rng, 256, 8),
        small_ints(&mut rng, 256, 100),
    );
    let want2 = matmul_add(&a2, &b2, &c2, 16, 16, 16);
    for &(s, os) in SCHEDULES {
        let gpu = vgpu(s, os);
        let what = format!("{}; VPR_TEST_SEED={seed}", schedule_name(s, os));
        let cb = upload(&gpu, &c);
        for kernel in ["vgpu_mma_bf16", "vgpu_mma_f16"] {
            let (ab, bb) = if kernel.ends_with("bf16") {
                let cvt = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
                (upload(&gpu, &cvt(&a)), upload(&gpu, &cvt(&b)))
            } else {
                let cvt = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
                (upload(&gpu, &cvt(&a)), upload(&gpu, &cvt(&b)))
            };
            let d = output::<f32>(&gpu, 128 * tiles);
            launch(
                &gpu,
                kernel,
                (2, 1, 1),
                (64, 1, 1),
                0,
                KernelArgs::new()
                    .ptr(&ab, 0)
                    .ptr(&bb, 0)
                    .ptr(&cb, 0)
                    .ptr(&d, 0),
            )
            .unwrap();
            assert_eq!(download::<f32>(&gpu, &d), want, "{kernel} ({what})");
        }
        let cvt = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let (ab, bb, cb2) = (
            upload(&gpu, &cvt(&a2)),
            upload(&gpu, &cvt(&b2)),
            upload(&gpu, &c2),
        );
        let d = output::<f32>(&gpu, 256);
        launch(
            &gpu,
            "vgpu_mma_ldmatrix_bf16",
            (1, 1, 1),
            (32, 1, 1),
            0,
            KernelArgs::new()
                .ptr(&ab, 0)
                .ptr(&bb, 0)
                .ptr(&cb2, 0)
                .ptr(&d, 0),
        )
        .unwrap();
        assert_eq!(
            download::<f32>(&gpu, &d),
            want2,
            "vgpu_mma_ldmatrix_bf16 ({what})"
        );
    }
}

/// Dynamic shared memory of the wgmma self-test kernels: 16 KB of tiles and 1 KB to align them.
const WGMMA_SMEM: u32 = 17 * 1024;

/// wgmma.m64n256k16 with a K-major A and an MN-major B, through descriptors and the 128-byte
/// swizzle, lands every product in the fragment the PTX ISA gives it.
#[test]
fn wgmma_m64n256k16_exact_on_integer_data() {
    let seed = common::seed("wgmma_m64n256k16_exact_on_integer_data");
    let mut rng = Rng::new(seed);
    let a = small_ints(&mut rng, 64 * 16, 8);
    let b = small_ints(&mut rng, 16 * 256, 8);
    let want = matmul_add(&a, &b, &[0.0; 64 * 256], 64, 16, 256);
    let cvt = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    for &(s, os) in SCHEDULES {
        let gpu = vgpu(s, os);
        let (ab, bb) = (upload(&gpu, &cvt(&a)), upload(&gpu, &cvt(&b)));
        let d = output::<f32>(&gpu, 64 * 256);
        launch(
            &gpu,
            "vgpu_wgmma_bf16",
            (1, 1, 1),
            (128, 1, 1),
            WGMMA_SMEM,
            KernelArgs::new().ptr(&ab, 0).ptr(&bb, 0).ptr(&d, 0),
        )
        .unwrap();
        assert_eq!(
            download::<f32>(&gpu, &d),
            want,
            "vgpu_wgmma_bf16 ({}; VPR_TEST_SEED={seed})",
            schedule_name(s, os)
        );
    }
}

#[test]
fn wgmma_misuse_is_reported() {
    let at = site("wgmma");
    let cases: [(&str, &[&str]); 7] = [
        ("no_fence", &["without a wgmma.fence"]),
        (
            "no_proxy_fence",
            &["fence.proxy.async", "filled by cp.async"],
        ),
        (
            "plain_store",
            &["stored by the generic proxy", "fence.proxy.async"],
        ),
        ("overwrite", &["overwritten before"]),
        (
            "accumulator_write",
            &["accumulators", "written before wgmma.wait_group"],
        ),
        ("no_wait", &["never waited for"]),
        ("divergent", &["divergent wgmma"]),
    ];
    for (bug, needles) in cases {
        let mut needles = needles.to_vec();
        needles.push(&at);
        // 20 blocks of 128 threads: `out` holds the 10 KB of operands the kernel reads
        assert_caught(
            &format!("vgpu_bug_wgmma_{bug}_f32"),
            20,
            128,
            WGMMA_SMEM,
            &needles,
        );
    }
}

/// A bf16 tensor of 100 x 20 x 2 (innermost first; rows padded to 104 elements, since TMA strides
/// are multiples of 16 bytes) holding its own storage index mod 251, with its tensor map; and what
/// the 64 x 16 box at (x, y, z) must hold: the elements inside, zeros outside.
fn tma_tensor(gpu: &Arc<Gpu>) -> (GpuBuffer, [u64; 16]) {
    let data: Vec<bf16> = (0..104 * 20 * 2)
        .map(|i| bf16::from_f32((i % 251) as f32))
        .collect();
    let buf = upload(gpu, &data);
    let map = gpu
        .encode_tensor_map(&TensorMapDesc {
            bf16: true,
            address: buf.device_ptr(),
            dims: [100, 20, 2],
            strides: [208, 4160],
            box_dims: [64, 16, 1],
        })
        .unwrap();
    (buf, map)
}

fn tma_box(x: i32, y: i32, z: i32) -> Vec<f32> {
    let mut want = vec![0.0; 64 * 16];
    for r in 0..16 {
        for c in 0..64 {
            let (gx, gy) = (x + c, y + r);
            if (0..100).contains(&gx) && (0..20).contains(&gy) && (0..2).contains(&z) {
                want[(r * 64 + c) as usize] = ((gx + 104 * gy + 2080 * z) % 251) as f32;
            }
        }
    }
    want
}

fn launch_tma(
    gpu: &Arc<Gpu>,
    map: [u64; 16],
    (x, y, z): (i32, i32, i32),
    out: &GpuBuffer,
    bug: i32,
) -> vpr_engine::Result<()> {
    launch(
        gpu,
        "vgpu_tma_bf16",
        (1, 1, 1),
        (128, 1, 1),
        3 * 1024 + 64,
        KernelArgs::new()
            .push(map)
            .push(x)
            .push(y)
            .push(z)
            .ptr(out, 0)
            .push(bug),
    )
}

/// TMA boxes land in shared memory densely, 128-byte swizzled, with zeros outside the tensor
/// (negative coordinates included), when the mbarrier phase completes.
#[test]
fn tma_boxes_follow_the_tensor_map() {
    for &(s, os) in SCHEDULES {
        let gpu = vgpu(s, os);
        let (_data, map) = tma_tensor(&gpu);
        for at in [(0, 0, 0), (8, 3, 1), (60, 10, 0), (-5, -2, 1), (90, 18, 1)] {
            let out = output::<f32>(&gpu, 64 * 16);
            launch_tma(&gpu, map, at, &out, 0).unwrap();
            assert_eq!(
                download::<f32>(&gpu, &out),
                tma_box(at.0, at.1, at.2),
                "box at {at:?} ({})",
                schedule_name(s, os)
            );
        }
    }
}

/// The virtual GPU refuses the tensor maps the driver would refuse.
#[test]
fn tensor_maps_outside_the_tma_limits_are_refused() {
    let gpu = vgpu(0, 1);
    let ok = TensorMapDesc {
        bf16: true,
        address: 1 << 20,
        dims: [100, 20, 2],
        strides: [208, 4160],
        box_dims: [64, 16, 1],
    };
    assert!(gpu.encode_tensor_map(&ok).is_ok());
    let bad = [
        TensorMapDesc {
            address: (1 << 20) + 8,
            ..ok
        },
        TensorMapDesc {
            strides: [200, 4160],
            ..ok
        },
        TensorMapDesc {
            box_dims: [128, 16, 1],
            ..ok
        },
        TensorMapDesc {
            box_dims: [64, 512, 1],
            ..ok
        },
        TensorMapDesc {
            dims: [100, 0, 2],
            ..ok
        },
    ];
    for desc in bad {
        assert!(
            gpu.encode_tensor_map(&desc).is_err(),
            "{desc:?} was accepted"
        );
    }
}

#[test]
fn mbarrier_and_tma_misuse_is_reported() {
    let cases: [(i32, &[&str]); 4] = [
        (
            1,
            &["never completed", "no thread waited", &site("tma-load")],
        ),
        (2, &["deadlock", "wait on the mbarrier", &site("tma-wait")]),
        // whichever thread touches the barrier first reports it
        (3, &["no initialised mbarrier", "selftest.cu"]),
        (4, &["more arrivals", &site("tma-extra-arrive")]),
    ];
    for (bug, needles) in cases {
        for &(s, os) in &SCHEDULES[..4] {
            let gpu = vgpu(s, os);
            let (_data, map) = tma_tensor(&gpu);
            let out = output::<f32>(&gpu, 64 * 16);
            let msg = launch_tma(&gpu, map, (0, 0, 0), &out, bug)
                .expect_err(&format!("bug {bug} must fail ({})", schedule_name(s, os)))
                .to_string();
            for n in needles {
                assert!(msg.contains(n), "bug {bug}: {msg:?} does not mention {n:?}");
            }
            assert_healthy(&gpu, "vgpu_tma_bf16");
        }
    }
}

#[test]
fn ldmatrix_fragments_follow_the_ptx_layout() {
    // Distinct values, so that any element in the wrong place shows.
    let src: Vec<u16> = (0..32 * 16).map(|i| (i * 97 + 13) as u16).collect();
    // Row r of matrix j is row 8j + r of the tile, from column 8 * (row & 1).
    let elem =
        |j: usize, r: usize, c: usize| u32::from(src[(8 * j + r) * 16 + 8 * ((8 * j + r) & 1) + c]);
    for &(seed, os) in SCHEDULES {
        let gpu = vgpu(seed, os);
        let sb = upload(&gpu, &src);
        let out = output::<u32>(&gpu, 6 * 32 * 4);
        launch(
            &gpu,
            "vgpu_ldmatrix_u32",
            (1, 1, 1),
            (32, 1, 1),
            0,
            KernelArgs::new().ptr(&sb, 0).ptr(&out, 0),
        )
        .unwrap();
        let got = download::<u32>(&gpu, &out);
        for v in 0..6 {
            let (count, trans) = (1 << (v % 3), v >= 3);
            for lane in 0..32 {
                for reg in 0..4 {
                    // PTX ISA: lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of matrix `reg`;
                    // with .trans rows 2(l%4) and 2(l%4)+1 of column l/4.
                    let want = if reg >= count {
                        0
                    } else if trans {
                        elem(reg, 2 * (lane % 4), lane / 4)
                            | elem(reg, 2 * (lane % 4) + 1, lane / 4) << 16
                    } else {
                        elem(reg, lane / 4, 2 * (lane % 4))
                            | elem(reg, lane / 4, 2 * (lane % 4) + 1) << 16
                    };
                    assert_eq!(
                        got[(v * 32 + lane) * 4 + reg],
                        want,
                        "ldmatrix x{count}{} lane {lane} register {reg} ({})",
                        if trans { ".trans" } else { "" },
                        schedule_name(seed, os)
                    );
                }
            }
        }
    }
}

#[test]
fn cp_async_wait_group_order_and_zero_fill() {
    let seed = common::seed("cp_async_wait_group_order_and_zero_fill");
    let mut rng = Rng::new(seed);
    for &(s, os) in SCHEDULES {
        let gpu = vgpu(s, os);
        for valid in [256usize, 255, 254, 253, 130, 0] {
            // exactly 256 + valid floats, so that reading past them would be out of bounds
            let input: Vec<f32> = (0..256 + valid)
                .map(|_| rng.below(1000) as f32 + 1.0)
                .collect();
            let ib = upload(&gpu, &input);
            let out = output::<f32>(&gpu, 512);
            let early = output::<f32>(&gpu, 64);
            launch(
                &gpu,
                "vgpu_cp_async_f32",
                (1, 1, 1),
                (64, 1, 1),
                0,
                KernelArgs::new()
                    .ptr(&ib, 0)
                    .push(valid as i32)
                    .ptr(&out, 0)
                    .ptr(&early, 0),
            )
            .unwrap();
            let got = download::<f32>(&gpu, &out);
            let what = format!(
                "valid {valid} ({}; VPR_TEST_SEED={seed})",
                schedule_name(s, os)
            );
            for i in 0..256 {
                let j = (i + 4) % 256;
                assert_eq!(got[i], input[j], "stage 0 element {i}, {what}");
                let want1 = if j < valid { input[256 + j] } else { 0.0 };
                assert_eq!(
                    got[256 + i],
                    want1,
                    "stage 1 element {i} (zero-filled past {valid}), {what}"
                );
            }
            assert!(
                download::<f32>(&gpu, &early).iter().all(|v| v.is_nan()),
                "stage 1 visible before its wait_group: {what}"
            );
        }
    }
}

#[test]
fn partial_warps() {
    for &(seed, os) in SCHEDULES {
        let gpu = vgpu(seed, os);
        for threads in [48usize, 70, 1] {
            let out = output::<i32>(&gpu, 3 * threads * 2);
            launch(
                &gpu,
                "vgpu_partial_warp_i32",
                (2, 1, 1),
                (threads as u32, 1, 1),
                0,
                KernelArgs::new().ptr(&out, 0),
            )
            .unwrap();
            let got = download::<i32>(&gpu, &out);
            for (i, o) in got.chunks(3).enumerate() {
                let tid = i % threads;
                let (w, lane) = (tid / 32 * 32, tid % 32);
                let lanes = (threads - w).min(32);
                let odd = (0..lanes)
                    .filter(|l| l & 1 == 1)
                    .fold(0u32, |m, l| m | 1 << l);
                let sum = if lane == 0 {
                    (w + 1..=w + lanes).sum::<usize>() as i32
                } else {
                    0
                };
                assert_eq!(
                    o,
                    [odd as i32, sum, (w + lanes - 1) as i32],
                    "{threads} threads, thread {i} ({})",
                    schedule_name(seed, os)
                );
            }
        }
    }
}

#[test]
fn blocks_and_grids_in_3d() {
    let (block, grid) = ((5u32, 3u32, 3u32), (3u32, 2u32, 2u32));
    let nt = (block.0 * block.1 * block.2) as usize;
    let nb = (grid.0 * grid.1 * grid.2) as usize;
    let pack = |x: u32, y: u32, z: u32| x | y << 10 | z << 20;
    for &(seed, os) in SCHEDULES {
        let gpu = vgpu(seed, os);
        let out = output::<u32>(&gpu, 8 * nt * nb);
        launch(
            &gpu,
            "vgpu_index3d_u32",
            grid,
            block,
            0,
            KernelArgs::new().ptr(&out, 0),
        )
        .unwrap();
        let got = download::<u32>(&gpu, &out);
        for b in 0..nb as u32 {
            let (bx, by, bz) = (b % grid.0, b / grid.0 % grid.1, b / (grid.0 * grid.1));
            for t in 0..nt as u32 {
                let (tx, ty, tz) = (t % block.0, t / block.0 % block.1, t / (block.0 * block.1));
                let lanes = (nt as u32 - (t & !31)).min(32);
                let mask = if lanes == 32 {
                    u32::MAX
                } else {
                    (1 << lanes) - 1
                };
                let want = [
                    pack(tx, ty, tz),
                    pack(bx, by, bz),
                    pack(block.0, block.1, block.2),
                    pack(grid.0, grid.1, grid.2),
                    7 * (nt as u32 - 1 - t),
                    mask,
                    t & !31,
                    b,
                ];
                let at = 8 * (b as usize * nt + t as usize);
                assert_eq!(
                    &got[at..at + 8],
                    &want,
                    "block {b} thread {t} ({})",
                    schedule_name(seed, os)
                );
            }
        }
    }
}

// ---------------------------------------------------------------- broken kernels

/// Runs a broken kernel under several schedules and checks the emulator's error: it names the
/// kernel, contains every one of `needles`, and names the seed when one is set. The device must
/// work again afterwards.
fn assert_caught(kernel: &str, grid: u32, block: u32, smem: u32, needles: &[&str]) {
    for &(seed, os) in &SCHEDULES[..6] {
        let gpu = vgpu(seed, os);
        let out = output::<f32>(&gpu, (grid * block) as usize);
        let err = launch(
            &gpu,
            kernel,
            (grid, 1, 1),
            (block, 1, 1),
            smem,
            KernelArgs::new().ptr(&out, 0),
        )
        .expect_err(&format!("{kernel} must fail ({})", schedule_name(seed, os)));
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Vgpu { .. }),
            "{kernel}: not a virtual GPU error: {msg}"
        );
        assert!(
            msg.contains(kernel),
            "the error does not name {kernel}: {msg}"
        );
        for n in needles {
            assert!(
                msg.contains(n),
                "{kernel} ({}): error does not mention {n:?}: {msg}",
                schedule_name(seed, os)
            );
        }
        if seed != 0 {
            assert!(
                msg.contains(&format!("VPR_VGPU_SEED={seed}")),
                "the error does not name the seed: {msg}"
            );
        }
        assert_healthy(&gpu, kernel);
    }
}

#[test]
fn divergent_barrier_is_reported() {
    let (a, b) = (site("divergent-a"), site("divergent-b"));
    assert_caught(
        "vgpu_bug_divergent_barrier_f32",
        1,
        256,
        0,
        &["divergent __syncthreads", &a, &b],
    );
}

#[test]
fn early_exit_before_barrier_is_reported() {
    let at = site("early-exit");
    assert_caught(
        "vgpu_bug_early_exit_f32",
        2,
        256,
        0,
        &[
            "56 of 256 threads exited without reaching __syncthreads",
            &at,
        ],
    );
    // The lenient mode counts exited threads as arrived, as most GPUs happen to.
    let device = Device::vgpu_with(VgpuOptions {
        lenient_barrier: true,
        ..VgpuOptions::with_seed(3)
    });
    let gpu = device.gpu().unwrap();
    let out = output::<f32>(gpu, 256);
    launch(
        gpu,
        "vgpu_bug_early_exit_f32",
        (1, 1, 1),
        (256, 1, 1),
        0,
        KernelArgs::new().ptr(&out, 0),
    )
    .unwrap();
    let got = download::<f32>(gpu, &out);
    assert!(got[..200].iter().all(|&v| v == 1.0) && got[200..].iter().all(|v| v.is_nan()));
}

#[test]
fn shuffle_after_lanes_exited_is_reported() {
    // Depending on the order, either a lane exits while the others wait in the shuffle, or the
    // shuffle starts with a mask that names exited lanes: both messages name the shuffle.
    let at = site("shfl-after-exit");
    assert_caught(
        "vgpu_bug_shfl_after_exit_f32",
        1,
        64,
        0,
        &["shuffle", "exited", &at],
    );
}

#[test]
fn mma_in_partial_warp_is_reported() {
    let at = site("mma-partial");
    assert_caught(
        "vgpu_bug_mma_partial_warp_f32",
        1,
        48,
        0,
        &["mma.sync", "partial warp", &at],
    );
}

#[test]
fn misaligned_ldmatrix_is_reported() {
    let at = site("ldmatrix-misaligned");
    assert_caught(
        "vgpu_bug_ldmatrix_misaligned_f32",
        1,
        32,
        0,
        &["ldmatrix", "not 16-byte aligned", &at],
    );
}

#[test]
fn warp_op_waiting_on_barrier_deadlock_is_reported() {
    let (bar, shfl) = (site("deadlock-barrier"), site("deadlock-shfl"));
    assert_caught(
        "vgpu_bug_warp_barrier_deadlock_f32",
        2,
        64,
        0,
        &["deadlock", "__syncthreads", "shuffle", &bar, &shfl],
    );
}

#[test]
fn missing_barrier_is_caught_by_shuffled_schedules() {
    let seed = common::seed("missing_barrier_is_caught_by_shuffled_schedules");
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = (0..256).map(|_| rng.below(100) as f32).collect();
    let want: Vec<f32> = (0..256)
        .map(|i| x[i] + if i > 0 { x[i - 1] } else { 0.0 })
        .collect();
    let wrong = |s: u64, os: u32| {
        let gpu = vgpu(s, os);
        let xb = upload(&gpu, &x);
        let y = output::<f32>(&gpu, 256);
        launch(
            &gpu,
            "vgpu_bug_stencil_f32",
            (1, 1, 1),
            (256, 1, 1),
            0,
            KernelArgs::new().ptr(&xb, 0).ptr(&y, 0),
        )
        .unwrap();
        download::<f32>(&gpu, &y)
            .iter()
            .zip(&want)
            .filter(|(g, w)| g != w)
            .count()
    };
    // In order, each thread runs to completion before the next starts, so every neighbour's value
    // is already there: the race is invisible.
    assert_eq!(wrong(0, 1), 0, "the in-order schedule hides the race");
    // Shuffled, a thread often runs before its left neighbour and reads poison.
    let counts: Vec<usize> = (1..=8).map(|s| wrong(s, 1 + (s % 2) as u32)).collect();
    assert!(
        counts.iter().all(|&c| c > 0),
        "missing barrier not caught by every seed: wrong outputs per seed {counts:?}"
    );
}

#[test]
fn shared_overflow_and_missing_cp_async_wait_show_as_nan() {
    for &(seed, os) in SCHEDULES {
        let gpu = vgpu(seed, os);
        let what = schedule_name(seed, os);
        let input: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let ib = upload(&gpu, &input);
        let out = output::<f32>(&gpu, 128);
        launch(
            &gpu,
            "vgpu_bug_cp_async_no_wait_f32",
            (1, 1, 1),
            (128, 1, 1),
            0,
            KernelArgs::new().ptr(&ib, 0).ptr(&out, 0),
        )
        .unwrap();
        let nan = download::<f32>(&gpu, &out)
            .iter()
            .filter(|v| v.is_nan())
            .count();
        assert_eq!(
            nan, 128,
            "missing cp.async wait: every read of the stage must be poison ({what})"
        );
        if built_with_asan() {
            continue; // the overflow would end the process: see asan_reports_out_of_bounds_accesses
        }
        let out = output::<f32>(&gpu, 256);
        launch(
            &gpu,
            "vgpu_bug_smem_overflow_f32",
            (1, 1, 1),
            (256, 1, 1),
            0,
            KernelArgs::new().ptr(&out, 0),
        )
        .unwrap();
        let got = download::<f32>(&gpu, &out);
        assert!(
            got[..8].iter().all(|v| v.is_nan()),
            "EMU_SHARED overflow: the unwritten head must be poison ({what})"
        );
        assert!(
            got[8..].iter().all(|&v| v == 1.0),
            "EMU_SHARED overflow ({what})"
        );
    }
}

// ---------------------------------------------------------------- launch configuration

#[test]
fn bad_launch_configurations_are_errors() {
    let gpu = vgpu(0, 2);
    let x = upload(&gpu, &[1f32; 1024]);
    let out = output::<f32>(&gpu, 1024);
    type Dims = (u32, u32, u32);
    let cases: &[(Dims, Dims, u32, &str)] = &[
        ((1, 1, 1), (0, 1, 1), 0, "invalid block (0,1,1)"),
        ((1, 1, 1), (1025, 1, 1), 0, "invalid block (1025,1,1)"),
        ((1, 1, 1), (32, 32, 2), 0, "invalid block (32,32,2)"),
        ((0, 1, 1), (32, 1, 1), 0, "invalid grid (0,1,1)"),
        (
            (1, 1, 1),
            (32, 1, 1),
            300 * 1024,
            "dynamic shared memory 307200 bytes exceeds",
        ),
        // 1 KiB of EMU_SHARED plus 227 KiB of dynamic shared memory
        (
            (1, 1, 1),
            (256, 1, 1),
            227 * 1024,
            "exceed the 232448-byte limit",
        ),
    ];
    for &(grid, block, smem, needle) in cases {
        let err = launch(
            &gpu,
            "vgpu_block_sum_f32",
            grid,
            block,
            smem,
            KernelArgs::new().ptr(&x, 0).ptr(&out, 0),
        )
        .expect_err(&format!(
            "grid {grid:?} block {block:?} smem {smem} must fail"
        ));
        assert!(
            matches!(err, Error::Vgpu { .. }) && err.to_string().contains(needle),
            "want {needle:?}, got: {err}"
        );
        assert_healthy(&gpu, needle);
    }
    let err = launch(
        &gpu,
        "vgpu_no_such_kernel",
        (1, 1, 1),
        (32, 1, 1),
        0,
        &mut KernelArgs::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("vgpu_no_such_kernel"), "{err}");
}

// ---------------------------------------------------------------- AddressSanitizer

/// Helper for `asan_reports_out_of_bounds_accesses`: runs the out-of-bounds kernel named by
/// `VPR_VGPU_ASAN_CHILD` in a child process, where AddressSanitizer ends the process.
#[test]
#[ignore = "run by asan_reports_out_of_bounds_accesses in a child process"]
fn asan_child() {
    let gpu = vgpu(0, 1);
    match std::env::var("VPR_VGPU_ASAN_CHILD").as_deref() {
        Ok("shared") => {
            let out = output::<f32>(&gpu, 256);
            launch(
                &gpu,
                "vgpu_bug_smem_overflow_f32",
                (1, 1, 1),
                (256, 1, 1),
                0,
                KernelArgs::new().ptr(&out, 0),
            )
            .unwrap();
        }
        Ok("global") => {
            let x = upload(&gpu, &[1f32; 100]);
            let y = output::<f32>(&gpu, 100);
            launch(
                &gpu,
                "vgpu_bug_global_oob_f32",
                (1, 1, 1),
                (128, 1, 1),
                0,
                KernelArgs::new().ptr(&x, 0).ptr(&y, 0).push(100i32),
            )
            .unwrap();
        }
        other => panic!("VPR_VGPU_ASAN_CHILD must be shared or global, not {other:?}"),
    }
}

#[test]
fn asan_reports_out_of_bounds_accesses() {
    if !built_with_asan() {
        eprintln!("asan_reports_out_of_bounds_accesses: skipped, the virtual GPU was built without VPR_VGPU_ASAN=1");
        return;
    }
    for (which, kind, at) in [
        ("shared", "use-after-poison", site("smem-overflow")),
        ("global", "heap-buffer-overflow", site("global-oob")),
    ] {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "asan_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VPR_VGPU_ASAN_CHILD", which)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&child.stderr);
        assert!(
            !child.status.success(),
            "{which} out-of-bounds access not reported; child stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("ERROR: AddressSanitizer: {kind}")) && stderr.contains(&at),
            "{which}: want an AddressSanitizer {kind} report at {at}; child stderr:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------- timings

/// Best of three wall-clock times of `f`, in seconds.
fn best_of_3(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "prints timings; run with --ignored --nocapture"]
fn vgpu_timings() {
    let cases: Vec<i32> = (0..200).flat_map(|i| [1, 32, 1 + i % 31]).collect();
    let x: Vec<f32> = (0..256 * 256).map(|i| (i % 13) as f32).collect();
    let mut rng = Rng::new(1);
    let a: Vec<bf16> = small_ints(&mut rng, 256, 8)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let c = vec![0f32; 256];
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>12}",
        "kernel", "seed 0, 1 thr", "seed 0, 2 thr", "seed 1, 1 thr", "seed 1, 2 thr"
    );
    type Run = Box<dyn Fn(&Arc<Gpu>)>;
    let shfl_cases = cases.clone();
    let runs: Vec<(&str, Run)> = vec![
        (
            "block_sum 256 blocks x 256 thr (10 barriers)",
            Box::new(move |gpu: &Arc<Gpu>| {
                let (xb, out) = (upload(gpu, &x), output::<f32>(gpu, 256));
                launch(
                    gpu,
                    "vgpu_block_sum_f32",
                    (256, 1, 1),
                    (256, 1, 1),
                    0,
                    KernelArgs::new().ptr(&xb, 0).ptr(&out, 0),
                )
                .unwrap();
            }),
        ),
        (
            "shfl xor, 200 per thread, 8 blocks x 1024 thr",
            Box::new(move |gpu: &Arc<Gpu>| {
                let (cb, out) = (upload(gpu, &shfl_cases), output::<i32>(gpu, 200 * 1024));
                launch(
                    gpu,
                    "vgpu_shfl_i32",
                    (8, 1, 1),
                    (1024, 1, 1),
                    0,
                    KernelArgs::new().ptr(&cb, 0).push(200i32).ptr(&out, 0),
                )
                .unwrap();
            }),
        ),
        (
            "mma+ldmatrix 16x16x16, 256 launches",
            Box::new(move |gpu: &Arc<Gpu>| {
                let (ab, cb, d) = (upload(gpu, &a), upload(gpu, &c), output::<f32>(gpu, 256));
                for _ in 0..256 {
                    launch(
                        gpu,
                        "vgpu_mma_ldmatrix_bf16",
                        (1, 1, 1),
                        (32, 1, 1),
                        0,
                        KernelArgs::new()
                            .ptr(&ab, 0)
                            .ptr(&ab, 0)
                            .ptr(&cb, 0)
                            .ptr(&d, 0),
                    )
                    .unwrap();
                }
            }),
        ),
    ];
    for (name, run) in &runs {
        let times: Vec<String> = [(0, 1), (0, 2), (1, 1), (1, 2)]
            .iter()
            .map(|&(s, os)| {
                let gpu = vgpu(s, os);
                format!("{:.1} ms", 1e3 * best_of_3(|| run(&gpu)))
            })
            .collect();
        println!(
            "{name:<44} {:>12} {:>12} {:>12} {:>12}",
            times[0], times[1], times[2], times[3]
        );
    }
    // Each shuffle parks every lane once and resumes it once: time per (thread x shuffle).
    for (s, label) in [(0u64, "in order"), (1, "shuffled")] {
        let gpu = vgpu(s, 1);
        let (cb, out) = (upload(&gpu, &cases), output::<i32>(&gpu, 200 * 1024));
        let t = best_of_3(|| {
            launch(
                &gpu,
                "vgpu_shfl_i32",
                (1, 1, 1),
                (1024, 1, 1),
                0,
                KernelArgs::new().ptr(&cb, 0).push(200i32).ptr(&out, 0),
            )
            .unwrap();
        });
        println!(
            "fiber park + resume incl. scheduler and shuffle, {label}: {:.0} ns",
            t * 1e9 / (200.0 * 1024.0)
        );
    }
}

/// Every kernel of `vpr-engine check` under shuffled schedules (a fresh seed and one from the
/// test's seed each run, two OS threads): a missing barrier or a stage refilled too early gives a
/// wrong answer or an emulator error here, where the in-order schedule of the other tests hides it.
#[test]
fn every_kernel_passes_check_under_shuffled_schedules() {
    let s = common::seed("shuffled check");
    for schedule in [s % 1000 + 1, s / 1000 % 1000 + 1001] {
        let device = Device::vgpu_with(VgpuOptions {
            seed: schedule,
            os_threads: 2,
            ..VgpuOptions::default()
        });
        let rows = vpr_engine::check::run(&device, s);
        // an empty table would pass the assertion below without running a kernel
        assert!(
            !rows.is_empty(),
            "VPR_VGPU_SEED={schedule}: check ran no rows"
        );
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| !r.passed())
            .map(|r| {
                format!(
                    "{} {} {}: {:e} {:?}",
                    r.kernel, r.dtype, r.shape, r.max_err, r.error
                )
            })
            .collect();
        assert!(
            failed.is_empty(),
            "VPR_VGPU_SEED={schedule}, VPR_TEST_SEED={s}:\n{}",
            failed.join("\n")
        );
    }
}
