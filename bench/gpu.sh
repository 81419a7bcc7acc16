#!/usr/bin/env bash
# The GPU checks, on a bare machine with an NVIDIA GPU: install from the package index, then train the
# MLP and the FT-Transformer in fp32, bf16 and fp16 (samples/s, GPU utilisation, peak memory) and serve
# the exported variants on the CUDA execution provider (p50/p99 at batch 1, rows/s at batch 4096), each
# line naming the provider that ran and the device. Output goes to $OUT (or ./gpu-results).
#
#   bash bench/gpu.sh
set -uo pipefail
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
python3 --version
python3 -m venv /tmp/gpu-venv && . /tmp/gpu-venv/bin/activate
pip install -q --upgrade pip
# The project's pins, then the CUDA build of onnxruntime in place of the CPU one (same module name).
time pip install -q -c constraints.txt -e . nvidia-ml-py
pip uninstall -q -y onnxruntime
# [cuda,cudnn]: the CUDA and cuDNN libraries onnxruntime was built against, as wheels beside torch's.
time pip install -q "onnxruntime-gpu[cuda,cudnn]==$(grep -E '^onnxruntime==' constraints.txt | cut -d= -f3)"
LD_LIBRARY_PATH="$(find /tmp/gpu-venv -path '*site-packages/nvidia/*/lib' -type d | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
python - <<'PY'
import onnxruntime as ort, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.get_available_providers())
import numpy as np, onnx
from onnx import helper, TensorProto
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
s = ort.InferenceSession(helper.make_model(graph).SerializeToString(), providers=["CUDAExecutionProvider"])
print("a CUDA session runs on", s.get_providers())
PY
echo "== training throughput"
timeout 240 python bench/train.py --device cuda --compile off --steps 40 | tee "$OUT/train.txt"
echo "== variants on the CUDA execution provider"
SLUICEGATE_TARGET=cuda timeout 300 python bench/variants.py --model ft_transformer --rows 100000 --epochs 2 \
  | tee "$OUT/variants_ft.txt"
SLUICEGATE_TARGET=cuda timeout 200 python bench/variants.py --model mlp --rows 100000 --epochs 2 \
  | tee "$OUT/variants_mlp.txt"
