"""Training throughput: samples/s for each model x precision x torch.compile on the present device.

Rows live on the device and batches are drawn by index, as in `sluicegate.train.loop`.
Ratios are against fp32 eager of the same model, measured in the same run.

    python bench/train.py [--rows 200000] [--batch 4096] [--steps 60] [--compile on|off|both]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from sluicegate.train.config import TrainConfig
from sluicegate.train.devices import device_kind, pick_device, precision_policy
from sluicegate.train.loop import _Logits
from sluicegate.train.models import build_model

CARDS = [5, 13, 5, 11]


def synthetic(rows: int, device: torch.device, seed: int = 0):
    rng = np.random.default_rng(seed)
    numeric = torch.as_tensor(rng.normal(size=(rows, 12)).astype(np.float32), device=device)
    categorical = torch.as_tensor(np.stack([rng.integers(0, c, rows) for c in CARDS], axis=1), device=device)
    y = (torch.rand(rows, device=device) < torch.sigmoid(2 * numeric[:, 0] - 3)).float()
    return numeric, categorical, y


class GpuUtilization:
    """Mean GPU utilization sampled every 100 ms while training (needs nvidia-ml-py or amdsmi)."""

    def __init__(self, device: torch.device):
        self.samples: list[float] = []
        self._on = device.type == "cuda"
        self._stop = threading.Event()

    def __enter__(self):
        if self._on:
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self):
        while not self._stop.wait(0.1):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no NVML / amdsmi bindings: report no figure rather than a made-up one
                return

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def samples_per_s(model_kind: str, precision: str, compiled: bool, data, device, batch: int, steps: int):
    torch.manual_seed(0)
    numeric, categorical, y = data
    model = build_model(model_kind, 12, CARDS, TrainConfig()).to(device).train()
    step = torch.compile(_Logits(model)) if compiled else _Logits(model)
    policy = precision_policy(device, precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=policy.grad_scaling)

    def run(n):
        for _ in range(n):
            idx = torch.randint(0, len(y), (batch,), device=device)
            with policy.autocast_context(device):
                logits = step(numeric[idx], categorical[idx]).float()
            loss = F.binary_cross_entropy_with_logits(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(5)  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with GpuUtilization(device) as util:
        started = time.perf_counter()
        run(steps)
        elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return steps * batch / elapsed, util.mean, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", choices=["on", "off", "both"], default=None,
                        help="default: both on a GPU, off on CPU (compiling takes minutes on a few cores)")
    args = parser.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    compile_mode = args.compile or ("both" if gpu else "off")
    compiles = {"on": [True], "off": [False], "both": [False, True]}[compile_mode]
    if True in compiles and not gpu and shutil.which("cc") is None:
        compiles = [False]
    precisions = ["fp32", "bf16", "fp16"] if gpu else ["fp32", "bf16"]
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"device: {device_kind(device)} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.steps} timed steps")
    if not gpu:
        print("no GPU here: the GPU targets (bf16 >= 1.8x fp32, utilization >= 80%) are not measured")
    data = synthetic(args.rows, device)
    print(f"{'model':<15} {'precision':<9} {'compile':<7} {'samples/s':>12} {'vs fp32 eager':>14} {'GPU util':>9} "
          f"{'peak GiB':>9}")
    for kind in ("mlp", "ft_transformer"):
        base = None
        for compiled in compiles:
            for precision in precisions:
                if gpu and precision == "bf16" and not torch.cuda.is_bf16_supported():
                    continue
                rate, util, peak = samples_per_s(kind, precision, compiled, data, device, args.batch, args.steps)
                base = base or rate
                util_s = f"{util:.0f}%" if util is not None else "n/a"
                peak_s = f"{peak:.2f}" if peak is not None else "n/a"
                print(f"{kind:<15} {precision:<9} {'on' if compiled else 'off':<7} {rate:>12,.0f} "
                      f"{rate / base:>13.2f}x {util_s:>9} {peak_s:>9}", flush=True)


if __name__ == "__main__":
    main()
