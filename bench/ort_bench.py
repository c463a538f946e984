"""Times an ONNX model with ONNX Runtime (CPU) the way `slabformer bench` times slabformer.

usage: ort_bench.py MODEL BATCH CHANNELS HEIGHT WIDTH WARMUP REPEATS
prints one JSON line: median_ms, min_ms, max_ms, peak_rss_mib, onnxruntime
"""
import os
import sys

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import report  # noqa: E402

model, batch, channels, height, width, warmup, repeats = sys.argv[1], *map(int, sys.argv[2:8])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((batch, channels, height, width), dtype=np.float32)
report(lambda: session.run(None, {"images": x}), warmup, repeats, onnxruntime=ort.__version__)
