"""PyTorch side of benches/netvlad.rs.

    python benches/netvlad.py aggregation BATCH HEIGHT WIDTH DIM CLUSTERS THREADS STEPS

times NetVLAD aggregation (input L2 normalisation, 1x1 conv soft assignment, residuals in the
einsum form `einsum(a, x) - sum(a) c`, intra-normalisation, flatten, L2) on random NCHW features,
median of STEPS after 2 warm-ups: the forward under inference_mode, and forward + backward to
the assignment weights and centroids (the loss sum(descriptor * r)); prints
`ms=<forward>,<forward_backward>`. (OpenIBL's own form materialises an [N, K, D, H*W] residual
tensor, 5 GB at batch 32, so it is not timed.)

    python benches/netvlad.py model HEIGHT WIDTH THREADS STEPS

times the eval-mode forward of OpenIBL's VGG16 + NetVLAD (64 x 512) + PCA-whitening (4096) on
one random image, median of STEPS after a warm-up, in NCHW and channels-last, and prints
`ms=<nchw>,<channels_last>`.
"""
import sys
import time

import torch
import torch.nn.functional as F
import torchvision


def netvlad(x, conv, centroids):
    n = x.shape[0]
    x = F.normalize(x, p=2, dim=1)
    a = F.softmax(F.conv2d(x, conv).flatten(2), dim=1)
    v = torch.einsum("nkl,ndl->nkd", a, x.flatten(2)) - a.sum(-1).unsqueeze(-1) * centroids
    v = F.normalize(v, p=2, dim=2)
    return F.normalize(v.reshape(n, -1), p=2, dim=1)


def median_ms(f, steps):
    for _ in range(2):
        f()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def model_forward(height, width, threads, steps):
    torch.set_num_threads(threads)
    body = torch.nn.Sequential(*list(torchvision.models.vgg16().features.children())[:-2]).eval()
    conv = torch.randn(64, 512, 1, 1) / 512**0.5
    centroids = torch.rand(64, 512)
    pca = torch.nn.Conv2d(64 * 512, 4096, 1).eval()
    x = torch.randn(1, 3, height, width)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        body = body.to(memory_format=layout)
        xl = x.contiguous(memory_format=layout)

        def forward():
            with torch.inference_mode():
                v = netvlad(body(xl), conv, centroids)
                F.normalize(pca(v[:, :, None, None]).flatten(1), p=2, dim=-1)

        results.append(median_ms(forward, steps))
    print(f"ms={results[0]:.3f},{results[1]:.3f}")


def main():
    if sys.argv[1] == "model":
        model_forward(*map(int, sys.argv[2:6]))
        return
    batch, height, width, dim, clusters, threads, steps = map(int, sys.argv[2:9])
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, dim, height, width, generator=gen)
    conv = (4.0 * torch.randn(clusters, dim, 1, 1, generator=gen) / dim**0.5).requires_grad_()
    centroids = torch.rand(clusters, dim, generator=gen).requires_grad_()
    r = torch.randn(batch, clusters * dim, generator=gen)

    def forward():
        with torch.inference_mode():
            netvlad(x, conv, centroids)

    def forward_backward():
        conv.grad = centroids.grad = None
        (netvlad(x, conv, centroids) * r).sum().backward()

    print(f"ms={median_ms(forward, steps):.3f},{median_ms(forward_backward, steps):.3f}")


if __name__ == "__main__":
    main()
