"""PyTorch side of benches/vit.rs. The networks are tools/fixtures/vit_models.py's DINOv2 and
SelaVPR modules (the official module structure; attention as DINOv2 computes it without xformers:
`softmax(q k^T) v`), so both sides run the same model.

    python benches/vit.py forward THREADS STEPS SIDE
        ViT-B/14 (DINOv2 ViT-B/14 widths, 37x37 position grid) forward_features on the CPU, batch
        1, f32, median of STEPS; with DINOv2's attention and with the same blocks calling
        F.scaled_dot_product_attention. Prints `ms_per_image=<dinov2>,<sdpa>`.
    python benches/vit.py attention BATCH HEADS LENGTH DIM DTYPE STEPS
        F.scaled_dot_product_attention on cuda: forward, and forward + backward, median of STEPS.
        Prints `ms=<forward>,<forward_backward>`.
    python benches/vit.py selavpr BATCH SIDE STEPS
        SelaVPR (ViT-L/14 with adapters, GeM, LocalAdapt) global + local features on cuda, eager
        f32, median of STEPS. Prints `images_per_second=<x>`.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "fixtures"))
import vit_models  # noqa: E402


def sdpa_forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(y.transpose(1, 2).reshape(b, n, c))


def median_ms(f, steps, sync=lambda: None):
    for _ in range(2):
        f()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def forward(threads, steps, side):
    torch.set_num_threads(threads)
    model = vit_models.Vit(768, 12, 12, 3072, 37).eval()
    x = torch.randn(1, 3, side, side)
    results = []
    for attention in (vit_models.Attention.forward, sdpa_forward):
        vit_models.Attention.forward = attention
        with torch.inference_mode():
            results.append(median_ms(lambda: model.forward_features(x), steps))
    print(f"ms_per_image={results[0]:.3f},{results[1]:.3f}")


def attention(batch, heads, length, dim, dtype, steps):
    dtype = getattr(torch, dtype)
    q, k, v = (torch.randn(batch, heads, length, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, heads, length, dim, device="cuda", dtype=dtype)
    sync = torch.cuda.synchronize
    with torch.no_grad():
        fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), steps, sync)

    def step():
        F.scaled_dot_product_attention(q, k, v).backward(g)

    both = median_ms(step, steps, sync)
    print(f"ms={fwd:.4f},{both:.4f}")


def selavpr(batch, side, steps):
    model = vit_models.SelaVpr(1024, 16, 24, 4096, 37, 512, (256, 128)).cuda().eval()
    x = torch.randn(batch, 3, side, side, device="cuda")
    with torch.inference_mode():
        ms = median_ms(lambda: model(x), steps, torch.cuda.synchronize)
    print(f"images_per_second={1000 * batch / ms:.2f}")


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "forward":
        forward(*map(int, args))
    elif mode == "attention":
        attention(*map(int, args[:4]), args[4], int(args[5]))
    elif mode == "selavpr":
        selavpr(*map(int, args))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
