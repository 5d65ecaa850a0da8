"""PyTorch side of benches/conv.rs: times F.conv2d (f32, batch 1, no bias, padding k // 2) per shape
(the best of RUNS runs, as benches/conv.rs explains) in NCHW and in channels-last memory format and prints `ms=<nchw>,<channels_last>` per shape.

Usage: python benches/conv.py THREADS RUNS HW,C,O,K,STRIDE ...
"""
import sys
import time

import torch
import torch.nn.functional as F

threads, runs = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)


def best_ms(f):
    f()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return 1000 * best


with torch.no_grad():
    for arg in sys.argv[3:]:
        hw, c, o, k, stride = (int(v) for v in arg.split(","))
        x = torch.randn(1, c, hw, hw)
        w = torch.randn(o, c, k, k) * 0.1
        nchw = best_ms(lambda: F.conv2d(x, w, stride=stride, padding=k // 2))
        xl, wl = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
        nhwc = best_ms(lambda: F.conv2d(xl, wl, stride=stride, padding=k // 2))
        print(f"ms={nchw:.4f},{nhwc:.4f}")
