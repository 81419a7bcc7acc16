"""Train a tabular model on whatever accelerator is present.

The tabular training set is small enough to live on the device whole, so
batches are drawn by index and input loading never starves the accelerator.
Each epoch writes `last.pt` (weights, optimizer, scaler, counters, RNG state)
atomically, so a killed run resumes where it stopped when it is started again
with the same checkpoint directory. Under torchrun the same function trains
one shard per process (see `sluicegate.train.ddp`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from sluicegate.runtime import ModelInput
from sluicegate.train.config import TrainConfig
from sluicegate.train.devices import configure_backends, device_fingerprint, pick_device, precision_policy
from sluicegate.train.models import build_model


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    best_valid_pr_auc: float
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    device: dict = field(default_factory=dict)
    resumed_from_epoch: int = 0  # 0 = a fresh run
    distillation: dict = field(default_factory=dict)
    config: TrainConfig | None = None  # set by train.stages.train_stage
    fresh_start: str = ""  # why it did not resume (set by train.stages.train_stage); "" when it resumed

    def tags(self) -> dict:
        """The hardware and the resume point, as MLflow tags of the train stage run."""
        return ({f"hw.{k}": v for k, v in self.device.items()}
                | {"resumed_from_epoch": self.resumed_from_epoch, "fresh_start": self.fresh_start})

    def summary(self) -> str:
        cfg = self.config or TrainConfig()
        resumed = (f", resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch
                   else f", {self.fresh_start}" if self.fresh_start else "")
        line = (f"train: {cfg.model}{' (distilled)' if cfg.distill else ''}, best epoch {self.best_epoch} of "
                f"{self.epochs_run}{resumed}, valid PR-AUC {self.best_valid_pr_auc:.4f} on "
                f"{self.device.get('device_kind')} x{self.device.get('world_size')} ({self.device.get('precision')}, "
                f"compile {'on' if cfg.compile else 'off'}) in {self.seconds:.1f}s")
        if d := self.distillation:
            line += (f"; distillation: student ROC-AUC {d['student_valid_roc_auc']:.4f} vs teacher "
                     f"{d['teacher_valid_roc_auc']:.4f}, {d['student_speedup']:.1f}x the teacher's rows/s")
        return line


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit_normalization(numeric: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = numeric.mean(axis=0)
    std = numeric.std(axis=0)
    return mean, np.where(std < 1e-6, 1.0, std)


def checkpoint_dir_for(root: Path, data_hash: str, cfg: TrainConfig, spec_hash: str) -> Path:
    """A checkpoint directory that is the same for the same data, config and model spec.

    Keyed on content rather than a run id, so a retried or re-run flow finds the
    killed run's `last.pt` and resumes it. The model spec is the innermost folder: its
    siblings are the same data and config trained under another spec.
    """
    payload = json.dumps({"data": data_hash, "config": cfg.model_dump()}, sort_keys=True, default=str)
    return root / hashlib.sha256(payload.encode()).hexdigest()[:16] / spec_hash


@dataclass
class _Progress:
    """Everything besides weights and optimizer that a resumed run needs."""

    epoch: int = 0
    best: float = -1.0
    best_epoch: int = 0
    waited: int = 0
    done: bool = False
    history: list[dict] = field(default_factory=list)


class _Logits(nn.Module):
    """Routes forward() to logits(): DDP and torch.compile only see forward()."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.model.logits(numeric, categorical)


def train_model(
    train: ModelInput,
    y_train: np.ndarray,
    valid: ModelInput,
    y_valid: np.ndarray,
    cardinalities: list[int],
    cfg: TrainConfig,
    checkpoint_dir: Path,
    on_epoch: Callable[[dict], None] | None = None,
    soft_targets: np.ndarray | None = None,
) -> TrainResult:
    """Train with early stopping on validation PR-AUC; keep the best weights; resume from last.pt."""
    started = time.perf_counter()
    rank, world = _rank_and_world()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    configure_backends(device, cfg.deterministic)
    policy = precision_policy(device, cfg.precision)
    mean, std = fit_normalization(train.numeric)
    model = build_model(cfg.model, train.numeric.shape[1], cardinalities, cfg, mean, std).to(device)
    torch.manual_seed(cfg.seed + rank)  # same initial weights everywhere, different dropout per process
    step = _step_module(model, device, cfg, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=policy.grad_scaling)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoint_dir / "last.pt"
    progress = _resume(last, model, optimizer, scaler, device) if last.exists() else _Progress()
    resumed_from = progress.epoch

    x_num, x_cat, y = _to_device(train, y_train, device)
    soft = _soft_labels(soft_targets, cfg, device)
    v_num, v_cat, _ = _to_device(valid, y_valid, device)
    local_batch = max(1, cfg.batch_size // world)  # the global batch matches a single process
    while not progress.done:
        epoch = progress.epoch + 1
        model.train()
        total = 0.0
        shard = _epoch_order(len(y), cfg.seed, epoch, rank, world).to(device)
        for start in range(0, len(shard), local_batch):
            idx = shard[start:start + local_batch]
            with policy.autocast_context(device):
                logits = step(x_num[idx], x_cat[idx]).float()
            loss = _loss(logits, y[idx], None if soft is None else soft[idx], cfg)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(idx)
        pr_auc = _broadcast(float(average_precision_score(y_valid, predict(model, v_num, v_cat))), device)
        row = {"epoch": epoch, "train_loss": total / len(shard), "valid_pr_auc": pr_auc}
        progress = _advance(progress, row, cfg)
        if rank == 0:
            if progress.best_epoch == epoch:
                _save_atomic(model.state_dict(), checkpoint_dir / "best.pt")
            _save_atomic(_snapshot(model, optimizer, scaler, progress), last)
        _barrier()
        if on_epoch:
            on_epoch(row)
    model.load_state_dict(torch.load(checkpoint_dir / "best.pt", map_location=device))
    if rank == 0:
        (checkpoint_dir / "history.json").write_text(json.dumps(progress.history))
    return TrainResult(model=model.cpu().eval(), best_epoch=progress.best_epoch, best_valid_pr_auc=progress.best,
                       epochs_run=len(progress.history), seconds=time.perf_counter() - started,
                       history=progress.history, resumed_from_epoch=resumed_from,
                       device=device_fingerprint(device, policy, compiled=cfg.compile, world_size=world))


def _advance(progress: _Progress, row: dict, cfg: TrainConfig) -> _Progress:
    """Early-stopping bookkeeping after one epoch."""
    p = replace(progress, epoch=row["epoch"], history=[*progress.history, row])
    if row["valid_pr_auc"] > p.best:
        p.best, p.best_epoch, p.waited = row["valid_pr_auc"], row["epoch"], 0
    else:
        p.waited += 1
    p.done = p.waited >= cfg.patience or p.epoch >= cfg.max_epochs
    return p


def _loss(logits: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None, cfg: TrainConfig) -> torch.Tensor:
    """BCE on the labels; with a teacher, mixed with BCE on its temperature-softened probabilities."""
    hard = F.binary_cross_entropy_with_logits(logits, y)
    if soft is None:
        return hard
    t = cfg.distill_temperature
    distilled = F.binary_cross_entropy_with_logits(logits / t, soft) * t * t  # t^2 keeps gradient scale
    return (1 - cfg.distill_alpha) * hard + cfg.distill_alpha * distilled


def _soft_labels(teacher_probs: np.ndarray | None, cfg: TrainConfig, device: torch.device) -> torch.Tensor | None:
    if teacher_probs is None:
        return None
    p = torch.as_tensor(teacher_probs, dtype=torch.float32, device=device).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid(torch.logit(p) / cfg.distill_temperature)


def _epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This process's rows for an epoch: a permutation seeded by (seed, epoch), so a resumed
    run and every DDP process agree on it; each process takes every world-th row."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[: n - n % world][rank::world]


def _step_module(model: nn.Module, device: torch.device, cfg: TrainConfig, world: int) -> nn.Module:
    step: nn.Module = _Logits(model)
    if world > 1:
        step = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step = torch.compile(step)
    return step


def _snapshot(model, optimizer, scaler, progress: _Progress) -> dict:
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "progress": asdict(progress), "rng_torch": torch.get_rng_state(), "rng_numpy": np.random.get_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _resume(path: Path, model, optimizer, scaler, device: torch.device) -> _Progress:
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"].cpu())
    np.random.set_state(state["rng_numpy"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    return _Progress(**state["progress"])


def _save_atomic(obj, path: Path) -> None:
    """Write then rename: a kill mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value: float, device: torch.device) -> float:
    """Rank 0's value everywhere, so every process takes the same early-stopping decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=where)
    dist.broadcast(t, src=0)
    return float(t.item())


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def predict(model: nn.Module, numeric, categorical, batch_size: int = 65536) -> np.ndarray:
    """Scores for a whole input, in fp32, batched to bound memory."""
    model.eval()
    device = next(model.parameters()).device
    numeric = torch.as_tensor(numeric, device=device)
    categorical = torch.as_tensor(categorical, device=device)
    out = [model(numeric[i:i + batch_size], categorical[i:i + batch_size])
           for i in range(0, len(numeric), batch_size)]
    return torch.cat(out).float().cpu().numpy()


@torch.no_grad()
def torch_rows_per_s(model: nn.Module, sample: ModelInput, batch: int = 4096, min_seconds: float = 0.5) -> float:
    """Torch-eager inference throughput on the model's device, after one warm-up call."""
    model.eval()
    device = next(model.parameters()).device
    idx = np.arange(batch) % len(sample)
    numeric = torch.as_tensor(sample.numeric[idx], device=device)
    categorical = torch.as_tensor(sample.categorical[idx], device=device)
    model(numeric, categorical)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < min_seconds:
        model(numeric, categorical)
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return calls * batch / (time.perf_counter() - started)


def train_distilled(
    train: ModelInput, y_train: np.ndarray, valid: ModelInput, y_valid: np.ndarray,
    cardinalities: list[int], cfg: TrainConfig, checkpoint_dir: Path,
    on_epoch: Callable[[dict], None] | None = None, fit: Callable[..., TrainResult] = train_model,
) -> TrainResult:
    """An FT-Transformer teacher, then an MLP student on its soft labels; returns the student,
    with the student-vs-teacher comparison in `distillation`. `fit` is train_model or a DDP launcher."""
    teacher_cfg = cfg.model_copy(update={"model": "ft_transformer", "distill": False})
    prefixed = (lambda row: on_epoch({k if k == "epoch" else f"teacher_{k}": v for k, v in row.items()})) \
        if on_epoch else None
    teacher = fit(train, y_train, valid, y_valid, cardinalities, teacher_cfg, checkpoint_dir / "teacher",
                  on_epoch=prefixed)
    soft = predict(teacher.model, train.numeric, train.categorical)
    student = fit(train, y_train, valid, y_valid, cardinalities, cfg.model_copy(update={"model": "mlp"}),
                  checkpoint_dir / "student", on_epoch=on_epoch, soft_targets=soft)
    student.distillation = compare_teacher_student(teacher.model, student.model, valid, y_valid)
    return student


def compare_teacher_student(teacher: nn.Module, student: nn.Module, valid: ModelInput, y_valid: np.ndarray) -> dict:
    """Validation accuracy and CPU torch-eager speed of student against teacher."""
    out = {}
    for name, model in (("teacher", teacher), ("student", student)):
        scores = predict(model, valid.numeric, valid.categorical)
        out[f"{name}_valid_roc_auc"] = float(roc_auc_score(y_valid, scores))
        out[f"{name}_valid_pr_auc"] = float(average_precision_score(y_valid, scores))
        out[f"{name}_rows_per_s_batch4096"] = torch_rows_per_s(model, valid, min_seconds=0.3)
        out[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
    out["student_speedup"] = out["student_rows_per_s_batch4096"] / out["teacher_rows_per_s_batch4096"]
    out["student_roc_auc_drop"] = out["teacher_valid_roc_auc"] - out["student_valid_roc_auc"]
    return out


def _to_device(data: ModelInput, labels: np.ndarray, device: torch.device):
    return (torch.as_tensor(data.numeric, device=device),
            torch.as_tensor(data.categorical, device=device),
            torch.as_tensor(labels, dtype=torch.float32, device=device))
