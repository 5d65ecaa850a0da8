//! Checkpoints: round trip of everything, bit-identical resume on the CPU and the virtual GPU,
//! atomic replacement, and a clear error (never a panic) for every kind of broken file.
mod common;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vpr_engine::autograd::{no_grad, Parameter};
use vpr_engine::ops::loss::Reduction;
use vpr_engine::tensor::Rng;
use vpr_engine::train::{
    clip_grad_norm, load_checkpoint, save_checkpoint, Adam, GradScaler, Hyper, Optimizer, Sgd,
    StepLr, TrainState,
};
use vpr_engine::{DType, Device, Error, Tensor};

const CLASSES: usize = 5;
const FEATURES: usize = 7;
const BATCH: usize = 9;

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vpr-ckpt-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A linear classifier's trainable state: weight [CLASSES, FEATURES] and bias [CLASSES].
struct Run {
    params: Vec<Parameter>,
    opt: Optimizer,
    sched: StepLr,
    scaler: GradScaler,
    rng_state: u64,
    step: u64,
}

impl Run {
    fn new(hyper: Hyper, scaler: GradScaler, init_seed: u64, device: &Device) -> Run {
        let w = Tensor::randn(
            &[CLASSES, FEATURES],
            0.0,
            0.5,
            init_seed,
            DType::F32,
            device,
        )
        .unwrap();
        let b = Tensor::randn(&[CLASSES], 0.0, 0.5, init_seed + 1, DType::F32, device).unwrap();
        let params = vec![Parameter::new("fc.weight", w), Parameter::new("fc.bias", b)];
        Run {
            opt: Optimizer::single(params.clone(), hyper).unwrap(),
            params,
            sched: StepLr::new(2, 0.5).unwrap(),
            scaler,
            rng_state: 1234,
            step: 0,
        }
    }

    /// One training step on a batch drawn from the run's RNG; returns the loss. The gradient of
    /// the logits comes from the cross-entropy backward, the rest by matmul (no backward rules
    /// needed): dW = dL^T x, db = sum of dL over the batch.
    fn step(&mut self, device: &Device) -> f32 {
        let mut rng = Rng::new(self.rng_state);
        let x = Tensor::randn(
            &[BATCH, FEATURES],
            0.0,
            1.0,
            rng.next_u64(),
            DType::F32,
            device,
        )
        .unwrap();
        let y: Vec<i64> = (0..BATCH)
            .map(|_| rng.below(CLASSES as u64) as i64)
            .collect();
        let y = Tensor::from_vec(y, &[BATCH], device).unwrap();
        self.rng_state = rng.next_u64();
        let (w, b) = (self.params[0].tensor(), self.params[1].tensor());
        let logits = no_grad(|| x.matmul(&w.t()?)?.add(&b))
            .unwrap()
            .detach()
            .requires_grad();
        let loss = logits.cross_entropy(&y, Reduction::Mean).unwrap();
        let grads = self.scaler.backward(&loss).unwrap();
        let dl = grads.get(&logits).unwrap().clone();
        no_grad(|| {
            self.params[0].set_grad(Some(dl.t().unwrap().matmul(&x).unwrap()));
            self.params[1].set_grad(Some(dl.sum(0, false).unwrap()));
        });
        self.scaler.unscale(&self.opt).unwrap();
        clip_grad_norm(&self.params, 1.0).unwrap();
        self.scaler.step(&mut self.opt).unwrap();
        self.scaler.update().unwrap();
        self.sched.step(&mut self.opt).unwrap();
        self.step += 1;
        loss.to_vec::<f32>().unwrap()[0]
    }

    fn save(&mut self, path: &Path) -> vpr_engine::Result<()> {
        save_checkpoint(path, &self.state())
    }

    fn load(&mut self, path: &Path) -> vpr_engine::Result<()> {
        let mut state = self.state();
        load_checkpoint(path, &mut state)?;
        let (rng_state, step) = (state.rng_state, state.step);
        self.rng_state = rng_state;
        self.step = step;
        Ok(())
    }

    fn state(&mut self) -> TrainState<'_> {
        TrainState {
            params: &self.params,
            optimizer: Some(&mut self.opt),
            schedule: Some(&mut self.sched),
            scaler: Some(&mut self.scaler),
            rng_state: self.rng_state,
            step: self.step,
            extra: [("best_recall1".to_string(), "87.25".to_string())].into(),
        }
    }

    fn weights(&self) -> Vec<Vec<u32>> {
        self.params
            .iter()
            .map(|p| {
                p.tensor()
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    }
}

/// A named optimizer set-up and the loss scaler it trains with.
type Setup = (&'static str, Hyper, fn() -> GradScaler);

fn setups() -> Vec<Setup> {
    let nesterov = Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 1e-3,
        ..Sgd::new(0.2)
    };
    vec![
        ("sgd nesterov", nesterov.into(), GradScaler::disabled),
        // a small scale that grows every 2 good steps, so the scaler state changes mid-run
        (
            "adamw + scaler",
            Adam {
                weight_decay: 0.05,
                ..Adam::adamw(0.05)
            }
            .into(),
            || GradScaler::with_options(1024.0, 2.0, 0.5, 2).unwrap(),
        ),
    ]
}

#[test]
fn resume_is_bit_identical_on_cpu_and_vgpu() {
    const N: usize = 6;
    let dir = scratch_dir("resume");
    for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
        for (name, hyper, scaler) in setups() {
            let mut straight = Run::new(hyper, scaler(), 42, &device);
            let want: Vec<u32> = (0..N).map(|_| straight.step(&device).to_bits()).collect();

            let mut first = Run::new(hyper, scaler(), 42, &device);
            let mut got: Vec<u32> = (0..N / 2).map(|_| first.step(&device).to_bits()).collect();
            let path = dir.join("run.safetensors");
            first.save(&path).unwrap();
            drop(first);
            // a fresh run with other weights, the initial lr, a fresh scaler and schedule
            let mut resumed = Run::new(hyper, scaler(), 7, &device);
            resumed.rng_state = 0;
            resumed.load(&path).unwrap();
            assert_eq!(resumed.step, (N / 2) as u64);
            got.extend((0..N / 2).map(|_| resumed.step(&device).to_bits()));
            assert_eq!(got, want, "{device} {name}: losses differ after resume");
            assert_eq!(
                resumed.weights(),
                straight.weights(),
                "{device} {name}: weights differ"
            );
            assert_eq!(
                resumed.scaler.scale(),
                straight.scaler.scale(),
                "{device} {name}"
            );
            assert_eq!(
                resumed.opt.groups()[0].hyper,
                straight.opt.groups()[0].hyper,
                "{device} {name}"
            );
            assert_eq!(resumed.sched, straight.sched, "{device} {name}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn round_trip_restores_everything() {
    let dir = scratch_dir("round_trip");
    let cpu = Device::Cpu;
    let (_, hyper, scaler) = setups().remove(1);
    let mut run = Run::new(hyper, scaler(), 1, &cpu);
    for _ in 0..5 {
        run.step(&cpu);
    }
    let path = dir.join("ck.safetensors");
    run.save(&path).unwrap();
    // no temporary file is left beside it, and saving again replaces it
    run.save(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("ck.safetensors")]);

    let mut other = Run::new(
        hyper,
        GradScaler::with_options(1024.0, 2.0, 0.5, 2).unwrap(),
        9,
        &cpu,
    );
    other.load(&path).unwrap();
    assert_eq!(other.weights(), run.weights());
    assert_eq!((other.rng_state, other.step), (run.rng_state, run.step));
    assert_eq!(other.sched, run.sched);
    assert_eq!(other.opt.groups()[0].hyper, run.opt.groups()[0].hyper);
    assert_eq!(
        (other.scaler.scale(), other.scaler.growth_tracker()),
        (run.scaler.scale(), run.scaler.growth_tracker())
    );
    for p in &run.params {
        let (a, b) = (
            run.opt.state(p.name()).unwrap(),
            other.opt.state(p.name()).unwrap(),
        );
        assert_eq!(a.step, b.step);
        for (x, y) in [(&a.exp_avg, &b.exp_avg), (&a.exp_avg_sq, &b.exp_avg_sq)] {
            let bits = |t: &Option<Tensor>| t.as_ref().unwrap().to_vec::<f32>().unwrap();
            assert_eq!(bits(x), bits(y), "{}", p.name());
        }
    }
    // loading onto the virtual GPU gives the same values there
    let vgpu = Device::new("vgpu").unwrap();
    let mut on_gpu = Run::new(
        hyper,
        GradScaler::with_options(1024.0, 2.0, 0.5, 2).unwrap(),
        9,
        &vgpu,
    );
    on_gpu.load(&path).unwrap();
    assert_eq!(on_gpu.weights(), run.weights());
    assert!(on_gpu.params[0].tensor().device().same(&vgpu));
    let m = on_gpu
        .opt
        .state("fc.weight")
        .unwrap()
        .exp_avg
        .as_ref()
        .unwrap();
    assert!(m.device().same(&vgpu));
    // the weights alone (evaluation): optimizer, schedule and scaler entries are not needed
    let weights: Vec<Parameter> = run
        .params
        .iter()
        .map(|p| {
            Parameter::new(
                p.name(),
                Tensor::zeros(p.tensor().shape(), DType::F32, &cpu).unwrap(),
            )
        })
        .collect();
    let mut state = TrainState {
        params: &weights,
        optimizer: None,
        schedule: None,
        scaler: None,
        rng_state: 0,
        step: 0,
        extra: Default::default(),
    };
    load_checkpoint(&path, &mut state).unwrap();
    assert_eq!(state.extra["best_recall1"], "87.25");
    for (a, b) in weights.iter().zip(&run.params) {
        assert_eq!(
            a.tensor().to_vec::<f32>().unwrap(),
            b.tensor().to_vec::<f32>().unwrap()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tensors (name, dtype, shape, bytes) and metadata of a safetensors file.
type Parts = (
    Vec<(String, StDtype, Vec<usize>, Vec<u8>)>,
    HashMap<String, String>,
);

fn read_parts(path: &Path) -> Parts {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    (tensors, header.metadata().clone().unwrap())
}

fn write_parts(path: &Path, (tensors, meta): &Parts) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        path,
        safetensors::tensor::serialize(views, Some(meta.clone())).unwrap(),
    )
    .unwrap();
}

/// Loading `path` into a fresh run fails with a message naming the file and containing `what`,
/// and leaves the run's weights untouched.
fn assert_load_fails(path: &Path, what: &str) {
    let cpu = Device::Cpu;
    let (_, hyper, scaler) = setups().remove(1);
    let mut run = Run::new(hyper, scaler(), 3, &cpu);
    let before = run.weights();
    let err = run.load(path).expect_err(what);
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file: {msg}"
    );
    assert!(msg.contains(what), "expected '{what}' in: {msg}");
    assert_eq!(
        run.weights(),
        before,
        "a failed load changed the weights ({msg})"
    );
    assert!(
        run.opt.state("fc.weight").is_none(),
        "a failed load changed the optimizer ({msg})"
    );
}

#[test]
fn broken_files_are_clear_errors() {
    let dir = scratch_dir("broken");
    let cpu = Device::Cpu;
    let (_, hyper, scaler) = setups().remove(1);
    let mut run = Run::new(hyper, scaler(), 1, &cpu);
    run.step(&cpu);
    let good = dir.join("good.safetensors");
    run.save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.join("bad.safetensors");

    // missing file
    let mut fresh = Run::new(hyper, scaler(), 3, &cpu);
    let missing = dir.join("nope.safetensors");
    assert!(matches!(fresh.load(&missing), Err(Error::Io { path, .. }) if path.contains("nope")));

    // truncated anywhere: inside the length, the header, the data, one byte short
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for cut in [
        0,
        5,
        8,
        8 + header_len / 2,
        8 + header_len + 3,
        bytes.len() - 1,
    ] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        assert_load_fails(&bad, "truncated or corrupted");
    }
    // a flipped bit in the data of each tensor
    let (tensors, meta) = read_parts(&good);
    let data_start = bytes.len() - tensors.iter().map(|t| t.3.len()).sum::<usize>();
    for at in [data_start, data_start + 37, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        std::fs::write(&bad, &b).unwrap();
        assert_load_fails(&bad, "checksum mismatch");
    }
    // a corrupted header: broken JSON, and a changed metadata value
    let mut b = bytes.clone();
    b[8] = b'[';
    std::fs::write(&bad, &b).unwrap();
    assert_load_fails(&bad, "truncated or corrupted");
    let mut m = meta.clone();
    m.insert("schedule.last_epoch".into(), "99".into());
    write_parts(&bad, &(tensors.clone(), m));
    assert_load_fails(&bad, "metadata checksum");
    // a missing tensor, a tensor of the wrong dtype, an unknown extra tensor
    let without: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "optim/fc.bias/exp_avg_sq")
        .cloned()
        .collect();
    write_parts(&bad, &(without, meta.clone()));
    assert_load_fails(&bad, "tensor 'optim/fc.bias/exp_avg_sq' is missing");
    let mut as_f16 = tensors.clone();
    for t in as_f16.iter_mut().filter(|t| t.0 == "param/fc.weight") {
        t.1 = StDtype::F16;
        t.3.truncate(t.3.len() / 2);
    }
    write_parts(&bad, &(as_f16, meta.clone()));
    assert_load_fails(&bad, "tensor 'param/fc.weight' is F16, expected F32");
    let mut extra = tensors.clone();
    extra.push((
        "param/head.weight".into(),
        StDtype::F32,
        vec![1],
        vec![0; 4],
    ));
    write_parts(&bad, &(extra, meta.clone()));
    assert_load_fails(&bad, "head.weight");
    // not a training checkpoint at all
    write_parts(&bad, &(tensors.clone(), HashMap::new()));
    assert_load_fails(&bad, "metadata entry 'format' is missing");

    // a checkpoint of a different model: wrong shape
    let mut other = Run::new(hyper, scaler(), 1, &cpu);
    other.params = vec![
        Parameter::new(
            "fc.weight",
            Tensor::zeros(&[FEATURES, CLASSES], DType::F32, &cpu).unwrap(),
        ),
        Parameter::new(
            "fc.bias",
            Tensor::zeros(&[CLASSES], DType::F32, &cpu).unwrap(),
        ),
    ];
    other.opt = Optimizer::single(other.params.clone(), hyper).unwrap();
    other.save(&bad).unwrap();
    assert_load_fails(&bad, "has shape [7, 5], expected [5, 7]");
    // another optimizer: SGD state into Adam
    let mut sgd = Run::new(Sgd::new(0.1).into(), scaler(), 1, &cpu);
    sgd.save(&bad).unwrap();
    assert_load_fails(
        &bad,
        "parameter group 0 is adamw here, sgd in the checkpoint",
    );
    // the good file still loads
    fresh.load(&good).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
