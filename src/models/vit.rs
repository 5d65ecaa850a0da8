//! DINOv2 vision transformers (Oquab et al. 2023: ViT-S/B/L/g with 14-pixel patches, with or
//! without register tokens) and SelaVPR (Lu et al., ICLR 2024: a frozen DINOv2 ViT-L/14 with two
//! adapters per block, a GeM global descriptor and up-convolved local features), with the
//! official state-dict names, built from a converted file's metadata (`vpr.vit.*`,
//! `vpr.selavpr.*`).
//!
//! Tokens: the patch embedding (a patch x patch convolution with stride patch), the class token
//! prepended, the position embedding added (resized from its stored grid to the image's as
//! DINOv2 does: bicubic, either with the historical 0.1 offset in the scale factor and no
//! antialias, or to the exact size with antialias, `vpr.vit.pos_interp_*`), then the register
//! tokens inserted after the class token without a position embedding. A block is
//! `x + ls1 * attn(norm1(x))` then `x + ls2 * ffn(norm2(x))`; SelaVPR's block puts its serial
//! adapter `y + fc2(relu(fc1(y)))` after the attention and adds `0.2 * fc2(relu(fc1(z)))` of the
//! same normalised input `z` beside the FFN. The final LayerNorm gives the class, register and
//! patch tokens (`forward_features`).

use super::{InputSpec, ModelInfo, PlaceModel, Shapes, MAX_WIDTH};
use crate::autograd::{no_grad, Parameter};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::io::weights::WeightsFile;
use crate::nn::{
    flatten, l2_normalize, load_strict, plain_entries, Conv2d, ConvTranspose2d, GeM, LayerNorm,
    Linear, Module, StateEntry,
};
use crate::ops::conv::{Conv2dOptions, ConvTranspose2dOptions};
use crate::ops::interpolate::ResizeTo;
use crate::tensor::Tensor;

/// The feed-forward network of a block.
enum Ffn {
    /// `fc2(gelu(fc1(x)))`.
    Mlp { fc1: Linear, fc2: Linear },
    /// ViT-g's SwiGLU: `w3(silu(a) * b)` with `[a, b] = w12(x)`.
    SwiGlu { w12: Linear, w3: Linear },
}

/// SelaVPR's adapter: `fc2(relu(fc1(x)))` (`D_fc1`, `D_fc2`).
struct Adapter {
    fc1: Linear,
    fc2: Linear,
}

impl Adapter {
    fn new(name: &str, dim: usize, hidden: usize, device: &Device) -> Result<Adapter> {
        Ok(Adapter {
            fc1: Linear::new(&format!("{name}.D_fc1"), dim, hidden, true, 0, device)?,
            fc2: Linear::new(&format!("{name}.D_fc2"), hidden, dim, true, 0, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }

    fn parameters(&self) -> Vec<Parameter> {
        let mut p = self.fc1.parameters();
        p.extend(self.fc2.parameters());
        p
    }
}

struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Parameter,
    norm2: LayerNorm,
    ffn: Ffn,
    ls2: Parameter,
    /// SelaVPR's serial (after attention) and parallel (beside the FFN) adapters.
    adapters: Option<(Adapter, Adapter)>,
    heads: usize,
}

/// The scale SelaVPR gives its parallel adapter.
const PARALLEL_ADAPTER_SCALE: f64 = 0.2;

impl Block {
    /// `x` [B, N, C] -> [B, N, C].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [b, n, c] = [x.shape()[0], x.shape()[1], x.shape()[2]];
        let h = self.heads;
        let y = self.norm1.forward(x)?.reshape(&[b * n, c])?;
        let qkv = self.qkv.forward(&y)?.reshape(&[b, n, 3, h, c / h])?;
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i, 1)?.squeeze(2)?.permute(&[0, 2, 1, 3])
        };
        let scale = 1.0 / ((c / h) as f64).sqrt();
        let attended = part(0)?.attention(&part(1)?, &part(2)?, scale)?;
        let merged = attended
            .transpose(1, 2)?
            .contiguous()?
            .reshape(&[b * n, c])?;
        let mut a = self.proj.forward(&merged)?;
        if let Some((serial, _)) = &self.adapters {
            a = a.add(&serial.forward(&a)?)?;
        }
        let x = x.add(&a.reshape(&[b, n, c])?.mul(&self.ls1.tensor())?)?;

        let z = self.norm2.forward(&x)?.reshape(&[b * n, c])?;
        let mut f = match &self.ffn {
            Ffn::Mlp { fc1, fc2 } => fc2.forward(&fc1.forward(&z)?.gelu()?)?,
            Ffn::SwiGlu { w12, w3 } => {
                let ab = w12.forward(&z)?;
                let half = ab.shape()[1] / 2;
                let (a, b) = (ab.narrow(1, 0, half)?, ab.narrow(1, half, half)?);
                w3.forward(&a.mul(&a.sigmoid()?)?.mul(&b)?)?
            }
        };
        if let Some((_, parallel)) = &self.adapters {
            f = f.add(&parallel.forward(&z)?.mul_scalar(PARALLEL_ADAPTER_SCALE)?)?;
        }
        x.add(&f.reshape(&[b, n, c])?.mul(&self.ls2.tensor())?)
    }

    fn parameters(&self) -> Vec<Parameter> {
        let mut p = self.norm1.parameters();
        p.extend(self.qkv.parameters());
        p.extend(self.proj.parameters());
        p.push(self.ls1.clone());
        p.extend(self.norm2.parameters());
        match &self.ffn {
            Ffn::Mlp { fc1, fc2 } => {
                p.extend(fc1.parameters());
                p.extend(fc2.parameters());
            }
            Ffn::SwiGlu { w12, w3 } => {
                p.extend(w12.parameters());
                p.extend(w3.parameters());
            }
        }
        p.push(self.ls2.clone());
        if let Some((a1, a2)) = &self.adapters {
            p.extend(a1.parameters());
            p.extend(a2.parameters());
        }
        p
    }
}

/// The normalised tokens of a batch: what DINOv2's `forward_features` returns.
pub struct VitFeatures {
    /// `x_norm_clstoken` [B, C].
    pub cls: Tensor,
    /// `x_norm_regtokens` [B, R, C].
    pub registers: Tensor,
    /// `x_norm_patchtokens` as a grid [B, H / patch, W / patch, C].
    pub patches: Tensor,
}

/// How the stored position embedding is resized to another grid (DINOv2's
/// `interpolate_offset` and `interpolate_antialias`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PosInterpolation {
    pub offset: f64,
    pub antialias: bool,
}

/// A DINOv2 ViT (with SelaVPR's adapters when built with them).
pub struct Vit {
    patch_embed: Conv2d,
    cls_token: Parameter,
    pos_embed: Parameter,
    mask_token: Parameter,
    register_tokens: Option<Parameter>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch: usize,
    grid: usize,
    interpolation: PosInterpolation,
}

impl Vit {
    /// The ViT under `prefix` (`backbone.` in SelaVPR, none in DINOv2's own files) as the file's
    /// `vpr.vit.*` metadata describes it; SelaVPR's adapters when `adapters`.
    fn from_file(file: &WeightsFile, prefix: &str, adapters: bool, device: &Device) -> Result<Vit> {
        let dim: usize = file.require_parsed("vpr.vit.embed_dim")?;
        let depth: usize = file.require_parsed("vpr.vit.depth")?;
        let heads: usize = file.require_parsed("vpr.vit.heads")?;
        let patch: usize = file.require_parsed("vpr.vit.patch_size")?;
        let hidden: usize = file.require_parsed("vpr.vit.mlp_hidden")?;
        let registers: usize = file.require_parsed("vpr.vit.registers")?;
        let grid: usize = file.require_parsed("vpr.vit.pos_grid")?;
        let eps: f64 = file.require_parsed("vpr.vit.layer_norm_eps")?;
        let ffn = file.require("vpr.vit.ffn")?;
        let interpolation = PosInterpolation {
            offset: file.require_parsed("vpr.vit.pos_interp_offset")?,
            antialias: file.require_parsed("vpr.vit.pos_interp_antialias")?,
        };
        for (key, value) in [
            ("vpr.vit.embed_dim", dim),
            ("vpr.vit.mlp_hidden", hidden),
            ("vpr.vit.pos_grid", grid),
        ] {
            if value == 0 || value > MAX_WIDTH {
                return Err(file.error(format!("{key} {value} is out of range (1 to {MAX_WIDTH})")));
            }
        }
        if heads == 0 || dim % heads != 0 || patch == 0 || depth == 0 || depth > 1000 {
            return Err(file.error(format!(
                "a ViT of width {dim}, {heads} heads, depth {depth}, patch {patch} is not buildable"
            )));
        }
        let adapter_hidden: usize = if adapters {
            file.require_parsed("vpr.selavpr.adapter_hidden")?
        } else {
            0
        };
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, device);
        let p = |name: &str| format!("{prefix}{name}");
        let mut blocks = Vec::with_capacity(depth);
        for i in 0..depth {
            let b = p(&format!("blocks.{i}"));
            let ffn = match ffn {
                "mlp" => Ffn::Mlp {
                    fc1: Linear::new(&format!("{b}.mlp.fc1"), dim, hidden, true, 0, device)?,
                    fc2: Linear::new(&format!("{b}.mlp.fc2"), hidden, dim, true, 0, device)?,
                },
                "swiglu" => Ffn::SwiGlu {
                    w12: Linear::new(&format!("{b}.mlp.w12"), dim, 2 * hidden, true, 0, device)?,
                    w3: Linear::new(&format!("{b}.mlp.w3"), hidden, dim, true, 0, device)?,
                },
                other => {
                    return Err(file.error(format!("vpr.vit.ffn '{other}' is not mlp or swiglu")))
                }
            };
            let adapters = adapters
                .then(|| {
                    Ok::<_, Error>((
                        Adapter::new(&format!("{b}.adapter1"), dim, adapter_hidden, device)?,
                        Adapter::new(&format!("{b}.adapter2"), dim, adapter_hidden, device)?,
                    ))
                })
                .transpose()?;
            blocks.push(Block {
                norm1: LayerNorm::new(&format!("{b}.norm1"), dim, eps, device)?,
                qkv: Linear::new(&format!("{b}.attn.qkv"), dim, 3 * dim, true, 0, device)?,
                proj: Linear::new(&format!("{b}.attn.proj"), dim, dim, true, 0, device)?,
                ls1: Parameter::new(format!("{b}.ls1.gamma"), zeros(&[dim])?),
                norm2: LayerNorm::new(&format!("{b}.norm2"), dim, eps, device)?,
                ffn,
                ls2: Parameter::new(format!("{b}.ls2.gamma"), zeros(&[dim])?),
                adapters,
                heads,
            });
        }
        Ok(Vit {
            patch_embed: Conv2d::new(
                &p("patch_embed.proj"),
                3,
                dim,
                patch,
                Conv2dOptions::new().stride(patch),
                true,
                device,
            )?,
            cls_token: Parameter::new(p("cls_token"), zeros(&[1, 1, dim])?),
            pos_embed: Parameter::new(p("pos_embed"), zeros(&[1, 1 + grid * grid, dim])?),
            mask_token: Parameter::new(p("mask_token"), zeros(&[1, dim])?),
            register_tokens: (registers > 0)
                .then(|| {
                    Ok::<_, Error>(Parameter::new(
                        p("register_tokens"),
                        zeros(&[1, registers, dim])?,
                    ))
                })
                .transpose()?,
            blocks,
            norm: LayerNorm::new(&p("norm"), dim, eps, device)?,
            patch,
            grid,
            interpolation,
        })
    }

    pub fn embed_dim(&self) -> usize {
        self.cls_token.tensor().shape()[2]
    }

    /// The position embedding of an `h` x `w` patch grid, [1, 1 + h * w, C].
    fn position_embedding(&self, h: usize, w: usize) -> Result<Tensor> {
        let pos = self.pos_embed.tensor();
        if [h, w] == [self.grid, self.grid] {
            return Ok(pos);
        }
        let c = pos.shape()[2];
        let g = self.grid;
        let patch_pos = pos.narrow(1, 1, g * g)?.reshape(&[1, g, g, c])?;
        let PosInterpolation { offset, antialias } = self.interpolation;
        let to = if offset != 0.0 {
            ResizeTo::ScaleFactor([
                (h as f64 + offset) / g as f64,
                (w as f64 + offset) / g as f64,
            ])
        } else {
            ResizeTo::Size([h, w])
        };
        let resized = patch_pos.interpolate_bicubic(to, antialias)?;
        if resized.shape()[1..3] != [h, w] {
            return shape_err!(
                "the position embedding resized from {g}x{g} is {:?}, not {h}x{w}",
                &resized.shape()[1..3]
            );
        }
        Tensor::cat(
            &[&pos.narrow(1, 0, 1)?, &resized.reshape(&[1, h * w, c])?],
            1,
        )
    }

    /// DINOv2's `forward_features` of normalised images [B, H, W, 3] (sides multiples of the
    /// patch size).
    pub fn forward_features(&self, images: &Tensor) -> Result<VitFeatures> {
        let [b, height, width] = [images.shape()[0], images.shape()[1], images.shape()[2]];
        if height % self.patch != 0 || width % self.patch != 0 {
            return shape_err!(
                "images of {height}x{width}: a ViT with {}-pixel patches needs multiples of {}",
                self.patch,
                self.patch
            );
        }
        let (h, w) = (height / self.patch, width / self.patch);
        let c = self.embed_dim();
        let patches = self.patch_embed.forward(images)?.reshape(&[b, h * w, c])?;
        let cls = self.cls_token.tensor().broadcast_to(&[b, 1, c])?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let mut x = tokens.add(&self.position_embedding(h, w)?)?;
        let registers = self
            .register_tokens
            .as_ref()
            .map_or(0, |r| r.tensor().shape()[1]);
        if let Some(r) = &self.register_tokens {
            let r = r.tensor().broadcast_to(&[b, registers, c])?;
            x = Tensor::cat(&[&x.narrow(1, 0, 1)?, &r, &x.narrow(1, 1, h * w)?], 1)?;
        }
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = self.norm.forward(&x)?;
        Ok(VitFeatures {
            cls: x.narrow(1, 0, 1)?.reshape(&[b, c])?,
            registers: x.narrow(1, 1, registers)?.contiguous()?,
            patches: x.narrow(1, 1 + registers, h * w)?.reshape(&[b, h, w, c])?,
        })
    }
}

impl Module for Vit {
    fn parameters(&self) -> Vec<Parameter> {
        let mut p = self.patch_embed.parameters();
        p.push(self.cls_token.clone());
        p.push(self.pos_embed.clone());
        p.push(self.mask_token.clone());
        p.extend(self.register_tokens.clone());
        for block in &self.blocks {
            p.extend(block.parameters());
        }
        p.extend(self.norm.parameters());
        p
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        // the patch embedding's OIHW weight is converted to OHWI at load
        let mut e = self.patch_embed.state_entries();
        let rest: Vec<Parameter> = self.parameters().into_iter().skip(e.len()).collect();
        e.extend(plain_entries(&rest, &[]));
        e
    }
}

/// A plain DINOv2 backbone as a place model: the descriptor is the normalised class token.
pub struct Dinov2 {
    info: ModelInfo,
    vit: Vit,
}

impl Dinov2 {
    pub fn from_file(file: &WeightsFile, device: &Device) -> Result<Dinov2> {
        let vit = Vit::from_file(file, "", false, device)?;
        load_strict(&vit.state_entries(), file, true)?;
        for p in vit.parameters() {
            p.set_trainable(false);
        }
        Ok(Dinov2 {
            info: ModelInfo {
                description: format!(
                    "dinov2 {} -> {}",
                    file.require("vpr.backbone")?,
                    vit.embed_dim()
                ),
                dim: vit.embed_dim(),
                input: InputSpec::from_file(file)?,
                device: device.clone(),
            },
            vit,
        })
    }

    pub fn features(&self, images: &Tensor) -> Result<VitFeatures> {
        no_grad(|| self.vit.forward_features(images))
    }
}

impl PlaceModel for Dinov2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        self.info.check_images(images)?;
        Ok(self.features(images)?.cls)
    }
}

/// SelaVPR: the adapted ViT, the global head (L2 over channels, GeM, L2) and LocalAdapt (two
/// transposed convolutions 3x3/2, ReLU between, L2 per location).
pub struct SelaVpr {
    info: ModelInfo,
    vit: Vit,
    gem: GeM,
    upconv1: ConvTranspose2d,
    upconv2: ConvTranspose2d,
}

impl SelaVpr {
    /// The network a converted SelaVPR file describes, weights loaded strictly, the backbone
    /// frozen (adapters, GeM and LocalAdapt trainable).
    pub fn from_file(file: &WeightsFile, device: &Device) -> Result<SelaVpr> {
        let vit = Vit::from_file(file, "backbone.", true, device)?;
        let dim = vit.embed_dim();
        let shapes = Shapes::new(file);
        let hidden = shapes.dim("LocalAdapt.upconv1.weight", 1);
        let local = shapes.dim("LocalAdapt.upconv2.weight", 1);
        let widths_known = shapes.finish()?;
        let opts = ConvTranspose2dOptions::new().stride(2).padding(1);
        let net = SelaVpr {
            info: ModelInfo {
                description: format!("selavpr {} -> {dim}", file.require("vpr.backbone")?),
                dim,
                input: InputSpec::from_file(file)?,
                device: device.clone(),
            },
            gem: GeM::new(
                "aggregation.1.p",
                3.0,
                file.require_parsed("vpr.gem.eps")?,
                device,
            )?,
            upconv1: ConvTranspose2d::new(
                "LocalAdapt.upconv1",
                dim,
                hidden,
                3,
                opts,
                true,
                device,
            )?,
            upconv2: ConvTranspose2d::new(
                "LocalAdapt.upconv2",
                hidden,
                local,
                3,
                opts,
                true,
                device,
            )?,
            vit,
        };
        load_strict(&net.state_entries(), file, widths_known)?;
        for p in net.vit.parameters() {
            p.set_trainable(p.name().contains("adapter"));
        }
        Ok(net)
    }

    /// Global descriptors [B, C] and local features [B, 4h - 3, 4w - 3, local] of normalised
    /// images [B, H, W, 3].
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let patches = self.vit.forward_features(images)?.patches;
        let up = self.upconv1.forward(&patches)?.relu()?;
        let local = l2_normalize(&self.upconv2.forward(&up)?, -1)?;
        Ok((self.global(&patches)?, local))
    }

    /// L2 over channels, GeM, L2 of the patch tokens [B, h, w, C].
    fn global(&self, patches: &Tensor) -> Result<Tensor> {
        let pooled = flatten(&self.gem.forward(&l2_normalize(patches, -1)?)?)?;
        l2_normalize(&pooled, -1)
    }
}

impl Module for SelaVpr {
    fn parameters(&self) -> Vec<Parameter> {
        let mut p = self.vit.parameters();
        p.extend(self.gem.parameters());
        p.extend(self.upconv1.parameters());
        p.extend(self.upconv2.parameters());
        p
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        let mut e = self.vit.state_entries();
        e.extend(self.gem.state_entries());
        e.extend(self.upconv1.state_entries());
        e.extend(self.upconv2.state_entries());
        e
    }
}

impl PlaceModel for SelaVpr {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        self.info.check_images(images)?;
        // the local branch is not needed for global descriptors
        no_grad(|| self.global(&self.vit.forward_features(images)?.patches))
    }

    fn has_local_features(&self) -> bool {
        true
    }

    fn descriptors_and_local(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        self.info.check_images(images)?;
        let (global, local) = no_grad(|| self.forward(images))?;
        Ok((global, Some(local)))
    }
}
