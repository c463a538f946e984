#!/usr/bin/env bash
# slabformer beside PyTorch eager, ONNX Runtime and OpenVINO, one run on this machine:
#   bash bench/compare.sh [--repeats N]       → prints the table and writes docs/bench.md
# Makes bench/.venv with pinned torch, timm, onnxruntime and openvino from PyPI on first use. The Linux
# torch wheel pulls its CUDA packages (~4 GB on disk); only its CPU side is used.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=bench/.venv
pins=(torch==2.15.0 timm==1.0.31 onnxruntime==1.32.0 openvino==2026.4.1 onnx==1.23.2 numpy==2.4.6 safetensors==0.8.0)
if ! "$venv/bin/python" -c "import torch, timm, onnxruntime, openvino, safetensors" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "${pins[@]}"
fi
cargo build --release --quiet
./target/release/slabformer bench --python "$venv/bin/python" --out docs/bench.md --plot docs/bench_scaling.png --swin-plot docs/bench_swin_scaling.png --overwrite "$@"
