"""Times an ONNX model with ONNX Runtime (CPU) the way `slabformer bench` times slabformer.

usage: ort_bench.py MODEL BATCH CHANNELS SIZE WARMUP REPEATS
prints one JSON line: median_ms, min_ms, max_ms, peak_rss_mib, onnxruntime
"""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def peak_rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


model, batch, channels, size, warmup, repeats = sys.argv[1], *map(int, sys.argv[2:7])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((batch, channels, size, size), dtype=np.float32)
for _ in range(warmup):
    session.run(None, {"images": x})
times = []
for _ in range(repeats):
    start = time.perf_counter()
    session.run(None, {"images": x})
    times.append((time.perf_counter() - start) * 1000.0)
print(json.dumps({
    "median_ms": statistics.median(times),
    "min_ms": min(times),
    "max_ms": max(times),
    "peak_rss_mib": peak_rss_mib(),
    "onnxruntime": ort.__version__,
}))
