"""PyTorch side of benches/netvlad.rs.

    python benches/netvlad.py BATCH HEIGHT WIDTH DIM CLUSTERS THREADS STEPS

times NetVLAD aggregation (input L2 normalisation, 1x1 conv soft assignment, residuals in the
einsum form `einsum(a, x) - sum(a) c`, intra-normalisation, flatten, L2) on random NCHW features,
median of STEPS after 2 warm-ups: the forward under inference_mode, and forward + backward to
the assignment weights and centroids (the loss sum(descriptor * r)); prints
`ms=<forward>,<forward_backward>`. (OpenIBL's own form materialises an [N, K, D, H*W] residual
tensor, 5 GB at batch 32, so it is not timed.)
"""
import sys
import time

import torch
import torch.nn.functional as F


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


def main():
    batch, height, width, dim, clusters, threads, steps = map(int, sys.argv[1:8])
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
