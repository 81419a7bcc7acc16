from pathlib import Path

import pytest

from sluicegate.config import CorruptHomeError, Settings, ensure_home


def test_missing_home_is_created(tmp_path):
    paths = ensure_home(Settings(home=tmp_path / "new").paths)
    assert paths.raw.is_dir() and paths.quarantine.is_dir() and paths.feast.is_dir()


def test_home_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "home"
    target.write_text("oops")
    with pytest.raises(CorruptHomeError, match="is a file"):
        ensure_home(Settings(home=target).paths)


def test_corrupt_marker_says_what_to_do(tmp_path):
    paths = ensure_home(Settings(home=tmp_path / "h").paths)
    (paths.root / "sluicegate-home.json").write_text("{not json")
    with pytest.raises(CorruptHomeError, match="delete"):
        ensure_home(paths)


def test_corrupt_mlflow_store_is_reported(tmp_path):
    paths = ensure_home(Settings(home=tmp_path / "h").paths)
    paths.mlflow_db.write_bytes(b"garbage that is not sqlite")
    with pytest.raises(CorruptHomeError, match="not an SQLite database"):
        ensure_home(paths)


def test_tracking_uri_defaults_under_home(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert Settings(home=tmp_path, mlflow_tracking_uri="http://x:5000").tracking_uri == "http://x:5000"


def test_a_spec_can_bring_its_own_gate_policy(tmp_path, monkeypatch):
    import yaml

    from sluicegate.spec import DEFAULT_SPEC_PATH

    monkeypatch.delenv("SLUICEGATE_GATES_PATH", raising=False)
    raw = yaml.safe_load(DEFAULT_SPEC_PATH.read_text()) | {"name": "strict", "gates": "policy/strict.yaml"}
    spec = tmp_path / "strict.spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    assert Settings(spec_path=spec).gates_path == tmp_path / "policy/strict.yaml"
    assert Settings().gates_path == Path("gates.yaml")
    monkeypatch.setenv("SLUICEGATE_GATES_PATH", "elsewhere.yaml")
    assert Settings(spec_path=spec).gates_path == Path("elsewhere.yaml")
