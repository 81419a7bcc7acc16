"""No column of any table in the package's code: the spec names them. Checked with the default
example's names, which only its spec (dataset.yaml) and its generator (data/synthetic.py) may use."""

import ast
import re
from pathlib import Path

from sluicegate.spec import DEFAULT_SPEC_PATH, load_spec

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {REPO / "src/sluicegate/data/synthetic.py"}


def _names() -> tuple[set[str], set[str]]:
    """(every column and feature name; the ones no English text would use by chance)."""
    spec = load_spec(DEFAULT_SPEC_PATH)
    names = set(spec.columns) | set(spec.feature_columns)
    return names, {n for n in names if "_" in n}


def _code_files() -> list[Path]:
    files = [*REPO.glob("src/sluicegate/**/*.py"), *REPO.glob("flows/*.py")]
    return [f for f in files if f not in ALLOWED]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _violations(files: list[Path]) -> list[str]:
    names, distinctive = _names()
    word = re.compile(r"\b(" + "|".join(sorted(distinctive)) + r")\b")
    found = []
    for path in files:
        text = path.read_text()
        found += [f"{path.name}:{n + 1}: {m.group(1)}" for n, line in enumerate(text.splitlines())
                  for m in [word.search(line)] if m]
        tree = ast.parse(text)
        docs = _docstrings(tree)
        found += [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and node.value in names]
    return found


def test_no_column_of_the_example_table_appears_in_the_package():
    found = _violations(_code_files())
    assert not found, "column names of the example table in the package:\n" + "\n".join(found)


def test_the_check_finds_planted_names(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('COLUMN = "amount"\n# reads merchant_category\n"""The amount is a docstring word."""\n')
    assert _violations([planted]) == ["planted.py:2: merchant_category", "planted.py:1: 'amount'"]
