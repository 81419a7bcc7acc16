"""Dependencies where they belong, and what they say.

- declared == imported: every package the code under src/ imports is declared in pyproject
  (`dependencies`, or an extra when the import is guarded), and every declared runtime
  dependency is imported or named where it is used;
- database drivers in an extra, test-only packages in `dev`;
- warnings: a deprecation raised from sluicegate fails the tests; third-party noise is filtered
  by name (message or module), never wholesale, the same list in pytest and in the CLI.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

SRC = REPO / "src"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Optional bindings this machine does not have installed, so importlib.metadata cannot map them.
NOT_INSTALLED_HERE = {"pynvml": "nvidia-ml-py"}
# Declared runtime dependencies that no module imports by name: (where the code asks for it, the text).
USED_WITHOUT_IMPORT = {
    "onnxscript": ("sluicegate/ship/export.py", "torch.onnx.export"),  # torch's dynamo exporter imports it
    "uvloop": ("sluicegate/serve/app.py", 'loop="uvloop"'),  # uvicorn loads it by name
    "httptools": ("sluicegate/serve/app.py", 'http="httptools"'),
}
GUARDS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _guarded(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(isinstance(t, ast.Name) and t.id in GUARDS for t in types)


class _Imports(ast.NodeVisitor):
    """Top-level names of absolute imports, anywhere in a module, and whether each is guarded by a
    try/except that survives its absence."""

    def __init__(self):
        self.found: list[tuple[str, bool]] = []
        self._guards = 0

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_guarded(h) for h in node.handlers)
        self._guards += guarded
        for child in node.body:
            self.visit(child)
        self._guards -= guarded
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name.split(".")[0], self._guards > 0) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.found.append((node.module.split(".")[0], self._guards > 0))


def _imports() -> dict[str, dict]:
    """Third-party top-level import names under src/ -> {"files": [...], "guarded": all guarded}."""
    names: dict[str, dict] = {}
    for path in sorted(SRC.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for name, guarded in visitor.found:
            if name in sys.stdlib_module_names or name in ("__future__", "sluicegate"):
                continue
            entry = names.setdefault(name, {"files": set(), "guarded": True})
            entry["files"].add(str(path.relative_to(SRC)))
            entry["guarded"] &= guarded
    return names


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


RUNTIME = _names(PYPROJECT["project"]["dependencies"])
EXTRAS = {extra: _names(reqs) for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()}


@functools.cache
def _packages() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(import_name: str) -> set[str]:
    dists = _packages().get(import_name) or [NOT_INSTALLED_HERE.get(import_name, "")]
    return {canonicalize_name(d) for d in dists if d}


def test_every_imported_package_is_declared():
    optional = set().union(*(names for extra, names in EXTRAS.items() if extra != "dev"))
    undeclared = {}
    for name, where in _imports().items():
        dists = _distributions(name)
        allowed = RUNTIME | optional if where["guarded"] else RUNTIME
        if not dists & allowed:
            undeclared[name] = (sorted(dists), sorted(where["files"]))
    assert not undeclared, f"imported under src/ but not declared in pyproject: {undeclared}"


def test_every_declared_runtime_dependency_is_imported_or_named_where_it_is_used():
    imported = set()
    for name in _imports():
        imported |= _distributions(name)
    unused = []
    for dist in sorted(RUNTIME - imported):
        if dist in USED_WITHOUT_IMPORT:
            file, text = USED_WITHOUT_IMPORT[dist]
            assert text in (SRC / file).read_text(), f"{dist}: {file} no longer uses it ({text!r})"
        else:
            unused.append(dist)
    assert not unused, f"declared in pyproject dependencies but imported nowhere under src/: {unused}"


def test_the_import_scan_sees_lazy_and_guarded_imports():
    found = _imports()
    assert not found["torch"]["guarded"] and "sluicegate/ship/export.py" in found["torch"]["files"]
    assert found["pynvml"]["guarded"]  # inside try/except in train/devices.py: an extra is enough
    assert "distributed" in found and "pytz" in found  # compute.py imports it inside a function


def test_drivers_are_extras_and_test_only_packages_are_dev():
    assert "psycopg2-binary" not in RUNTIME and EXTRAS["postgres"] == {"psycopg2-binary"}
    # `make setup` installs .[dev]: it takes the Postgres driver for the backend tests.
    assert "sluicegate[postgres]" in PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert "httpx" not in RUNTIME and "httpx" in EXTRAS["dev"]
    assert "httpx" not in _imports()  # only tests use it
    # fastapi comes with Prefect; no code of ours imports it, but its pin stays (Prefect 3.8.8's client).
    assert "fastapi" not in RUNTIME and "fastapi" not in _imports()
    assert "fastapi==0.150.0" in (REPO / "constraints.txt").read_text().splitlines()


# --- warnings ---------------------------------------------------------------------------------------

def _filters() -> list[str]:
    return PYPROJECT["tool"]["pytest"]["ini_options"]["filterwarnings"]


def test_no_warning_category_is_silenced_wholesale():
    for entry in _filters():
        action, message, category, *module = entry.split(":")
        if action == "ignore":
            assert message or (module and module[0]), f"{entry!r} silences every {category} from everyone"
    assert "error::DeprecationWarning:sluicegate" in _filters()


def test_a_deprecation_raised_from_sluicegate_fails_the_tests():
    with pytest.raises(DeprecationWarning, match="old API"):
        warnings.warn_explicit("old API", DeprecationWarning, "registry.py", 1, module="sluicegate.ship.registry")
    with warnings.catch_warnings(record=True) as seen:  # named third-party noise stays quiet
        warnings.warn_explicit("noload is deprecated", DeprecationWarning, "store.py", 1,
                               module="mlflow.store.tracking.sqlalchemy_store")
    assert not [w for w in seen if "noload" in str(w.message)]


def test_the_cli_filters_the_same_named_noise_and_shows_ours():
    from sluicegate.cli import LIBRARY_NOISE

    for message, category, module in LIBRARY_NOISE:
        assert message or module, "a CLI filter must name the noise"
        entry = f"ignore:{message}:{category.__name__}" + (f":{module}" if module else "")
        assert entry in _filters(), f"{entry!r} is filtered in the CLI but not in pytest"
    script = (
        "import warnings\n"
        "from sluicegate.cli import _quiet_library_noise\n"
        "_quiet_library_noise()\n"
        "warnings.warn_explicit('ours is deprecated', DeprecationWarning, 'a.py', 1, module='sluicegate.ship.x')\n"
        "warnings.warn_explicit('mlflow noise', DeprecationWarning, 'b.py', 2, module='mlflow.store.x')\n"
        "warnings.warn_explicit('pandas will change', FutureWarning, 'c.py', 3, module='pandas.core.x')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(REPO))
    assert out.returncode == 0, out.stderr
    assert "ours is deprecated" in out.stderr and "pandas will change" in out.stderr, out.stderr
    assert "mlflow noise" not in out.stderr
