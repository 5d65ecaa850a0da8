//! `cargo bench --bench conv_gpu`: our convolutions against cuDNN on a GPU, in the same run.
//!
//! Forward (fprop), input gradient (dgrad) and weight gradient (wgrad) at ResNet-50's distinct
//! layer shapes (224x224 input), batch 32 and 128, bf16 and f32. Both sides use channels-last
//! activations (NHWC) and filters (KRSC, our OHWI). cuDNN runs the algorithm its heuristics rank
//! first, with the workspace it asks for; bf16 with f32 accumulation on tensor cores
//! (`CUDNN_TENSOR_OP_MATH`), f32 in plain FMA math (`CUDNN_FMA_MATH`, no TF32), as ours. Our
//! dgrad and wgrad are timed as the backward of a recorded convolution whose input (dgrad) or
//! weight (wgrad) alone requires a gradient. TFLOP/s from medians of 10 runs after 3 warm-ups,
//! each timed from launch to synchronize.
//!
//! cuDNN is loaded at run time (cudarc's dynamic loading), so this builds everywhere; without a
//! GPU it says so and exits (with an error under `VPR_REQUIRE_GPU=1`, as on the GPU machine).
//! When libcudnn.so.9 is not on the loader path (PyTorch's wheel keeps it in
//! `site-packages/nvidia/cudnn/lib`), point `LD_LIBRARY_PATH` there.

use cudarc::cudnn::{sys, ConvBackwardData, ConvBackwardFilter, ConvForward, Cudnn, CudnnDataType};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;
use std::time::Instant;
use vpr_engine::ops::conv::Conv2dOptions;
use vpr_engine::{autograd, DType, Device, Tensor};

const WARMUP: usize = 3;
const RUNS: usize = 10;

/// A ResNet-50 convolution: input side, channels in and out, kernel, stride.
struct Shape {
    hw: usize,
    c: usize,
    o: usize,
    k: usize,
    stride: usize,
}

impl Shape {
    fn out(&self) -> usize {
        (self.hw + 2 * (self.k / 2) - self.k) / self.stride + 1
    }
    fn flops(&self, n: usize) -> f64 {
        2.0 * (n * self.out() * self.out() * self.o * self.c * self.k * self.k) as f64
    }
    fn opts(&self) -> Conv2dOptions {
        Conv2dOptions::new().stride(self.stride).padding(self.k / 2)
    }
}

const fn s(hw: usize, c: usize, o: usize, k: usize, stride: usize) -> Shape {
    Shape {
        hw,
        c,
        o,
        k,
        stride,
    }
}

const SHAPES: &[Shape] = &[
    s(224, 3, 64, 7, 2),
    s(56, 64, 64, 3, 1),
    s(56, 64, 256, 1, 1),
    s(56, 256, 64, 1, 1),
    s(56, 128, 128, 3, 2),
    s(28, 128, 128, 3, 1),
    s(28, 512, 128, 1, 1),
    s(14, 256, 256, 3, 1),
    s(14, 1024, 256, 1, 1),
    s(7, 512, 512, 3, 1),
    s(7, 2048, 512, 1, 1),
];

fn median_seconds(mut f: impl FnMut() -> f64) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let mut t: Vec<f64> = (0..RUNS).map(|_| f()).collect();
    t.sort_by(f64::total_cmp);
    t[RUNS / 2]
}

/// Our fprop, dgrad and wgrad seconds.
fn ours(dev: &Device, sh: &Shape, n: usize, dtype: DType) -> [f64; 3] {
    let gpu = dev.gpu().unwrap();
    let x = Tensor::randn(&[n, sh.hw, sh.hw, sh.c], 0.0, 1.0, 1, dtype, dev).unwrap();
    let w = Tensor::randn(&[sh.o, sh.k, sh.k, sh.c], 0.0, 0.1, 2, dtype, dev).unwrap();
    let g = Tensor::randn(&[n, sh.out(), sh.out(), sh.o], 0.0, 1.0, 3, dtype, dev).unwrap();
    let fprop = median_seconds(|| {
        let t = Instant::now();
        let y = x.conv2d(&w, None, sh.opts()).unwrap();
        gpu.synchronize().unwrap();
        drop(y);
        t.elapsed().as_secs_f64()
    });
    let backward = |x: &Tensor, w: &Tensor| {
        median_seconds(|| {
            let y = x.conv2d(w, None, sh.opts()).unwrap();
            gpu.synchronize().unwrap();
            let t = Instant::now();
            let grads = autograd::backward_with(&y, g.clone()).unwrap();
            gpu.synchronize().unwrap();
            drop(grads);
            t.elapsed().as_secs_f64()
        })
    };
    let dgrad = backward(&x.detach().requires_grad(), &w);
    let wgrad = backward(&x, &w.detach().requires_grad());
    [fprop, dgrad, wgrad]
}

struct CudnnBench {
    stream: Arc<CudaStream>,
    cudnn: Arc<Cudnn>,
}

impl CudnnBench {
    fn new() -> Result<CudnnBench, String> {
        // SAFETY: only looks for the shared library; cudarc panics on first use when it is absent.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcudnn not found on the loader path".into());
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("{e:?}"))?;
        // SAFETY: before any allocation through this context; one stream, as in our driver.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let cudnn = Cudnn::new(stream.clone()).map_err(|e| format!("cuDNN: {e:?}"))?;
        Ok(CudnnBench { stream, cudnn })
    }

    /// cuDNN's fprop, dgrad and wgrad seconds for data of type T (`one`, `zero`: its 1 and 0).
    fn time<T>(&self, sh: &Shape, n: usize, one: T, zero: T) -> Result<[f64; 3], String>
    where
        T: CudnnDataType + DeviceRepr + ValidAsZeroBits + Copy,
    {
        let err = |e: cudarc::cudnn::result::CudnnError| format!("cuDNN: {e:?}");
        let dims = |n: usize, c: usize, hw: usize| [n, c, hw, hw].map(|v| v as i32);
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let x_desc = self
            .cudnn
            .create_4d_tensor::<T>(nhwc, dims(n, sh.c, sh.hw))
            .map_err(err)?;
        let y_desc = self
            .cudnn
            .create_4d_tensor::<T>(nhwc, dims(n, sh.o, sh.out()))
            .map_err(err)?;
        let w_desc = self
            .cudnn
            .create_4d_filter::<T>(nhwc, [sh.o, sh.c, sh.k, sh.k].map(|v| v as i32))
            .map_err(err)?;
        let pad = (sh.k / 2) as i32;
        let stride = sh.stride as i32;
        let mut conv = self
            .cudnn
            .create_conv2d::<f32>(
                [pad, pad],
                [stride, stride],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(err)?;
        let math = if std::mem::size_of::<T>() == 2 {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        conv.set_math_type(math).map_err(err)?;
        let alloc = |len: usize| -> Result<CudaSlice<T>, String> {
            self.stream
                .alloc_zeros::<T>(len)
                .map_err(|e| format!("{e:?}"))
        };
        let x = alloc(n * sh.hw * sh.hw * sh.c)?;
        let w = alloc(sh.o * sh.k * sh.k * sh.c)?;
        let mut dx = alloc(n * sh.hw * sh.hw * sh.c)?;
        let mut dw = alloc(sh.o * sh.k * sh.k * sh.c)?;
        let mut y = alloc(n * sh.out() * sh.out() * sh.o)?;
        let workspace = |bytes: usize| -> Result<Option<CudaSlice<u8>>, String> {
            if bytes == 0 {
                return Ok(None);
            }
            self.stream
                .alloc_zeros::<u8>(bytes)
                .map(Some)
                .map_err(|e| format!("{e:?}"))
        };
        let run = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
            f()?;
            let mut failure = None;
            let t = median_seconds(|| {
                let t = Instant::now();
                if let Err(e) =
                    f().and_then(|()| self.stream.synchronize().map_err(|e| format!("{e:?}")))
                {
                    failure = Some(e);
                }
                t.elapsed().as_secs_f64()
            });
            failure.map_or(Ok(t), Err)
        };

        let fwd = ConvForward {
            conv: &conv,
            x: &x_desc,
            w: &w_desc,
            y: &y_desc,
        };
        let algo = fwd.pick_algorithm().map_err(err)?;
        let mut ws = workspace(fwd.get_workspace_size(algo).map_err(err)?)?;
        let fprop = run(&mut || {
            // SAFETY: every buffer has exactly the size and type its descriptor states.
            unsafe { fwd.launch(algo, ws.as_mut(), (one, zero), &x, &w, &mut y) }.map_err(err)
        })?;

        let bwd = ConvBackwardData {
            conv: &conv,
            dx: &x_desc,
            w: &w_desc,
            dy: &y_desc,
        };
        let algo = bwd.pick_algorithm().map_err(err)?;
        let mut ws = workspace(bwd.get_workspace_size(algo).map_err(err)?)?;
        let dgrad = run(&mut || {
            // SAFETY: as above.
            unsafe { bwd.launch(algo, ws.as_mut(), (one, zero), &mut dx, &w, &y) }.map_err(err)
        })?;

        let bwf = ConvBackwardFilter {
            conv: &conv,
            x: &x_desc,
            dw: &w_desc,
            dy: &y_desc,
        };
        let algo = bwf.pick_algorithm().map_err(err)?;
        let mut ws = workspace(bwf.get_workspace_size(algo).map_err(err)?)?;
        let wgrad = run(&mut || {
            // SAFETY: as above.
            unsafe { bwf.launch(algo, ws.as_mut(), (one, zero), &x, &mut dw, &y) }.map_err(err)
        })?;
        Ok([fprop, dgrad, wgrad])
    }
}

fn main() {
    let dev = match Device::new("cuda") {
        Ok(d) => d,
        Err(e) => {
            println!("conv_gpu skipped: no usable CUDA device ({e}).");
            // set by tools/gpu_bundle.sh on the GPU machine, where a skip is a failure
            if std::env::var("VPR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            return;
        }
    };
    println!(
        "## conv2d against cuDNN: {}\n",
        dev.gpu().unwrap().describe()
    );
    let cudnn = CudnnBench::new();
    if let Err(e) = &cudnn {
        println!("cuDNN unavailable ({e}): printing ours only\n");
    }
    println!("TFLOP/s (median); ratio = cuDNN time / our time.\n");
    println!("| shape (HxW C -> O, k/s) | batch | dtype | pass | ours | cuDNN | ours / cuDNN |");
    println!("|---|---|---|---|---|---|---|");
    for dtype in [DType::BF16, DType::F32] {
        for n in [32usize, 128] {
            for sh in SHAPES {
                let ours = ours(&dev, sh, n, dtype);
                let theirs = cudnn.as_ref().ok().map(|c| match dtype {
                    DType::BF16 => c.time(sh, n, half::bf16::ONE, half::bf16::ZERO),
                    _ => c.time(sh, n, 1f32, 0f32),
                });
                let tflops = |s: f64| sh.flops(n) / s / 1e12;
                for (i, pass) in ["fprop", "dgrad", "wgrad"].iter().enumerate() {
                    let (theirs, ratio) = match &theirs {
                        Some(Ok(t)) => (
                            format!("{:.1}", tflops(t[i])),
                            format!("{:.2}", t[i] / ours[i]),
                        ),
                        Some(Err(e)) => (e.clone(), "-".into()),
                        None => ("-".into(), "-".into()),
                    };
                    println!(
                        "| {}x{} {} -> {}, {}x{}/{} | {n} | {dtype} | {pass} | {:.1} | {theirs} | {ratio} |",
                        sh.hw, sh.hw, sh.c, sh.o, sh.k, sh.k, sh.stride, tflops(ours[i])
                    );
                }
            }
        }
    }
}
