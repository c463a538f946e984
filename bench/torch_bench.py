"""Times a model in PyTorch eager (CPU) the way `slabformer bench` times slabformer.

usage: torch_bench.py MODEL BATCH MODE WARMUP REPEATS [SIZE]      MODE: infer | train; SIZE: image side (224)
prints one JSON line: median_ms, min_ms, max_ms, peak_rss_mib, threads, torch
infer: the deploy form in eval mode under torch.inference_mode. train: one step of the training
form at batch BATCH: forward, cross-entropy, backward, AdamW update.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_models  # noqa: E402
from measure import report  # noqa: E402


def main():
    name, batch, mode, warmup, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    size = int(sys.argv[6]) if len(sys.argv) > 6 else 224
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    if mode == "infer":
        model = torch_models.create(name, deploy=True, img_size=size).eval()

        def step():
            with torch.inference_mode():
                model(x)
    elif mode == "train":
        model = torch_models.create(name, deploy=False, img_size=size).train()
        labels = torch.randint(0, 1000, (batch,))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

        def step():
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        raise SystemExit(f"unknown mode {mode}")
    report(step, warmup, repeats, threads=torch.get_num_threads(), torch=torch.__version__)


main()
