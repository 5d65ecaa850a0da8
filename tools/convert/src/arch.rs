//! Recognising the official architectures from tensor names and shapes alone.
//!
//! Each recogniser walks the exact key layout its repository produces (module indices
//! included), checks every shape against the widths it has already read, and claims the
//! keys it understood. A layout is accepted only when some recogniser claims every key, so a
//! file with one stray tensor is not silently half-understood. Widths are read from the file,
//! never assumed: a ResNet-50 is "bottleneck blocks in layers of 3, 4, 6, 3", whatever its
//! channel counts, which is also what lets the test fixtures use tiny widths. Names that need
//! real widths (ViT-S versus ViT-B) are given only when the widths match the official ones.
//!
//! The metadata written for each architecture is documented in tools/convert/README.md.

use std::collections::{BTreeMap, BTreeSet};

use crate::err;
use crate::error::Result;

/// Architectures `--arch` accepts, besides `raw`.
pub const ARCHES: [&str; 8] = [
    "cosplace",
    "eigenplaces",
    "netvlad",
    "selavpr",
    "dinov2",
    "benchmark",
    "clusvpr",
    "torchvision",
];

const IMAGENET_MEAN: &str = "0.485,0.456,0.406";
const IMAGENET_STD: &str = "0.229,0.224,0.225";
/// OpenIBL feeds 0-255 RGB minus the MatConvNet means: std 1/255 on ToTensor's 0-1 range.
const OPENIBL_MEAN: &str = "0.48502,0.45796,0.4076";
const OPENIBL_STD: &str = "0.00392156862745098,0.00392156862745098,0.00392156862745098";

/// What a recogniser found: the architecture and the metadata needed to build it.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub arch: &'static str,
    pub meta: BTreeMap<String, String>,
    pub notes: Vec<String>,
    /// Keys recognised (their shapes checked) but left out of the output.
    pub dropped: Vec<String>,
}

impl Found {
    fn new(arch: &'static str) -> Self {
        Found {
            arch,
            meta: BTreeMap::from([("vpr.arch".to_string(), arch.to_string())]),
            notes: Vec::new(),
            dropped: Vec::new(),
        }
    }

    fn set(&mut self, k: &str, v: impl ToString) {
        self.meta.insert(format!("vpr.{k}"), v.to_string());
    }
}

type Fit<T> = std::result::Result<T, String>;

/// The key -> shape table with a record of which keys a recogniser has claimed.
struct Keys<'t> {
    all: BTreeMap<&'t str, &'t [usize]>,
    used: BTreeSet<&'t str>,
}

impl<'t> Keys<'t> {
    fn new(tensors: &'t [(String, Vec<usize>)]) -> Self {
        Keys {
            all: tensors
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice()))
                .collect(),
            used: BTreeSet::new(),
        }
    }

    fn has(&self, k: &str) -> bool {
        self.all.contains_key(k)
    }

    /// Claims `k`, requiring `shape` where an entry is `Some`, and returns its shape.
    fn take(&mut self, k: &str, shape: &[Option<usize>]) -> Fit<&'t [usize]> {
        let (&name, &s) = self
            .all
            .get_key_value(k)
            .ok_or_else(|| format!("missing {k}"))?;
        let fits =
            s.len() == shape.len() && s.iter().zip(shape).all(|(a, b)| b.is_none_or(|b| *a == b));
        if !fits {
            let want: Vec<String> = shape
                .iter()
                .map(|d| d.map_or("_".into(), |d| d.to_string()))
                .collect();
            return Err(format!(
                "{k} has shape {s:?}, expected [{}]",
                want.join(", ")
            ));
        }
        self.used.insert(name);
        Ok(s)
    }

    fn leftovers(&self) -> Vec<&'t str> {
        self.all
            .keys()
            .filter(|k| !self.used.contains(*k))
            .copied()
            .collect()
    }
}

const fn d(n: usize) -> Option<usize> {
    Some(n)
}
const ANY: Option<usize> = None;

/// Conv2d `{p}.weight` [out, in, kh, kw] (+ `{p}.bias`), returns out.
fn conv(k: &mut Keys, p: &str, cin: usize, kh: usize, bias: bool) -> Fit<usize> {
    let out = k.take(&format!("{p}.weight"), &[ANY, d(cin), d(kh), d(kh)])?[0];
    if bias {
        k.take(&format!("{p}.bias"), &[d(out)])?;
    }
    Ok(out)
}

/// BatchNorm2d; `num_batches_tracked` is optional (old torch, or dropped earlier).
fn bn(k: &mut Keys, p: &str, c: usize) -> Fit<()> {
    for n in ["weight", "bias", "running_mean", "running_var"] {
        k.take(&format!("{p}.{n}"), &[d(c)])?;
    }
    if k.has(&format!("{p}.num_batches_tracked")) {
        k.take(&format!("{p}.num_batches_tracked"), &[])?;
    }
    Ok(())
}

/// Linear `{p}.weight` [out, in] + bias, returns out.
fn linear(k: &mut Keys, p: &str, cin: usize, out: Option<usize>) -> Fit<usize> {
    let o = k.take(&format!("{p}.weight"), &[out, d(cin)])?[0];
    k.take(&format!("{p}.bias"), &[d(o)])?;
    Ok(o)
}

/// LayerNorm weight + bias of width c.
fn norm(k: &mut Keys, p: &str, c: usize) -> Fit<()> {
    k.take(&format!("{p}.weight"), &[d(c)])?;
    k.take(&format!("{p}.bias"), &[d(c)])?;
    Ok(())
}

/// A CNN backbone as the gmberton repos wrap it: `nn.Sequential` of torchvision children.
struct Cnn {
    name: String,
    channels: usize,
    stride: usize,
    meta: Vec<(&'static str, String)>,
}

/// Where a ResNet's children are: numbered by the `nn.Sequential` the gmberton repos wrap them in
/// (`backbone.0` conv1, `backbone.1` bn1, `backbone.4`..`backbone.7` layer1..layer4), or named by
/// torchvision's own module (`conv1`, `bn1`, `layer1`..`layer4`).
#[derive(Clone, Copy)]
enum ResNames<'p> {
    Sequential(&'p str),
    Torchvision,
}

impl ResNames<'_> {
    /// The key prefix of child `i` of the ResNet (Sequential numbering, 0 to 7).
    fn child(self, i: usize) -> String {
        match (self, i) {
            (ResNames::Sequential(p), i) => format!("{p}{i}"),
            (ResNames::Torchvision, 0) => "conv1".into(),
            (ResNames::Torchvision, 1) => "bn1".into(),
            (ResNames::Torchvision, i) => format!("layer{}", i - 3),
        }
    }

    fn describe(self) -> String {
        match self {
            ResNames::Sequential(p) => format!("under {p:?}"),
            ResNames::Torchvision => "with torchvision's names".into(),
        }
    }
}

/// torchvision ResNet children [:-2] (conv5) or [:-3] (conv4) at `names`.
fn resnet(k: &mut Keys, names: ResNames) -> Fit<Cnn> {
    let c0 = conv(k, &names.child(0), 3, 7, false)?;
    bn(k, &names.child(1), c0)?;
    let bottleneck = k.has(&format!("{}.0.conv3.weight", names.child(4)));
    let mut ch = c0;
    let mut counts = Vec::new();
    for layer in 4..=7 {
        let prefix = names.child(layer);
        let mut j = 0;
        while k.has(&format!("{prefix}.{j}.conv1.weight")) {
            ch = res_block(k, &format!("{prefix}.{j}"), ch, bottleneck)?;
            j += 1;
        }
        if j == 0 {
            break;
        }
        counts.push(j);
    }
    let depth = match (bottleneck, &counts[..counts.len().min(3)]) {
        (false, [2, 2, 2]) => 18,
        (false, [3, 4, 6]) => 34,
        (true, [3, 4, 6]) => 50,
        (true, [3, 4, 23]) => 101,
        (true, [3, 8, 36]) => 152,
        _ => {
            return Err(format!(
                "ResNet {} has blocks per layer {counts:?}, not a torchvision ResNet",
                names.describe()
            ))
        }
    };
    let last = if depth == 18 { 2 } else { 3 };
    let (truncate, stride) = match counts.len() {
        4 if counts[3] == last => ("conv5", 32),
        3 => ("conv4", 16),
        _ => {
            return Err(format!(
                "ResNet-{depth} {} has blocks per layer {counts:?}",
                names.describe()
            ))
        }
    };
    let blocks: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
    Ok(Cnn {
        name: format!("resnet{depth}"),
        channels: ch,
        stride,
        meta: vec![
            (
                "resnet.block",
                if bottleneck { "bottleneck" } else { "basic" }.to_string(),
            ),
            ("resnet.blocks", blocks.join(",")),
            ("backbone.truncate", truncate.to_string()),
        ],
    })
}

fn res_block(k: &mut Keys, p: &str, cin: usize, bottleneck: bool) -> Fit<usize> {
    let w = conv(
        k,
        &format!("{p}.conv1"),
        cin,
        if bottleneck { 1 } else { 3 },
        false,
    )?;
    bn(k, &format!("{p}.bn1"), w)?;
    let mut out = conv(k, &format!("{p}.conv2"), w, 3, false)?;
    bn(k, &format!("{p}.bn2"), out)?;
    if bottleneck {
        out = conv(k, &format!("{p}.conv3"), out, 1, false)?;
        bn(k, &format!("{p}.bn3"), out)?;
    }
    if k.has(&format!("{p}.downsample.0.weight")) {
        let o = conv(k, &format!("{p}.downsample.0"), cin, 1, false)?;
        if o != out {
            return Err(format!(
                "{p}.downsample gives {o} channels, the block {out}"
            ));
        }
        bn(k, &format!("{p}.downsample.1"), out)?;
    } else if cin != out {
        return Err(format!(
            "{p} changes {cin} to {out} channels without a downsample"
        ));
    }
    Ok(out)
}

/// torchvision VGG16 `features` children [:-2]: 13 3x3 convs, ending at conv5_3 (pre-ReLU).
fn vgg16(k: &mut Keys, p: &str) -> Fit<Cnn> {
    let mut ch = 3;
    for i in [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28] {
        ch = conv(k, &format!("{p}{i}"), ch, 3, true)?;
    }
    Ok(Cnn {
        name: "vgg16".into(),
        channels: ch,
        stride: 16,
        meta: vec![("backbone.truncate", "conv5_3".to_string())],
    })
}

/// ResNet or VGG16 under prefix `p`, whichever the keys say.
fn cnn(k: &mut Keys, p: &str) -> Fit<Cnn> {
    if k.has(&format!("{p}0.bias")) {
        vgg16(k, p)
    } else {
        resnet(k, ResNames::Sequential(p))
    }
}

fn put_cnn(f: &mut Found, b: &Cnn) {
    f.set("backbone", &b.name);
    f.set("backbone.channels", b.channels);
    f.set("backbone.stride", b.stride);
    for (k, v) in &b.meta {
        f.set(k, v);
    }
}

fn imagenet(f: &mut Found) {
    f.set("input.mean", IMAGENET_MEAN);
    f.set("input.std", IMAGENET_STD);
}

/// GeM as the gmberton repos use it: per-location L2 first, clamp at eps, learnable p.
fn gem(k: &mut Keys, f: &mut Found, p: &str) -> Fit<()> {
    k.take(p, &[d(1)])?;
    f.set("gem.eps", "1e-6");
    f.set("gem.l2_before_pool", "true");
    Ok(())
}

/// CosPlace / EigenPlaces `GeoLocalizationNet`: backbone -> L2, GeM, Flatten, Linear, L2.
fn cosplace(k: &mut Keys, arch: &'static str) -> Fit<Found> {
    let b = cnn(k, "backbone.")?;
    if b.stride == 16 && b.name != "vgg16" {
        return Err("CosPlace uses whole ResNets (conv5), this one ends at layer3".into());
    }
    let mut f = Found::new(arch);
    gem(k, &mut f, "aggregation.1.p")?;
    let dim = linear(k, "aggregation.3", b.channels, None)?;
    put_cnn(&mut f, &b);
    f.set("aggregation", "gem_fc");
    f.set("dim", dim);
    imagenet(&mut f);
    // Evaluated at full resolution; CosPlace trains at 512x512.
    f.set("input.size", "any");
    f.set("input.antialias", "true");
    Ok(f)
}

/// NetVLAD `{p}.centroids` [K, C] and `{p}.conv.weight` [K, C, 1, 1] (no bias).
fn netvlad(k: &mut Keys, f: &mut Found, p: &str, c: usize) -> Fit<usize> {
    let kk = k.take(&format!("{p}.centroids"), &[ANY, d(c)])?[0];
    k.take(&format!("{p}.conv.weight"), &[d(kk), d(c), d(1), d(1)])?;
    f.set("netvlad.clusters", kk);
    f.set("netvlad.dim", c);
    f.set("netvlad.normalize_input", "true");
    f.set("netvlad.flatten", "cluster-major");
    Ok(kk * c)
}

/// OpenIBL `EmbedNetPCA` (hub `vgg16_netvlad`) or its training checkpoints without PCA.
fn openibl(k: &mut Keys) -> Fit<Found> {
    let b = vgg16(k, "base_model.base.")?;
    let mut f = Found::new("netvlad");
    put_cnn(&mut f, &b);
    let vlad = netvlad(k, &mut f, "net_vlad", b.channels)?;
    if k.has("pca_layer.weight") {
        let pca = k.take("pca_layer.weight", &[ANY, d(vlad), d(1), d(1)])?[0];
        k.take("pca_layer.bias", &[d(pca)])?;
        f.set("aggregation", "netvlad_pca");
        f.set("pca.dim", pca);
        f.set("dim", pca);
    } else {
        f.set("aggregation", "netvlad");
        f.set("dim", vlad);
    }
    f.set("input.mean", OPENIBL_MEAN);
    f.set("input.std", OPENIBL_STD);
    f.set("input.size", "resize:480x640");
    // OpenIBL resizes the 8-bit image with PIL (a filter widened when downscaling, like
    // torchvision's antialias) before normalising.
    f.set("input.antialias", "true");
    Ok(f)
}

/// One CWTNet block of ClusVPR's `vit_layer` on a map of `c` channels: three depthwise 3x3
/// convolutions, the clustering-weighted transformer on the second half of the channels, and the
/// two BatchNorms (`global_bn` is defined but unused by the released forward; it is kept so the
/// state dict loads strictly). Returns (transformer layers, MLP width).
fn cwtnet(k: &mut Keys, p: &str, c: usize) -> Fit<(usize, usize)> {
    let b = c / 2;
    if b * 2 != c {
        return Err(format!("{p}: {c} channels do not split into two branches"));
    }
    for n in ["local_dwconvl", "local_dwconvg", "global_dwconv"] {
        k.take(&format!("{p}.{n}.weight"), &[d(b), d(1), d(3), d(3)])?;
    }
    let t = format!("{p}.global_cwt.transformer");
    // The transformer's output is added back onto its input branch: the widths must agree.
    k.take(&format!("{t}.embeddings.cls_token"), &[d(1), d(1), d(b)])?;
    let width = conv(k, &format!("{t}.embeddings.patch_embeddings"), b, 1, true)?;
    if width != b {
        return Err(format!("{t} is {width} wide, not {b}"));
    }
    let mut layers = 0;
    let mut mlp = 0;
    while k.has(&format!("{t}.encoder.layer.{layers}.attn.query.weight")) {
        let l = format!("{t}.encoder.layer.{layers}");
        for n in ["query", "key", "value", "out"] {
            linear(k, &format!("{l}.attn.{n}"), b, d(b))?;
        }
        let h = linear(k, &format!("{l}.ffn.fc1"), b, None)?;
        linear(k, &format!("{l}.ffn.fc2"), h, d(b))?;
        if layers > 0 && h != mlp {
            return Err(format!("{l}.ffn has width {h}, layer 0 has {mlp}"));
        }
        mlp = h;
        layers += 1;
    }
    if layers == 0 {
        return Err(format!("missing {t}.encoder.layer.0.attn.query.weight"));
    }
    k.take(
        &format!("{p}.global_cwt.transpose.weight"),
        &[d(b), d(1), d(2), d(2)],
    )?;
    conv(k, &format!("{p}.global_cwt.point_conv"), b, 1, false)?;
    bn(k, &format!("{p}.local_bn"), b)?;
    bn(k, &format!("{p}.global_bn"), b)?;
    Ok((layers, mlp))
}

/// ClusVPR (Xu et al.): OpenIBL's VGG16 EmbedNet with the `ClusVPR` layer as `net_vlad`: CWTNet
/// blocks on the conv5_3 map, then the grouped VLAD with a per-location GeM attention. The map's
/// size is fixed by the GeM exponent's length; the released code builds it for 30x40 (480x640
/// images), and a length of L is read as the 3:4 map of L locations.
fn clusvpr(k: &mut Keys) -> Fit<Found> {
    let b = vgg16(k, "base_model.base.")?;
    let c = b.channels;
    let mut f = Found::new("clusvpr");
    put_cnn(&mut f, &b);
    let p = "net_vlad";
    let expanded = k.take(&format!("{p}.linear1.weight"), &[ANY, d(c)])?[0];
    let clusters = k.take(&format!("{p}.centroids"), &[ANY, ANY])?[0];
    let group_dim = k.take(&format!("{p}.centroids"), &[d(clusters), ANY])?[1];
    k.take(
        &format!("{p}.conv.weight"),
        &[d(clusters), d(group_dim), d(1), d(1)],
    )?;
    if group_dim == 0 || expanded % group_dim != 0 || expanded % c != 0 {
        return Err(format!(
            "{p}.linear1 gives {expanded} channels, not a multiple of the input {c} and of the group width {group_dim}"
        ));
    }
    let locations = k.take(&format!("{p}.GeM_pool.p"), &[ANY])?[0];
    let h = (1..=locations)
        .find(|h| 4 * h * h >= 3 * locations)
        .unwrap_or(0);
    if h % 3 != 0 || 4 * h * h != 3 * locations {
        return Err(format!(
            "{p}.GeM_pool.p has {locations} locations, not a 3:4 map (30x40 has 1200)"
        ));
    }
    let w = 4 * h / 3;
    let mut blocks = 0;
    let mut cwt = (0, 0);
    while k.has(&format!("{p}.vit_layer.{blocks}.local_dwconvl.weight")) {
        let got = cwtnet(k, &format!("{p}.vit_layer.{blocks}"), c)?;
        if blocks > 0 && got != cwt {
            return Err(format!(
                "{p}.vit_layer.{blocks} has {got:?} (layers, MLP width), block 0 has {cwt:?}"
            ));
        }
        cwt = got;
        blocks += 1;
    }
    if blocks == 0 {
        return Err(format!("missing {p}.vit_layer.0.local_dwconvl.weight"));
    }
    f.set("aggregation", "grouped_vlad");
    f.set("dim", clusters * group_dim);
    f.set("clusvpr.clusters", clusters);
    f.set("clusvpr.groups", expanded / group_dim);
    f.set("clusvpr.group_dim", group_dim);
    f.set("clusvpr.expansion", expanded / c);
    f.set("clusvpr.map", format!("{h}x{w}"));
    f.set("clusvpr.gem.eps", "1e-6");
    f.set("clusvpr.blocks", blocks);
    f.set("clusvpr.cwt.layers", cwt.0);
    f.set("clusvpr.cwt.mlp_hidden", cwt.1);
    // Not in the weights: the released configuration (configs.get_vgg, Attention.k + 1).
    f.set("clusvpr.cwt.heads", 2);
    f.set("clusvpr.cwt.knn", 11);
    f.set("input.mean", OPENIBL_MEAN);
    f.set("input.std", OPENIBL_STD);
    f.set(
        "input.size",
        format!("resize:{}x{}", h * b.stride, w * b.stride),
    );
    // ClusVPR builds on OpenIBL's data pipeline (PIL resize before normalising).
    f.set("input.antialias", "true");
    Ok(f)
}

/// deep-visual-geo-localization-benchmark: ResNet conv4/conv5 or VGG16 with GeM, GeM+FC or
/// NetVLAD.
fn benchmark(k: &mut Keys) -> Fit<Found> {
    let b = cnn(k, "backbone.")?;
    let mut f = Found::new("benchmark");
    put_cnn(&mut f, &b);
    if k.has("aggregation.centroids") {
        let dim = netvlad(k, &mut f, "aggregation", b.channels)?;
        f.set("aggregation", "netvlad");
        f.set("dim", dim);
    } else if k.has("aggregation.0.1.p") {
        gem(k, &mut f, "aggregation.0.1.p")?;
        let dim = linear(k, "aggregation.1", b.channels, None)?;
        f.set("aggregation", "gem_fc");
        f.set("dim", dim);
    } else {
        gem(k, &mut f, "aggregation.1.p")?;
        f.set("aggregation", "gem");
        f.set("dim", b.channels);
    }
    imagenet(&mut f);
    f.set("input.size", "resize:480x640");
    // The benchmark resizes normalised tensors with torchvision < 0.17: bilinear, no antialias.
    f.set("input.antialias", "false");
    Ok(f)
}

/// A DINOv2 ViT under prefix `p`; with `adapters`, SelaVPR's two adapters per block.
fn vit(k: &mut Keys, f: &mut Found, p: &str, adapters: bool) -> Fit<usize> {
    let dim = k.take(&format!("{p}cls_token"), &[d(1), d(1), ANY])?[2];
    let tokens = k.take(&format!("{p}pos_embed"), &[d(1), ANY, d(dim)])?[1];
    k.take(&format!("{p}mask_token"), &[d(1), d(dim)])?;
    let registers = if k.has(&format!("{p}register_tokens")) {
        k.take(&format!("{p}register_tokens"), &[d(1), ANY, d(dim)])?[1]
    } else {
        0
    };
    let patch = k.take(
        &format!("{p}patch_embed.proj.weight"),
        &[d(dim), d(3), ANY, ANY],
    )?[2];
    k.take(
        &format!("{p}patch_embed.proj.weight"),
        &[d(dim), d(3), d(patch), d(patch)],
    )?;
    k.take(&format!("{p}patch_embed.proj.bias"), &[d(dim)])?;
    let grid = (1..=tokens).find(|g| g * g + 1 >= tokens).unwrap_or(0);
    if grid * grid + 1 != tokens {
        return Err(format!(
            "{p}pos_embed has {tokens} tokens, not 1 + a square grid"
        ));
    }
    let swiglu = k.has(&format!("{p}blocks.0.mlp.w12.weight"));
    let mut depth = 0;
    let mut hidden = 0;
    let mut adapter = 0;
    while k.has(&format!("{p}blocks.{depth}.norm1.weight")) {
        let b = format!("{p}blocks.{depth}");
        norm(k, &format!("{b}.norm1"), dim)?;
        linear(k, &format!("{b}.attn.qkv"), dim, d(3 * dim))?;
        linear(k, &format!("{b}.attn.proj"), dim, d(dim))?;
        k.take(&format!("{b}.ls1.gamma"), &[d(dim)])?;
        norm(k, &format!("{b}.norm2"), dim)?;
        let h = if swiglu {
            let h2 = linear(k, &format!("{b}.mlp.w12"), dim, None)?;
            linear(k, &format!("{b}.mlp.w3"), h2 / 2, d(dim))?;
            h2 / 2
        } else {
            let h = linear(k, &format!("{b}.mlp.fc1"), dim, None)?;
            linear(k, &format!("{b}.mlp.fc2"), h, d(dim))?;
            h
        };
        if depth > 0 && h != hidden {
            return Err(format!("{b}.mlp has width {h}, block 0 has {hidden}"));
        }
        hidden = h;
        k.take(&format!("{b}.ls2.gamma"), &[d(dim)])?;
        if adapters {
            for a in ["adapter1", "adapter2"] {
                let w = linear(k, &format!("{b}.{a}.D_fc1"), dim, None)?;
                linear(k, &format!("{b}.{a}.D_fc2"), w, d(dim))?;
                if (depth, a) != (0, "adapter1") && w != adapter {
                    return Err(format!("{b}.{a} has width {w}, block 0 has {adapter}"));
                }
                adapter = w;
            }
        }
        depth += 1;
    }
    if depth == 0 {
        return Err(format!("missing {p}blocks.0.norm1.weight"));
    }
    norm(k, &format!("{p}norm"), dim)?;

    let ffn = if swiglu { "swiglu" } else { "mlp" };
    let size = match (dim, depth, ffn, patch) {
        (384, 12, "mlp", 14) => Some("s"),
        (768, 12, "mlp", 14) => Some("b"),
        (1024, 24, "mlp", 14) => Some("l"),
        (1536, 40, "swiglu", 14) => Some("g"),
        _ => None,
    };
    let name = match (size, registers) {
        (Some(s), 0) => format!("dinov2_vit{s}14"),
        (Some(s), r) => format!("dinov2_vit{s}14_reg{r}"),
        (None, _) => "dinov2_custom".to_string(),
    };
    f.set("backbone", name);
    f.set("vit.embed_dim", dim);
    f.set("vit.depth", depth);
    // DINOv2 uses 64-wide heads at every size (ViT-S 6 ... ViT-g 24).
    f.set("vit.heads", (dim / 64).max(1));
    f.set("vit.patch_size", patch);
    f.set("vit.ffn", ffn);
    f.set("vit.mlp_hidden", hidden);
    f.set("vit.registers", registers);
    f.set("vit.pos_grid", grid);
    f.set("vit.layer_norm_eps", "1e-6");
    f.set("vit.layerscale", "true");
    if adapters {
        f.set("selavpr.adapter_hidden", adapter);
    }
    Ok(dim)
}

/// SelaVPR: DINOv2 ViT-L/14 with adapters, GeM over patch tokens, and LocalAdapt.
fn selavpr(k: &mut Keys) -> Fit<Found> {
    let mut f = Found::new("selavpr");
    let dim = vit(k, &mut f, "backbone.", true)?;
    gem(k, &mut f, "aggregation.1.p")?;
    let l1 = k.take("LocalAdapt.upconv1.weight", &[d(dim), ANY, d(3), d(3)])?[1];
    k.take("LocalAdapt.upconv1.bias", &[d(l1)])?;
    let l2 = k.take("LocalAdapt.upconv2.weight", &[d(l1), ANY, d(3), d(3)])?[1];
    k.take("LocalAdapt.upconv2.bias", &[d(l2)])?;
    f.set("aggregation", "gem");
    f.set("dim", dim);
    f.set("selavpr.parallel_adapter_scale", "0.2");
    f.set("selavpr.local_hidden", l1);
    f.set("selavpr.local_dim", l2);
    // SelaVPR resizes pos-embed with DINOv2's 0.1-offset scale factor and no antialias,
    // with or without registers.
    f.set("vit.pos_interp_offset", "0.1");
    f.set("vit.pos_interp_antialias", "false");
    imagenet(&mut f);
    f.set("input.size", "fixed:224x224");
    // SelaVPR pins torchvision 0.15, whose tensor Resize does not antialias.
    f.set("input.antialias", "false");
    Ok(f)
}

/// A plain DINOv2 backbone as published by facebookresearch; the descriptor is the
/// normalised CLS token.
fn dinov2(k: &mut Keys) -> Fit<Found> {
    let mut f = Found::new("dinov2");
    let dim = vit(k, &mut f, "", false)?;
    let registers = f.meta["vpr.vit.registers"] != "0";
    f.set("aggregation", "cls");
    f.set("dim", dim);
    // The hub's register variants interpolate with antialias and no offset (dinov2 PR #378).
    f.set(
        "vit.pos_interp_offset",
        if registers { "0.0" } else { "0.1" },
    );
    f.set("vit.pos_interp_antialias", registers);
    imagenet(&mut f);
    f.set("input.size", "multiple:14");
    f.set("input.antialias", "true");
    Ok(f)
}

/// A torchvision ImageNet classifier, as torchvision downloads it: ResNet-18/34/50/101/152 under
/// its own names (`conv1`, `bn1`, `layer1`..`layer4`, `fc`) or plain VGG16 (`features.N`,
/// `classifier.{0,3,6}`). It is a backbone to start training from (`vpr-engine train --init`), not
/// a place-recognition model. The classifier is optional; when present its shapes are checked
/// and it is dropped from the output: training never uses it, and VGG16's is 90% of the file.
fn torchvision(k: &mut Keys) -> Fit<Found> {
    let mut f = Found::new("torchvision");
    let b = if k.has("features.0.weight") {
        // Claimed first, so that the refusal names torchvision as the closest layout.
        conv(k, "features.0", 3, 3, true)?;
        if k.has("features.1.running_mean") {
            return Err(
                "features.1 is a BatchNorm: VGG16-BN is not supported (train builds plain VGG16)"
                    .into(),
            );
        }
        let b = vgg16(k, "features.")?;
        if k.has("classifier.0.weight") {
            // The classifier sees VGG's 7x7 adaptive-average-pooled map, flattened.
            let hidden = linear(k, "classifier.0", b.channels * 49, None)?;
            let hidden = linear(k, "classifier.3", hidden, None)?;
            linear(k, "classifier.6", hidden, None)?;
            f.dropped = ["classifier.0", "classifier.3", "classifier.6"]
                .iter()
                .flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")])
                .collect();
        }
        b
    } else {
        let b = resnet(k, ResNames::Torchvision)?;
        if b.stride != 32 {
            return Err("torchvision ResNet without layer4".into());
        }
        // Widths are free (tiny test models), but torchvision's wide ResNets have the same
        // layout as ResNet-50/101 with bottlenecks expanding 2x instead of 4x.
        // Every claimed conv3 has its block's conv1 claimed too, both 4-d.
        for block in k
            .used
            .iter()
            .filter_map(|n| n.strip_suffix(".conv3.weight"))
        {
            let width = k.all[format!("{block}.conv1.weight").as_str()][0];
            let out = k.all[format!("{block}.conv3.weight").as_str()][0];
            if out != 4 * width {
                return Err(format!(
                    "{block} expands {width} to {out} channels, not 4x: a wide ResNet, not {}",
                    b.name
                ));
            }
        }
        if k.has("fc.weight") {
            linear(k, "fc", b.channels, None)?;
            f.dropped = vec!["fc.weight".into(), "fc.bias".into()];
        }
        b
    };
    if !f.dropped.is_empty() {
        f.notes.push(format!(
            "dropped the ImageNet classifier ({}): train --init uses the backbone only",
            f.dropped.join(", ")
        ));
    }
    put_cnn(&mut f, &b);
    imagenet(&mut f);
    Ok(f)
}

type Recogniser = fn(&mut Keys) -> Fit<Found>;

/// Every recogniser, in the order they are tried. CosPlace stands for EigenPlaces too.
fn recognisers() -> [(&'static str, Recogniser); 7] {
    [
        ("cosplace", |k| cosplace(k, "cosplace")),
        ("netvlad", openibl),
        ("clusvpr", clusvpr),
        ("selavpr", selavpr),
        ("dinov2", dinov2),
        ("benchmark", benchmark),
        ("torchvision", torchvision),
    ]
}

/// Finds the architecture of a state dict from `(name, shape)` pairs. `forced` is `--arch`;
/// `file_name` helps tell CosPlace from EigenPlaces, which share a layout.
pub fn recognise(
    tensors: &[(String, Vec<usize>)],
    forced: Option<&str>,
    file_name: &str,
) -> Result<Found> {
    let wanted = match forced {
        Some("eigenplaces") => Some("cosplace"),
        Some(a) if ARCHES.contains(&a) => Some(a),
        Some(a) => {
            return Err(err!(
                "unknown --arch {a:?}; known: {}, raw",
                ARCHES.join(", ")
            ))
        }
        None => None,
    };
    let mut best: Option<(usize, &str, String, Vec<&str>)> = None;
    for (name, rec) in recognisers() {
        if wanted.is_some_and(|w| w != name) {
            continue;
        }
        let mut k = Keys::new(tensors);
        let result = rec(&mut k);
        let left = k.leftovers();
        match result {
            Ok(f) if left.is_empty() => return Ok(finish(f, forced, file_name)),
            Ok(_) => {
                let why = format!("{} keys are not part of it", left.len());
                if best.as_ref().is_none_or(|b| k.used.len() > b.0) {
                    best = Some((k.used.len(), name, why, left));
                }
            }
            Err(why) => {
                if best.as_ref().is_none_or(|b| k.used.len() > b.0) {
                    best = Some((k.used.len(), name, why, left));
                }
            }
        }
    }
    let (_, name, why, left) = best.unwrap_or_default();
    let shown: Vec<&str> = left.iter().take(8).copied().collect();
    let more = left.len().saturating_sub(shown.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    Err(err!(
        "unrecognised layout (known: {}; --arch raw copies without checking): closest is {name}: {why}; keys that did not fit: {}{more}",
        ARCHES.join(", "),
        shown.join(", ")
    ))
}

fn finish(mut f: Found, forced: Option<&str>, file_name: &str) -> Found {
    if f.arch == "cosplace" {
        let lower = file_name.to_ascii_lowercase();
        if forced == Some("eigenplaces") || (forced.is_none() && lower.contains("eigenplaces")) {
            f.arch = "eigenplaces";
            f.set("arch", "eigenplaces");
        } else if forced.is_none() && !lower.contains("cosplace") {
            f.notes.push("CosPlace and EigenPlaces share this layout; wrote vpr.arch=cosplace (pass --arch eigenplaces if it is EigenPlaces)".into());
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
        pairs
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    }

    #[test]
    fn unknown_layout_lists_the_keys_that_did_not_fit() {
        let e = recognise(&t(&[("foo.weight", &[3, 3])]), None, "x.pth").unwrap_err();
        assert!(e.0.contains("unrecognised layout"), "{e}");
        assert!(e.0.contains("foo.weight"), "{e}");
        assert!(e.0.contains("cosplace, eigenplaces"), "{e}");
    }

    #[test]
    fn unknown_arch_name_is_refused() {
        let e = recognise(&t(&[("a", &[1])]), Some("vit"), "x.pth").unwrap_err();
        assert!(e.0.contains("unknown --arch"), "{e}");
    }
}
