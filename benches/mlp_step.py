"""PyTorch side of benches/mlp_step.rs: times one AdamW training step of the same MLP
(Linear(width, width), GELU, Linear(width, classes), cross-entropy) and prints `ms_per_step=<x>`.

Usage: python benches/mlp_step.py BATCH WIDTH CLASSES THREADS DEVICE STEPS
"""
import sys
import time

import torch
import torch.nn.functional as F

batch, width, classes, threads, device, steps = sys.argv[1:7]
batch, width, classes, threads, steps = int(batch), int(width), int(classes), int(threads), int(steps)
torch.set_num_threads(threads)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, classes)).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
x = torch.randn(batch, width, device=device)
y = torch.randint(0, classes, (batch,), device=device)


def step():
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


for _ in range(2):
    step()
sync()
times = []
for _ in range(steps):
    t = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t)
times.sort()
print(f"ms_per_step={1000 * times[len(times) // 2]:.3f}")
