"""Inference: torch eager against every exported ONNX variant, on the pipeline's real features.

Generates a batch, builds the Feast training set in a temporary SLUICEGATE_HOME, trains
the model, exports every variant through the pipeline's export stage, then measures on
this machine: p50 latency at batch 1, rows/s at batch 4096, and ROC-AUC against torch's.
Torch and onnxruntime use the same number of threads. Each variant runs on the providers it is
meant for that this onnxruntime has (fp16 on GPU providers only); the provider printed is the one
the session reports, and the header names the device and the onnxruntime build.

    python bench/variants.py [--rows 200000] [--model mlp|ft_transformer] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]


def latency_batch1_ms(call, feeds, n: int = 2000) -> tuple[float, float]:
    """p50 and p99 of single-row calls, in ms."""
    for i in range(100):
        call(feeds[i % len(feeds)])
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        call(feeds[i % len(feeds)])
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e3), float(np.percentile(times, 99) * 1e3)


def rows_per_s(call, feed, rows: int, min_seconds: float = 1.0) -> float:
    call(feed)
    calls, started = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - started < min_seconds:
        call(feed)
        calls += 1
    return calls * rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--model", choices=["mlp", "ft_transformer"], default="mlp")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="0 = every core, for torch and onnxruntime alike")
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="sluicegate-bench-")
    os.environ["SLUICEGATE_HOME"] = home

    from sluicegate import hardware, runtime
    from sluicegate.config import Settings, ensure_home
    from sluicegate.data import synthetic
    from sluicegate.features import stages as features_stages
    from sluicegate.policy import load_policy
    from sluicegate.ship import stages as ship_stages
    from sluicegate.spec import load_spec
    from sluicegate.train import stages as train_stages
    from sluicegate.train.config import TrainConfig
    from sluicegate.train.loop import predict

    settings = Settings()
    ensure_home(settings.paths)
    spec = load_spec(settings.spec_path)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    frame = synthetic.generate_transactions(synthetic.GenerateConfig(rows=args.rows, days=30, seed=7), spec)
    feats = features_stages.feature_stage(settings, spec, frame)
    prepared = train_stages.prepare(feats.frame, spec)
    cfg = TrainConfig(model=args.model, max_epochs=args.epochs, device="cpu")
    trained = train_stages.train_stage(prepared, spec, cfg, Path(home) / "checkpoints")
    model = trained.model
    exported = ship_stages.export_stage(model, prepared, Path(home) / "export", load_policy(REPO / "gates.yaml"))

    test, y = prepared.test, prepared.y_test
    big = test.take(np.arange(args.batch) % len(test))
    singles = [test.take(np.array([i])) for i in range(256)]
    print(f"{args.model} on {len(prepared.train):,} Feast training rows ({args.rows:,} generated), "
          f"test window {len(test):,} rows; {threads} threads for torch and onnxruntime; {trained.epochs_run} epochs")
    print(f"torch {torch.__version__} on {hardware.cpu_description()}; {runtime.onnxruntime_build()}")
    torch_auc = roc_auc_score(y, predict(model, test.numeric, test.categorical))

    with torch.no_grad():
        def eager(d):
            return model(torch.from_numpy(d.numeric), torch.from_numpy(d.categorical))
        base_p50, base_p99 = latency_batch1_ms(eager, singles)
        base_rate = rows_per_s(eager, big, args.batch)
    header = (f"{'variant':<12} {'provider':<22} {'p50 ms b1':>10} {'p99 ms b1':>10} {'vs eager':>9} "
              f"{'rows/s b' + str(args.batch):>14} "
              f"{'vs eager':>9} {'ROC-AUC':>8} {'delta':>8} {'KiB':>6}")
    print(header)
    print(f"{'torch eager':<12} {'-':<22} {base_p50:>10.3f} {base_p99:>10.3f} {1.0:>8.2f}x {base_rate:>14,.0f} "
          f"{1.0:>8.2f}x "
          f"{torch_auc:>8.4f} {0.0:>+8.4f} {'-':>6}")
    for name, path in exported.variants.items():
        providers = runtime.runnable_providers(name)
        for provider in providers:
            session = runtime.make_session(path, threads=threads, providers=[provider])
            provider = session.get_providers()[0]  # what ran (make_session refuses any other)

            def run(d, session=session):
                return runtime.onnx_predict(session, d)
            p50, p99 = latency_batch1_ms(run, singles)
            rate = rows_per_s(run, big, args.batch)
            auc = roc_auc_score(y, run(test))
            print(f"{name:<12} {provider:<22} {p50:>10.3f} {p99:>10.3f} {base_p50 / p50:>8.2f}x {rate:>14,.0f} "
                  f"{rate / base_rate:>8.2f}x {auc:>8.4f} {auc - torch_auc:>+8.4f} {path.stat().st_size / 1024:>6.0f}"
                  f"  {hardware.device_description(provider)}")
        if not providers:
            print(f"{name:<12} (meant for {', '.join(runtime.VARIANT_PROVIDERS[name])}: none present here)")


if __name__ == "__main__":
    main()
