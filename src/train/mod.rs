//! Training machinery: optimizers (fused kernels over f32 master weights), the dynamic loss
//! scaler for f16 training, gradient clipping, learning-rate schedules and checkpoints.

pub mod checkpoint;
pub mod clip;
pub mod optim;
pub mod scaler;
pub mod schedule;

pub use checkpoint::{load_checkpoint, save_checkpoint, TrainState};
pub use clip::clip_grad_norm;
pub use optim::{Adam, Hyper, Optimizer, ParamGroup, ParamState, Sgd};
pub use scaler::GradScaler;
pub use schedule::StepLr;
