"""Runs an ONNX model with ONNX Runtime on a raw float32 input and writes the raw float32 output.

usage: onnx_run.py MODEL INPUT_BIN OUTPUT_BIN D0 D1 D2 D3
"""
import sys

import numpy as np
import onnxruntime as ort

model, src, dst = sys.argv[1:4]
shape = [int(d) for d in sys.argv[4:8]]
x = np.fromfile(src, dtype="<f4").reshape(shape)
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
(y,) = session.run(["logits"], {"images": x})
np.ascontiguousarray(y, dtype="<f4").tofile(dst)
