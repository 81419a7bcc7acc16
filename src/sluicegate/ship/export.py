"""ONNX export, parity check against torch, and the shipped variants.

The dynamo exporter has open issues of silently wrong outputs, so every export
is checked against torch on a fixed golden batch before anything ships.

Variants, and the execution providers each is meant for:
- fp32: everywhere; the reference the others are compared with.
- fp16: GPU execution providers (tensor cores). onnxruntime's CPU provider lacks fp16
  kernels for most ops and falls back slowly, so CPU targets never pick it.
- int8: dynamic quantization (weights int8, activations quantized per call); CPU.
- int8_qdq: static QDQ quantization with activation ranges calibrated on a sample of the
  training set; CPU, and the format TensorRT consumes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME, ModelInput

OPSET = 18  # pinned: supported by onnxruntime >= 1.14, Triton and KServe runtimes alike


class ParityError(RuntimeError):
    """The exported graph does not compute what the torch model computes."""


@dataclass
class Parity:
    max_abs_diff: float
    tolerance: float
    rows: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def export_onnx(model: torch.nn.Module, example: ModelInput, path: Path) -> Path:
    """Export with a dynamic batch dimension and verify the graph with onnx.checker."""
    model = model.cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    args = (torch.as_tensor(example.numeric[:4]), torch.as_tensor(example.categorical[:4]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, args, str(path), dynamo=True, opset_version=OPSET, external_data=False,
        input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
        dynamic_shapes={"numeric": {0: batch}, "categorical": {0: batch}},
        verbose=False,
    )
    return _checked(path)


def _checked(path: Path) -> Path:
    """path, after onnx.checker accepts the graph written there."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


@contextmanager
def _preprocessed(fp32_path: Path) -> Iterator[Path]:
    """A quant_pre_process'd copy of the graph, for the length of the block.

    The dynamo exporter's value_info otherwise trips onnxruntime's shape inference
    during quantization.
    """
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        yield pre


def quantize_int8(fp32_path: Path, out_path: Path) -> Path:
    """INT8 dynamic quantization of the matrix multiplies."""
    with _preprocessed(fp32_path) as pre:
        quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    return _checked(out_path)


class _Calibration(CalibrationDataReader):
    """Feeds the calibration sample to the quantizer in batches."""

    def __init__(self, sample: ModelInput, batch_size: int):
        self._feeds = iter([{INPUT_NAMES[0]: sample.numeric[i:i + batch_size],
                             INPUT_NAMES[1]: sample.categorical[i:i + batch_size]}
                            for i in range(0, len(sample), batch_size)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize_int8_static(fp32_path: Path, out_path: Path, calibration: ModelInput, batch_size: int = 256) -> Path:
    """INT8 static quantization in QDQ format, activation ranges calibrated on real rows.

    Only matrix multiplies are quantized (per-channel weights, uint8 activations);
    normalization, embeddings, softmax and the final sigmoid stay fp32, where int8
    would cost accuracy and save little time.
    """
    with _preprocessed(fp32_path) as pre:
        quantize_static(str(pre), str(out_path), _Calibration(calibration, batch_size),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul", "Gemm"],
                        calibrate_method=CalibrationMethod.MinMax)
    return _checked(out_path)


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """Weights and activations in fp16, inputs and output kept as in fp32 so callers do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True))
    model.topological_sort()  # the converter appends its input casts after their consumers
    onnx.save(model.model, str(out_path))
    return _checked(out_path)


def export_variants(model: torch.nn.Module, example: ModelInput, calibration: ModelInput,
                    out_dir: Path) -> dict[str, Path]:
    """Every shipped variant of a model, by name (see VARIANT_PROVIDERS for where each runs)."""
    fp32 = export_onnx(model, example, out_dir / "model_fp32.onnx")
    return {
        "fp32": fp32,
        "fp16": convert_fp16(fp32, out_dir / "model_fp16.onnx"),
        "int8": quantize_int8(fp32, out_dir / "model_int8.onnx"),
        "int8_qdq": quantize_int8_static(fp32, out_dir / "model_int8_qdq.onnx", calibration),
    }




def calibration_sample(train: ModelInput, rows: int = 2048, seed: int = 1) -> ModelInput:
    """Rows of the (feature-store) training set for static quantization; never test rows."""
    return golden_batch(train, rows=rows, seed=seed)








def check_parity(torch_scores: np.ndarray, onnx_scores: np.ndarray, tolerance: float) -> Parity:
    """Largest absolute difference in predicted probability on the golden batch."""
    diff = float(np.max(np.abs(torch_scores.astype(np.float64) - onnx_scores.astype(np.float64))))
    return Parity(max_abs_diff=diff, tolerance=tolerance, rows=len(torch_scores))


def golden_batch(data: ModelInput, rows: int = 2048, seed: int = 0) -> ModelInput:
    """A fixed sample of real inputs, the same for every export of a run."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data), size=min(rows, len(data)), replace=False))
    return data.take(idx)
