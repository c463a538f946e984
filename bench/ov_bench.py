"""Times an ONNX model with OpenVINO (CPU plugin) the way `slabformer bench` times slabformer.

usage: ov_bench.py MODEL BATCH CHANNELS HEIGHT WIDTH WARMUP REPEATS PRECISION
PRECISION: `default` (the plugin's choice: bf16 where the cores have AMX, f32 elsewhere) or `f32`.
prints one JSON line: median_ms, min_ms, max_ms, peak_rss_mib, openvino, precision (what the
compiled model runs in, as the plugin reports it)
"""
import os
import sys

import numpy as np
import openvino as ov

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import report  # noqa: E402

model_path = sys.argv[1]
batch, channels, height, width, warmup, repeats = map(int, sys.argv[2:8])
precision = sys.argv[8]
core = ov.Core()
model = core.read_model(model_path)
# The export has a dynamic batch; a static shape lets the plugin plan its buffers, as slabformer's runtime does.
model.reshape([batch, channels, height, width])
config = {"PERFORMANCE_HINT": "LATENCY"}
if precision == "f32":
    config["INFERENCE_PRECISION_HINT"] = "f32"
elif precision != "default":
    raise SystemExit(f"unknown precision {precision}")
compiled = core.compile_model(model, "CPU", config)
request = compiled.create_infer_request()
x = np.random.default_rng(0).standard_normal((batch, channels, height, width), dtype=np.float32)
hint = compiled.get_property("INFERENCE_PRECISION_HINT")
used = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
report(lambda: request.infer({0: x}), warmup, repeats, openvino=ov.__version__, precision=used)
