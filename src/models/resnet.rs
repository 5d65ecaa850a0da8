//! torchvision's ResNet-18/34/50/101/152 ("v1.5": a bottleneck's stride is on its 3x3 conv)
//! truncated at conv5 (`children()[:-2]`: conv1, bn1, relu, maxpool, layer1..4) or conv4
//! (`[:-3]`, without layer4), as CosPlace and EigenPlaces use it. Module names follow the
//! truncated `nn.Sequential`: `<prefix>0` conv1, `<prefix>1` bn1, `<prefix>4..7` layer1..4,
//! each block `<layer>.<j>.{conv1,bn1,conv2,bn2[,conv3,bn3]}` and `<layer>.0.downsample.{0,1}`.
//! Widths come from the file's weight shapes, so any widths load.
//!
//! Two forward paths: [`ResNet::forward`] with real BatchNorm layers (training mode uses batch
//! statistics; autograd through everything), and [`FoldedResNet`] for inference, every
//! BatchNorm folded into its convolution and each conv + bias (+ residual) + ReLU one fused op.

use super::Shapes;
use crate::autograd::Parameter;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::{BatchNorm2d, Buffer, Conv2d, Module, StateEntry};
use crate::ops::conv::Conv2dOptions;
use crate::tensor::Tensor;

/// Blocks per layer and whether they are bottlenecks, by depth.
pub(crate) fn layout(depth: usize) -> Result<(bool, [usize; 4])> {
    Ok(match depth {
        18 => (false, [2, 2, 2, 2]),
        34 => (false, [3, 4, 6, 3]),
        50 => (true, [3, 4, 6, 3]),
        101 => (true, [3, 4, 23, 3]),
        152 => (true, [3, 8, 36, 3]),
        _ => {
            return Err(Error::Argument(format!(
                "ResNet-{depth} is not a torchvision ResNet (18, 34, 50, 101, 152)"
            )))
        }
    })
}

/// A convolution and the BatchNorm after it.
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBn {
    fn new(
        conv: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        device: &Device,
    ) -> Result<ConvBn> {
        let options = Conv2dOptions::new().stride(stride).padding(kernel / 2);
        Ok(ConvBn {
            conv: Conv2d::new(conv, cin, cout, kernel, options, false, device)?,
            bn: BatchNorm2d::new(bn, cout, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?)
    }

    fn modules(&self) -> [&dyn Module; 2] {
        [&self.conv, &self.bn]
    }
}

/// A BasicBlock (two 3x3 convs) or a Bottleneck (1x1, 3x3, 1x1), with its shortcut.
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, cb) in self.convs.iter().enumerate() {
            h = cb.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        let identity = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        h.add(&identity)?.relu()
    }

    fn modules(&self) -> Vec<&dyn Module> {
        self.convs
            .iter()
            .chain(&self.downsample)
            .flat_map(ConvBn::modules)
            .collect()
    }

    fn fold(&self) -> Result<FoldedBlock> {
        let fold = |cb: &ConvBn| cb.conv.fold(&cb.bn);
        Ok(FoldedBlock {
            convs: self.convs.iter().map(fold).collect::<Result<_>>()?,
            downsample: self.downsample.as_ref().map(fold).transpose()?,
        })
    }
}

/// A truncated torchvision ResNet with real BatchNorm layers.
pub struct ResNet {
    stem: ConvBn,
    layers: Vec<Vec<Block>>,
    channels: usize,
}

impl ResNet {
    /// ResNet-`depth` with `layers` (3: conv4, 4: conv5) of its four layers, named under
    /// `prefix` (`backbone.`), widths read from `shapes`.
    pub(crate) fn from_shapes(
        prefix: &str,
        depth: usize,
        layers: usize,
        shapes: &Shapes,
        device: &Device,
    ) -> Result<ResNet> {
        let (bottleneck, counts) = layout(depth)?;
        let stem_width = shapes.dim(&format!("{prefix}0.weight"), 0);
        let stem = ConvBn::new(
            &format!("{prefix}0"),
            &format!("{prefix}1"),
            3,
            stem_width,
            7,
            2,
            device,
        )?;
        let mut cin = stem_width;
        let mut all = Vec::new();
        for (li, &count) in counts.iter().enumerate().take(layers) {
            let mut blocks = Vec::new();
            for j in 0..count {
                let b = format!("{prefix}{}.{j}", 4 + li);
                let stride = if li > 0 && j == 0 { 2 } else { 1 };
                let planes = shapes.dim(&format!("{b}.conv1.weight"), 0);
                let last = if bottleneck { 3 } else { 2 };
                let out = shapes.dim(&format!("{b}.conv{last}.weight"), 0);
                let conv = |i: usize, cin, cout, k, s| {
                    ConvBn::new(
                        &format!("{b}.conv{i}"),
                        &format!("{b}.bn{i}"),
                        cin,
                        cout,
                        k,
                        s,
                        device,
                    )
                };
                let convs = if bottleneck {
                    vec![
                        conv(1, cin, planes, 1, 1)?,
                        conv(2, planes, planes, 3, stride)?,
                        conv(3, planes, out, 1, 1)?,
                    ]
                } else {
                    vec![
                        conv(1, cin, planes, 3, stride)?,
                        conv(2, planes, out, 3, 1)?,
                    ]
                };
                // torchvision's rule: a projection where the stride or the width changes
                let downsample = (j == 0 && (stride != 1 || cin != out))
                    .then(|| {
                        ConvBn::new(
                            &format!("{b}.downsample.0"),
                            &format!("{b}.downsample.1"),
                            cin,
                            out,
                            1,
                            stride,
                            device,
                        )
                    })
                    .transpose()?;
                blocks.push(Block { convs, downsample });
                cin = out;
            }
            all.push(blocks);
        }
        Ok(ResNet {
            stem,
            layers: all,
            channels: cin,
        })
    }

    /// Output channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// `x` [N, H, W, 3] -> features [N, H/32, W/32, channels] (H/16 at conv4).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(x)?.relu()?.max_pool2d(3, 2, 1)?;
        for block in self.layers.iter().flatten() {
            h = block.forward(&h)?;
        }
        Ok(h)
    }

    fn modules(&self) -> Vec<&dyn Module> {
        let mut m: Vec<&dyn Module> = self.stem.modules().to_vec();
        m.extend(self.layers.iter().flatten().flat_map(Block::modules));
        m
    }

    /// CosPlace's rule: conv1, bn1, layer1 and layer2 frozen, layer3 and layer4 trained.
    pub fn freeze_cosplace(&self) {
        let stem = self.stem.modules().into_iter();
        let early = self
            .layers
            .iter()
            .take(2)
            .flatten()
            .flat_map(Block::modules);
        for m in stem.chain(early) {
            for p in m.parameters() {
                p.set_trainable(false);
            }
        }
    }

    /// The inference network: every BatchNorm (in evaluation mode) folded into its conv.
    pub fn fold(&self) -> Result<FoldedResNet> {
        Ok(FoldedResNet {
            stem: self.stem.conv.fold(&self.stem.bn)?,
            blocks: self
                .layers
                .iter()
                .flatten()
                .map(Block::fold)
                .collect::<Result<_>>()?,
        })
    }
}

impl Module for ResNet {
    fn parameters(&self) -> Vec<Parameter> {
        self.modules().iter().flat_map(|m| m.parameters()).collect()
    }

    fn buffers(&self) -> Vec<Buffer> {
        self.modules().iter().flat_map(|m| m.buffers()).collect()
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        self.modules()
            .iter()
            .flat_map(|m| m.state_entries())
            .collect()
    }

    fn set_train(&self, train: bool) {
        for m in self.modules() {
            m.set_train(train);
        }
    }
}

struct FoldedBlock {
    convs: Vec<Conv2d>,
    downsample: Option<Conv2d>,
}

/// A [`ResNet`] with its BatchNorms folded, for inference (frozen parameters).
pub struct FoldedResNet {
    stem: Conv2d,
    blocks: Vec<FoldedBlock>,
}

impl FoldedResNet {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self
            .stem
            .forward_fused(x, None, true)?
            .max_pool2d(3, 2, 1)?;
        for block in &self.blocks {
            let identity = match &block.downsample {
                Some(d) => d.forward_fused(&h, None, false)?,
                None => h.clone(),
            };
            let (last, first) = block.convs.split_last().expect("blocks have convolutions");
            let mut inner = h;
            for conv in first {
                inner = conv.forward_fused(&inner, None, true)?;
            }
            h = last.forward_fused(&inner, Some(&identity), true)?;
        }
        Ok(h)
    }
}
