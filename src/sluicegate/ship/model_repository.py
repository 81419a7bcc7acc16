"""A Triton / KServe model repository for the champion: the same ONNX file past one machine.

Layout (Triton's): `<root>/<model>/config.pbtxt` and `<root>/<model>/<version>/model.onnx`.
The config pins the served version, so a rollback to an older version is
served as such (Triton's default policy would serve the highest number).

    python -m sluicegate.ship.model_repository            # export the current champion
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


def config_pbtxt(name: str, version: str, widths: tuple[int, int], max_batch_size: int = 64,
                 max_queue_delay_us: int = 500) -> str:
    """Triton model configuration; batch is the first, implicit dimension.

    The model's output is [N]; Triton needs a non-empty per-row shape, so it is
    declared as [1] and reshaped to a scalar per row.
    """
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
version_policy: {{ specific: {{ versions: [ {int(version)} ] }} }}
input [
  {{ name: "{INPUT_NAMES[0]}" data_type: TYPE_FP32 dims: [ {widths[0]} ] }},
  {{ name: "{INPUT_NAMES[1]}" data_type: TYPE_INT64 dims: [ {widths[1]} ] }}
]
output [
  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def write_version(root: Path, name: str, version: str, onnx_bytes: bytes, widths: tuple[int, int],
                  max_batch_size: int = 64) -> Path:
    """Write `<root>/<name>/<version>/model.onnx` and a config serving that version; return the model dir.

    Each file is written aside and renamed, so a server watching the folder never sees half a file.
    """
    if not str(version).isdigit():
        raise ValueError(f"Triton versions are positive integers, got {version!r}")
    model_dir = root / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / MODEL_FILE
    if not target.exists() or target.read_bytes() != onnx_bytes:
        _atomic_write(target, onnx_bytes)
    _atomic_write(model_dir / CONFIG_FILE,
                  config_pbtxt(name, version, widths, max_batch_size).encode())
    return model_dir


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def export_champion(root: Path | None = None) -> Path:
    """Fetch the registry's champion (hash-checked) and write it into the repository."""
    from sluicegate.config import Settings
    from sluicegate.features.inputs import tensor_widths
    from sluicegate.ship import registry
    from sluicegate.ship.loader import fetch_onnx, registry_client
    from sluicegate.spec import load_spec

    settings = Settings()
    root = root or settings.paths.model_repository
    client = registry_client(settings)
    version = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
    if version is None:
        raise LookupError(f"{settings.model_name} has no champion to export")
    data = fetch_onnx(client, version)
    return write_version(root, settings.model_name, version.version, data, tensor_widths(load_spec(settings.spec_path)))


if __name__ == "__main__":
    print(export_champion())
