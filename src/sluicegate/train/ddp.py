"""Data-parallel training with torchrun: the launcher and the per-process entry point.

The parent process writes the prepared arrays and the config next to the
checkpoints, runs `torchrun --standalone` with one process per device, and reads
back rank 0's weights. Each process runs `training.train_model`, which shards
every epoch by rank. NCCL (RCCL on ROCm) joins GPUs; gloo joins CPU processes.
The processes map the arrays from disk (copy-on-write) rather than each loading
its own copy: a rank's memory holds the rows it reads, and ranks on one machine
share the pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sluicegate.runtime import ModelInput
from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import TrainResult, train_model
from sluicegate.train.models import build_model


def world_size(cfg: TrainConfig) -> int:
    """Processes to train with: as configured, else one per visible GPU, else one."""
    if cfg.world_size > 0:
        return cfg.world_size
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def launch(train: ModelInput, y_train: np.ndarray, valid: ModelInput, y_valid: np.ndarray,
           cardinalities: list[int], cfg: TrainConfig, checkpoint_dir: Path, on_epoch=None,
           soft_targets: np.ndarray | None = None, nproc: int | None = None) -> TrainResult:
    """Train under torchrun and return rank 0's result, as train_model would.

    Epoch rows reach `on_epoch` once the processes finish (they cannot call back across processes).
    """
    nproc = nproc or world_size(cfg)
    work = checkpoint_dir / "ddp"
    work.mkdir(parents=True, exist_ok=True)
    arrays = {"train_numeric": train.numeric, "train_categorical": train.categorical, "y_train": y_train,
              "valid_numeric": valid.numeric, "valid_categorical": valid.categorical, "y_valid": y_valid}
    if soft_targets is not None:
        arrays["soft_targets"] = soft_targets
    for stale in work.glob("*.npy"):  # an earlier attempt's arrays (soft targets among them) are not this run's
        stale.unlink()
    for name, values in arrays.items():
        np.save(work / f"{name}.npy", values)
    (work / "job.json").write_text(json.dumps({"config": cfg.model_copy(update={"world_size": nproc}).model_dump(),
                                               "cardinalities": cardinalities,
                                               "checkpoint_dir": str(checkpoint_dir)}))
    (work / "result.pt").unlink(missing_ok=True)
    env = dict(os.environ)
    if not torch.cuda.is_available():  # CPU processes share the cores instead of each taking all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "sluicegate.train.ddp", str(work)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    return _load_result(work / "result.pt", train, cardinalities, cfg, on_epoch)


def _load_result(path: Path, train: ModelInput, cardinalities: list[int], cfg: TrainConfig, on_epoch) -> TrainResult:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(cfg.model, train.numeric.shape[1], cardinalities, cfg)
    model.load_state_dict(saved.pop("state_dict"))
    if on_epoch:
        for row in saved["history"]:
            on_epoch(row)
    return TrainResult(model=model.eval(), **saved)


def main(work: Path) -> None:
    """One torchrun process: join the group, train its shard, rank 0 writes the result."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        job = json.loads((work / "job.json").read_text())
        arrays = {f.stem: np.load(f, mmap_mode="c") for f in work.glob("*.npy")}
        cfg = TrainConfig(**job["config"])
        result = train_model(
            ModelInput(arrays["train_numeric"], arrays["train_categorical"]), arrays["y_train"],
            ModelInput(arrays["valid_numeric"], arrays["valid_categorical"]), arrays["y_valid"],
            job["cardinalities"], cfg, Path(job["checkpoint_dir"]),
            soft_targets=arrays["soft_targets"] if "soft_targets" in arrays else None)
        if dist.get_rank() == 0:
            fields = {k: v for k, v in result.__dict__.items() if k != "model"}
            torch.save({"state_dict": result.model.state_dict(), **fields}, work / "result.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
