"""PyTorch side of benches/train.rs: CosPlace training steps as the original training loop runs them.

    python benches/train.py step DEVICE BACKBONE DIM CLASSES BATCH SIDE AMP THREADS WARMUP STEPS

DEVICE is cpu or cuda, AMP off or bf16 (torch.autocast). The network is a torchvision backbone's
children[:-2], then L2 over channels, GeM, Flatten, Linear, L2, in train mode with CosPlace's
freezing (conv1, bn1, layer1, layer2 frozen; their BatchNorms still in train mode); the loss is
CosFace (MarginCosineProduct, s = 30, m = 0.4) over CLASSES classes; Adam steps the model (1e-5)
and the classifier (1e-2). One step is zero_grad, forward, loss, `loss.item()` (the original logs
it every step), backward and both optimizer steps, timed to a CUDA synchronize on cuda. Runs in
PyTorch's default layout (NCHW) and in channels-last and prints
`ms_per_step=<nchw median>,<nchw min>,<channels-last median>,<channels-last min>`; on cuda
without a usable GPU it exits with a line on standard error that says so.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnn_forward  # noqa: E402

SCALE = 30.0
MARGIN = 0.4
LR = 1e-5
CLASSIFIERS_LR = 1e-2


class MarginCosineProduct(torch.nn.Module):
    """CosFace logits: s * (cos(x, W_j) - m [j = label])."""

    def __init__(self, dim, classes):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(classes, dim))
        torch.nn.init.xavier_uniform_(self.weight)

    def forward(self, x, labels):
        dots = x @ self.weight.t()
        cos = dots / torch.outer(x.norm(dim=1), self.weight.norm(dim=1)).clamp(min=1e-8)
        onehot = torch.zeros_like(cos).scatter_(1, labels.view(-1, 1), 1.0)
        return SCALE * (cos - onehot * MARGIN)


def network(backbone, dim):
    """cnn_forward.py's CosPlace network in train mode, with CosPlace's freezing (the backbone's
    children before layer3)."""
    net = cnn_forward.network(backbone, dim).train()
    for child in list(net[0].children())[:-2]:
        for p in child.parameters():
            p.requires_grad = False
    return net


def times_ms(device, backbone, dim, classes, batch, side, amp, warmup, steps, layout):
    torch.manual_seed(0)
    model = network(backbone, dim).to(device, memory_format=layout)
    classifier = MarginCosineProduct(dim, classes).to(device)
    model_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    classifier_opt = torch.optim.Adam(classifier.parameters(), lr=CLASSIFIERS_LR)
    images = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, classes, (batch,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        model_opt.zero_grad()
        classifier_opt.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
            descriptors = model(images)
            loss = F.cross_entropy(classifier(descriptors, labels), labels)
        loss.item()
        loss.backward()
        model_opt.step()
        classifier_opt.step()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    device, backbone = sys.argv[2], sys.argv[3]
    dim, classes, batch, side = map(int, sys.argv[4:8])
    amp = sys.argv[8]
    threads, warmup, steps = map(int, sys.argv[9:12])
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} sees no usable CUDA device")
    torch.set_num_threads(threads)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        results.extend(times_ms(device, backbone, dim, classes, batch, side, amp, warmup, steps, layout))
    print("ms_per_step=" + ",".join(f"{v:.3f}" for v in results))


if __name__ == "__main__":
    main()
