"""PyTorch side of benches/elementwise.rs: the same ops at the same shapes, in the same order.

    python benches/elementwise.py THREADS
        Prints `ms=<op 1>,<op 2>,...`, each op's median milliseconds.
"""
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(reps, f):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[reps // 2]


def main():
    torch.set_num_threads(int(sys.argv[1]))
    cl = torch.channels_last
    x = torch.randn(32, 64, 56, 56).to(memory_format=cl)
    y = torch.randn(32, 64, 56, 56).to(memory_format=cl)
    g = torch.randn(32, 64, 56, 56).to(memory_format=cl)
    rows = torch.randn(32 * 56 * 56, 64)
    bias = torch.randn(64)
    bn = torch.nn.BatchNorm2d(64).train()
    pool_in = torch.randn(32, 64, 112, 112).to(memory_format=cl)
    pool_g = torch.randn(32, 64, 56, 56).to(memory_format=cl)
    hidden = torch.randn(257, 3072)
    hidden_g = torch.randn(257, 3072)
    tokens = torch.randn(257, 768)
    tokens_g = torch.randn(257, 768)
    other_tokens = torch.randn(257, 768)
    w, b = torch.randn(768), torch.randn(768)
    xg = x.clone().requires_grad_()
    pool_xg = pool_in.clone().requires_grad_()
    hidden_xg = hidden.clone().requires_grad_()
    tokens_xg = tokens.clone().requires_grad_()
    big, small = 10, 50
    with torch.no_grad():
        results = [median_ms(big, lambda: F.relu(x))]
    results.append(median_ms(big, lambda: F.relu(xg).backward(g)))
    with torch.no_grad():
        results += [
            median_ms(big, lambda: x + y),
            median_ms(big, lambda: rows + bias),
            median_ms(big, lambda: bn(x)),
        ]
    results.append(median_ms(big, lambda: bn(xg).backward(g)))
    with torch.no_grad():
        results.append(median_ms(big, lambda: F.max_pool2d(pool_in, 3, 2, 1)))
    results.append(median_ms(big, lambda: F.max_pool2d(pool_xg, 3, 2, 1).backward(pool_g)))
    with torch.no_grad():
        results.append(median_ms(small, lambda: F.gelu(hidden)))
    results.append(median_ms(small, lambda: F.gelu(hidden_xg).backward(hidden_g)))
    with torch.no_grad():
        results.append(median_ms(small, lambda: F.layer_norm(tokens, (768,), w, b, 1e-6)))
    results.append(
        median_ms(small, lambda: F.layer_norm(tokens_xg, (768,), w, b, 1e-6).backward(tokens_g))
    )
    with torch.no_grad():
        results += [
            median_ms(small, lambda: tokens * w),
            median_ms(small, lambda: tokens + other_tokens),
        ]
    print("ms=" + ",".join(f"{t:.4f}" for t in results))


if __name__ == "__main__":
    main()
