//! Training: optimizers (fused kernels over f32 master weights), the dynamic loss scaler for f16
//! training, gradient clipping, learning-rate schedules, checkpoints, and the training loops
//! (`classify`: CosPlace and EigenPlaces) with their batches and run folders.

pub mod batches;
pub mod checkpoint;
pub mod classify;
pub mod clip;
pub mod optim;
pub mod run_dir;
pub mod scaler;
pub mod schedule;

pub use checkpoint::{load_checkpoint, save_checkpoint, TrainState};
pub use clip::clip_grad_norm;
pub use optim::{Adam, Hyper, Optimizer, ParamGroup, ParamState, Sgd};
pub use scaler::GradScaler;
pub use schedule::StepLr;
