"""Train the fraud model on whatever accelerator is present.

The tabular training set is small enough to live on the device whole, so
batches are drawn by index and input loading never starves the accelerator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from sluicegate.inputs import ModelInput

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    hidden: int = 128
    layers: int = 2
    embedding_dim: int = 8
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 2048
    max_epochs: int = 20
    patience: int = 3
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"


@dataclass
class TrainResult:
    model: nn.Module
    best_epoch: int
    best_valid_pr_auc: float
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    device: dict = field(default_factory=dict)


class FraudMLP(nn.Module):
    """Embeddings for categoricals, normalized numerics, an MLP, a sigmoid.

    Normalization statistics are buffers, so the exported ONNX graph takes the
    raw model input and nothing is re-implemented at serving time.
    """

    def __init__(self, n_numeric: int, cardinalities: list[int], cfg: TrainConfig,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(n_numeric),
                                                     dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std if std is not None else np.ones(n_numeric),
                                                    dtype=torch.float32))
        self.embeddings = nn.ModuleList(nn.Embedding(n, cfg.embedding_dim) for n in cardinalities)
        width = n_numeric + cfg.embedding_dim * len(cardinalities)
        layers: list[nn.Module] = []
        for _ in range(cfg.layers):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def logits(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        x = (numeric - self.mean) / self.std
        embedded = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat([x, *embedded], dim=1)).squeeze(1)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(numeric, categorical))


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA (ROCm builds report as cuda too), then Apple MPS, then CPU."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype for a device; None means plain fp32.

    'auto' takes bf16 on GPUs that support it and fp32 on CPU, where bf16
    autocast is slower than fp32 on most cores without AMX.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def device_fingerprint(device: torch.device, precision: torch.dtype | None) -> dict:
    """What the run executed on, for the MLflow record."""
    info = {
        "device_type": device.type,
        "torch_version": torch.__version__,
        "precision": str(precision).replace("torch.", "") if precision else "float32",
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_count=torch.cuda.device_count(),
                    device_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda_version=torch.version.cuda, hip_version=getattr(torch.version, "hip", None))
    return info


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit_normalization(numeric: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = numeric.mean(axis=0)
    std = numeric.std(axis=0)
    return mean, np.where(std < 1e-6, 1.0, std)


def train_model(
    train: ModelInput,
    y_train: np.ndarray,
    valid: ModelInput,
    y_valid: np.ndarray,
    cardinalities: list[int],
    cfg: TrainConfig,
    checkpoint_dir: Path,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train with early stopping on validation PR-AUC; keep the best weights."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.precision)
    mean, std = fit_normalization(train.numeric)
    model = FraudMLP(train.numeric.shape[1], cardinalities, cfg, mean, std).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = nn.BCEWithLogitsLoss()

    x_num, x_cat, y = _to_device(train, y_train, device)
    v_num, v_cat, _ = _to_device(valid, y_valid, device)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    best, best_epoch, history, waited = -1.0, 0, [], 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(len(y), device=device)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(model.logits(x_num[idx], x_cat[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(idx)
        valid_scores = predict(model, v_num, v_cat)
        pr_auc = float(average_precision_score(y_valid, valid_scores))
        row = {"epoch": epoch, "train_loss": total / len(y), "valid_pr_auc": pr_auc}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if pr_auc > best:
            best, best_epoch, waited = pr_auc, epoch, 0
            torch.save(model.state_dict(), checkpoint_dir / "best.pt")
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    model.load_state_dict(torch.load(checkpoint_dir / "best.pt", map_location=device))
    (checkpoint_dir / "history.json").write_text(json.dumps(history))
    return TrainResult(model=model.cpu().eval(), best_epoch=best_epoch, best_valid_pr_auc=best,
                       epochs_run=len(history), seconds=time.perf_counter() - started,
                       history=history, device=device_fingerprint(device, amp_dtype))


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


def _to_device(data: ModelInput, labels: np.ndarray, device: torch.device):
    return (torch.as_tensor(data.numeric, device=device),
            torch.as_tensor(data.categorical, device=device),
            torch.as_tensor(labels, dtype=torch.float32, device=device))


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
