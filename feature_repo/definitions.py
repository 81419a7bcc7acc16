"""Feast CLI shim: the objects Sluicegate applies, for `feast -c feature_repo plan|apply|ui`.

The definitions live in sluicegate.features.definitions.build_definitions; this file only
binds them to module names, which is how the feast CLI discovers objects.
Paths come from SLUICEGATE_HOME (default: .sluicegate at the project root).
"""

import os
from pathlib import Path

from sluicegate.config import Settings
from sluicegate.features.definitions import build_definitions
from sluicegate.spec import load_spec

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Settings resolves a relative home against the working directory; the CLI may run anywhere.
settings = Settings() if "SLUICEGATE_HOME" in os.environ else Settings(home=PROJECT_ROOT / ".sluicegate")

# The feast CLI discovers objects bound to module names: one name per object of the spec.
_definitions = build_definitions(load_spec(settings.spec_path), settings.paths.features)
globals().update({f"{type(obj).__name__.lower()}_{obj.name}": obj for obj in _definitions.objects()})
