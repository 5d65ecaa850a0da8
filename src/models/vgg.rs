//! torchvision's VGG16 `features[:-2]` as CosPlace uses it: 13 3x3 convolutions with bias
//! (padding 1), a ReLU after each but the last (conv5_3's output is taken before its ReLU), and a
//! 2x2/2 max pool after conv1_2, conv2_2, conv3_3 and conv4_3 (the final pool is cut). Module
//! names are the `nn.Sequential` indices `<prefix>{0,2,5,7,10,12,14,17,19,21,24,26,28}`; widths
//! come from the file. With no BatchNorm, training and inference share one path: conv + bias +
//! ReLU as one fused op (with autograd).

use super::Shapes;
use crate::autograd::Parameter;
use crate::device::Device;
use crate::error::Result;
use crate::nn::{Conv2d, Module, StateEntry};
use crate::ops::conv::Conv2dOptions;
use crate::tensor::Tensor;

/// The Sequential index of each convolution.
const CONV_INDICES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
/// The convolutions (by position) followed by a max pool.
const POOL_AFTER: [usize; 4] = [1, 3, 6, 9];
/// How many of the last convolutions CosPlace trains.
const TRAINED: usize = 3;

pub struct Vgg16 {
    convs: Vec<Conv2d>,
}

impl Vgg16 {
    pub(crate) fn from_shapes(prefix: &str, shapes: &Shapes, device: &Device) -> Result<Vgg16> {
        let mut cin = 3;
        let mut convs = Vec::new();
        for index in CONV_INDICES {
            let name = format!("{prefix}{index}");
            let cout = shapes.dim(&format!("{name}.weight"), 0);
            let options = Conv2dOptions::new().padding(1);
            convs.push(Conv2d::new(&name, cin, cout, 3, options, true, device)?);
            cin = cout;
        }
        Ok(Vgg16 { convs })
    }

    /// Output channels (conv5_3's).
    pub fn channels(&self) -> usize {
        self.convs[CONV_INDICES.len() - 1].out_channels()
    }

    /// `x` [N, H, W, 3] -> features [N, H/16, W/16, channels], before conv5_3's ReLU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward_fused(&h, None, i != last)?;
            if POOL_AFTER.contains(&i) {
                h = h.max_pool2d(2, 2, 0)?;
            }
        }
        Ok(h)
    }

    /// CosPlace's rule: every convolution but the last three (conv5_1..3) frozen.
    pub fn freeze_cosplace(&self) {
        for conv in &self.convs[..self.convs.len() - TRAINED] {
            for p in conv.parameters() {
                p.set_trainable(false);
            }
        }
    }
}

impl Module for Vgg16 {
    fn parameters(&self) -> Vec<Parameter> {
        self.convs.iter().flat_map(Module::parameters).collect()
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        self.convs.iter().flat_map(Module::state_entries).collect()
    }
}
