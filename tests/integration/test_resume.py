"""A training run killed mid-way resumes from its last checkpoint and ends where an unbroken run ends."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import predict, train_model
from tests.unit.train.test_loop import split

REPO = Path(__file__).resolve().parents[2]
CFG = dict(max_epochs=5, patience=10, batch_size=256, device="cpu", seed=11)
KILL_AFTER = 2

# The same data and config as the test, trained in a child that SIGKILLs itself after epoch 2:
# no cleanup runs, exactly like a node that dies.
CHILD = textwrap.dedent(f"""
    import os, signal, sys
    from pathlib import Path
    from sluicegate.train.config import TrainConfig
    from sluicegate.train.loop import train_model
    from tests.integration.test_resume import data
    (train, y), (valid, yv) = data()

    def maybe_die(row):
        if row["epoch"] == {KILL_AFTER}:
            os.kill(os.getpid(), signal.SIGKILL)

    train_model(train, y, valid, yv, [5, 3], TrainConfig(**{CFG!r}), Path(sys.argv[1]), on_epoch=maybe_die)
""")


def data():
    return split(0, 4_000, 1_000)


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(killed_dir)], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    state = torch.load(killed_dir / "last.pt", weights_only=False)
    assert state["progress"]["epoch"] == KILL_AFTER and not state["progress"]["done"]

    (train, y), (valid, yv) = data()
    seen = []
    resumed = train_model(train, y, valid, yv, [5, 3], TrainConfig(**CFG), killed_dir, on_epoch=seen.append)
    assert resumed.resumed_from_epoch == KILL_AFTER
    assert [r["epoch"] for r in seen] == list(range(KILL_AFTER + 1, CFG["max_epochs"] + 1))  # no epoch trained twice
    assert [r["epoch"] for r in resumed.history] == list(range(1, CFG["max_epochs"] + 1))

    unbroken = train_model(train, y, valid, yv, [5, 3], TrainConfig(**CFG), tmp_path / "unbroken")
    assert resumed.best_epoch == unbroken.best_epoch
    np.testing.assert_allclose([r["train_loss"] for r in resumed.history],
                               [r["train_loss"] for r in unbroken.history], rtol=1e-5)
    np.testing.assert_allclose(predict(resumed.model, valid.numeric, valid.categorical),
                               predict(unbroken.model, valid.numeric, valid.categorical), atol=1e-5)
