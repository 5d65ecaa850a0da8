"""PyTorch side of benches/cnn.rs.

    python benches/cnn_forward.py forward BACKBONE DIM BATCH HEIGHT WIDTH THREADS STEPS
        times the eval-mode forward of a CosPlace network (torchvision backbone children[:-2],
        L2 over channels, GeM, Linear, L2), median of STEPS, in PyTorch's default layout (NCHW)
        and in channels-last, and prints `ms_per_batch=<nchw>,<channels_last>`.
    python benches/cnn_forward.py extract BACKBONE DIM IMAGE_DIR BATCH THREADS
        runs CosPlace-style extraction over IMAGE_DIR with a DataLoader (PIL decode, ToTensor,
        Normalize in THREADS worker processes) and prints `images_per_second=<x>`.
"""
import glob
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image


class GeM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.ones(1) * 3)

    def forward(self, x):
        return F.avg_pool2d(x.clamp(min=1e-6).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class L2(torch.nn.Module):
    def forward(self, x):
        return F.normalize(x, p=2.0, dim=1)


def network(backbone, dim):
    if backbone == "vgg16":
        body = torch.nn.Sequential(*list(torchvision.models.vgg16().features.children())[:-2])
        channels = 512
    else:
        body = torch.nn.Sequential(*list(getattr(torchvision.models, backbone)().children())[:-2])
        channels = 512 if backbone in ("resnet18", "resnet34") else 2048
    return torch.nn.Sequential(body, L2(), GeM(), torch.nn.Flatten(), torch.nn.Linear(channels, dim), L2()).eval()


class Folder(torch.utils.data.Dataset):
    def __init__(self, root):
        self.paths = sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True))
        self.transform = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def main():
    mode, backbone, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = network(backbone, dim)
    if mode == "forward":
        batch, height, width, threads, steps = map(int, sys.argv[4:9])
        torch.set_num_threads(threads)
        x = torch.randn(batch, 3, height, width)
        results = []
        for layout in (torch.contiguous_format, torch.channels_last):
            model = model.to(memory_format=layout)
            xl = x.contiguous(memory_format=layout)
            with torch.inference_mode():
                for _ in range(2):
                    model(xl)
                times = []
                for _ in range(steps):
                    t = time.perf_counter()
                    model(xl)
                    times.append(time.perf_counter() - t)
            times.sort()
            results.append(1000 * times[len(times) // 2])
        print(f"ms_per_batch={results[0]:.3f},{results[1]:.3f}")
    else:
        root, batch, threads = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
        torch.set_num_threads(threads)
        loader = torch.utils.data.DataLoader(Folder(root), batch_size=batch, num_workers=threads)
        count = 0
        t = time.perf_counter()
        with torch.inference_mode():
            for images in loader:
                model(images)
                count += images.shape[0]
        print(f"images_per_second={count / (time.perf_counter() - t):.3f}")


if __name__ == "__main__":
    main()
