//! `cargo bench --bench matmul`: matrix multiplication throughput.
//!
//! CPU: our f32 (and bf16) matmul against the `gemm` crate called directly and a naive f64 triple
//! loop, in GFLOP/s. GPU (only when `Device::new("cuda")` succeeds): our bf16, f16 and f32 kernels
//! against cuBLASLt in the same run, in TFLOP/s, on square sizes and ViT-shaped linear layers
//! (M = batch * 197 or batch * 1370 tokens). Times are medians of several runs after warm-up; a
//! GPU run is timed from launch to `synchronize`. On compute capability 9.0 bf16/f16 run on each
//! tensor-core family: wgmma fed by TMA (the default there), wgmma fed by cp.async, mma.sync.

use std::time::Instant;
use vpr_engine::ops::matmul::{tensor_core_paths, with_tensor_core_path, TensorCorePath};
use vpr_engine::{DType, Device, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `runs` calls of `f` after `warmup` calls.
fn time(warmup: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

fn naive_f64(a: &[f64], b: &[f64], c: &mut [f64], n: usize) {
    c.iter_mut().for_each(|v| *v = 0.0);
    for i in 0..n {
        for p in 0..n {
            let x = a[i * n + p];
            for j in 0..n {
                c[i * n + j] += x * b[p * n + j];
            }
        }
    }
}

fn cpu_bench() {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    println!("## CPU ({threads} threads): square n x n x n, GFLOP/s (median)\n");
    println!("| n | ours f32 | gemm crate f32 | ours / gemm | naive f64 | ours bf16 |");
    println!("|---|---|---|---|---|---|");
    for n in [128, 256, 512, 1024] {
        let runs = if n >= 1024 { 5 } else { 15 };
        let a = Tensor::rand_uniform(&[n, n], -1.0, 1.0, 1, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::rand_uniform(&[n, n], -1.0, 1.0, 2, DType::F32, &Device::Cpu).unwrap();
        let ours = time(2, runs, || drop(a.matmul(&b).unwrap()));

        let (av, bv) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let mut cv = vec![0f32; n * n];
        let direct = time(2, runs, || {
            // SAFETY: three dense n x n row-major matrices.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    n,
                    cv.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    av.as_ptr(),
                    1,
                    n as isize,
                    bv.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            }
        });

        let (a64, b64) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
        let mut c64 = vec![0f64; n * n];
        let naive = time(0, if n >= 1024 { 1 } else { 3 }, || {
            naive_f64(&a64, &b64, &mut c64, n)
        });

        let (ah, bh) = (
            a.to_dtype(DType::BF16).unwrap(),
            b.to_dtype(DType::BF16).unwrap(),
        );
        let bf = time(1, runs, || drop(ah.matmul(&bh).unwrap()));

        let g = |s: f64| flops(n, n, n) / s / 1e9;
        println!(
            "| {n} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} |",
            g(ours),
            g(direct),
            direct / ours,
            g(naive),
            g(bf)
        );
    }
    println!();
}

/// One GPU problem: C[M, N] = A[M, K] @ B, with B stored [K, N] ("nn") or [N, K] ("nt", x @ w.t()).
struct Problem {
    label: String,
    m: usize,
    n: usize,
    k: usize,
    nt: bool,
}

fn gpu_problems() -> Vec<Problem> {
    let mut v: Vec<Problem> = [1024, 2048, 4096, 8192]
        .into_iter()
        .map(|s| Problem {
            label: format!("square {s}"),
            m: s,
            n: s,
            k: s,
            nt: false,
        })
        .collect();
    for (tokens, batch) in [(197, 64), (1370, 8)] {
        for (n, k) in [
            (768, 768),
            (3072, 768),
            (768, 3072),
            (1024, 1024),
            (4096, 1024),
            (1024, 4096),
        ] {
            let m = tokens * batch;
            v.push(Problem {
                label: format!("B={batch}x{tokens} tok, {k}->{n}"),
                m,
                n,
                k,
                nt: true,
            });
        }
    }
    v
}

mod gpu {
    use super::*;
    use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
    use std::sync::Arc;

    pub struct Lt {
        stream: Arc<CudaStream>,
        blas: CudaBlasLT,
    }

    impl Lt {
        pub fn new() -> Result<Lt, String> {
            let ctx = CudaContext::new(0).map_err(|e| e.to_string())?;
            // SAFETY: before any allocation through this handle; one stream, as in our driver.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            let blas = CudaBlasLT::new(stream.clone()).map_err(|e| format!("cuBLASLt: {e:?}"))?;
            Ok(Lt { stream, blas })
        }

        /// Median seconds of cuBLASLt for the problem (row-major, computed as the column-major
        /// C^T = B^T A^T).
        pub fn time<T>(&self, p: &Problem, a: &[T], b: &[T], runs: usize) -> f64
        where
            T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
            CudaBlasLT: Matmul<T>,
        {
            let da: CudaSlice<T> = self.stream.clone_htod(a).unwrap();
            let db: CudaSlice<T> = self.stream.clone_htod(b).unwrap();
            let mut dc: CudaSlice<T> = self.stream.alloc_zeros(p.m * p.n).unwrap();
            let cfg = MatmulConfig {
                transa: p.nt,
                transb: false,
                transc: false,
                m: p.n as u64,
                n: p.m as u64,
                k: p.k as u64,
                alpha: 1.0,
                lda: if p.nt { p.k } else { p.n } as i64,
                ldb: p.k as i64,
                beta: 0.0,
                ldc: p.n as i64,
                stride_a: None,
                stride_b: None,
                stride_c: None,
                stride_bias: None,
                batch_size: None,
            };
            time(3, runs, || {
                // SAFETY: the buffers hold exactly the matrices the configuration describes.
                unsafe { self.blas.matmul(cfg, &db, &da, &mut dc, None, None) }.unwrap();
                self.stream.synchronize().unwrap();
            })
        }
    }
}

fn host_vec<T: vpr_engine::tensor::IntoCpuStorage>(t: &Tensor) -> Vec<T> {
    t.to_vec::<T>().unwrap()
}

fn gpu_bench(dev: &Device) {
    let gpu = dev.gpu().unwrap();
    println!("## GPU: {}\n", gpu.describe());
    let lt = match gpu::Lt::new() {
        Ok(lt) => Some(lt),
        Err(e) => {
            println!("cuBLASLt unavailable ({e}): printing our kernels only\n");
            None
        }
    };
    println!(
        "TFLOP/s, median. cuBLASLt's f32 runs in TF32 (cudarc's compute type), ours in full f32.\n"
    );
    println!(
        "| problem | M x N x K | layout | dtype | our kernel | ours | cuBLASLt | ours / cuBLASLt |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for p in gpu_problems() {
        let a32 =
            Tensor::rand_uniform(&[p.m, p.k], -1.0, 1.0, 1, DType::F32, &Device::Cpu).unwrap();
        let b_shape = if p.nt { [p.n, p.k] } else { [p.k, p.n] };
        let b32 = Tensor::rand_uniform(&b_shape, -1.0, 1.0, 2, DType::F32, &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let (ah, bh) = (a32.to_dtype(dtype).unwrap(), b32.to_dtype(dtype).unwrap());
            let (a, b) = (ah.to_device(dev).unwrap(), bh.to_device(dev).unwrap());
            let work = flops(p.m, p.n, p.k);
            let runs = if work > 2e11 { 5 } else { 20 };
            let ours = |path: Option<TensorCorePath>| {
                let run = || {
                    time(3, runs, || {
                        let out = if p.nt {
                            a.matmul(&b.t().unwrap())
                        } else {
                            a.matmul(&b)
                        }
                        .unwrap();
                        gpu.synchronize().unwrap();
                        drop(out);
                    })
                };
                match path {
                    Some(path) => with_tensor_core_path(path, run),
                    None => run(),
                }
            };
            let paths = tensor_core_paths(gpu, dtype);
            let theirs = lt.as_ref().map(|lt| match dtype {
                DType::BF16 => lt.time(
                    &p,
                    &host_vec::<half::bf16>(&ah),
                    &host_vec::<half::bf16>(&bh),
                    runs,
                ),
                DType::F16 => lt.time(
                    &p,
                    &host_vec::<half::f16>(&ah),
                    &host_vec::<half::f16>(&bh),
                    runs,
                ),
                _ => lt.time(&p, &host_vec::<f32>(&ah), &host_vec::<f32>(&bh), runs),
            });
            let t = |s: f64| work / s / 1e12;
            for &path in paths {
                let ours = ours(path);
                let (theirs_s, ratio) = match theirs {
                    Some(s) => (format!("{:.1}", t(s)), format!("{:.2}", s / ours)),
                    None => ("-".into(), "-".into()),
                };
                println!(
                    "| {} | {}x{}x{} | {} | {dtype} | {} | {:.1} | {theirs_s} | {ratio} |",
                    p.label,
                    p.m,
                    p.n,
                    p.k,
                    if p.nt { "x @ w.t()" } else { "a @ b" },
                    match path {
                        None => "SIMT",
                        Some(TensorCorePath::WgmmaTma) => "wgmma + TMA",
                        Some(TensorCorePath::Wgmma) => "wgmma + cp.async",
                        Some(TensorCorePath::MmaSync) => "mma.sync",
                    },
                    t(ours)
                );
            }
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; any other argument filters by part ("cpu" or "gpu").
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |part: &str| filter.is_empty() || filter.iter().any(|f| f == part);
    if want("cpu") {
        cpu_bench();
    }
    if want("gpu") {
        match Device::new("cuda") {
            Ok(dev) => gpu_bench(&dev),
            Err(e) => {
                println!("## GPU\n\nGPU part skipped: no usable CUDA device ({e}).\n");
                // set by tools/gpu_bundle.sh on the GPU machine, where a skip is a failure
                if std::env::var("VPR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    std::process::exit(1);
                }
            }
        }
    }
}
