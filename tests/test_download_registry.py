"""The installed-model registry: default resolution, --model by name or path, first-run message."""

from __future__ import annotations

import json
import threading

import pytest
from ds4_agent.engine import model_registry as mr


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4_AGENT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DS4_AGENT_MODEL", raising=False)
    return tmp_path / "home"


def test_no_model_explains_what_to_run(home):
    with pytest.raises(mr.NoModelError) as e:
        mr.resolve_model()
    msg = str(e.value)
    assert msg == mr.no_model_message()
    assert "ds4-agent model download q2" in msg and "ds4-agent doctor" in msg
    assert len(msg.splitlines()) <= 6


def test_first_registered_model_becomes_the_default(home, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    mr.register_model(mr.ModelEntry(name="flash-q2", path=str(a), tier="q2", source="gguf"))
    mr.register_model(mr.ModelEntry(name="flash-q4", path=str(b), tier="q4", source="official"))
    assert mr.resolve_model() == a.resolve()
    assert mr.resolve_model("flash-q4") == b.resolve()
    assert mr.resolve_model(str(b)) == b.resolve()
    mr.set_default("flash-q4")
    assert mr.resolve_model() == b.resolve()
    data = json.loads((home / "data" / "models.json").read_text())
    assert data["default"] == "flash-q4" and set(data["models"]) == {"flash-q2", "flash-q4"}
    mr.unregister_model("flash-q4")
    assert mr.resolve_model() == a.resolve()


def test_bad_model_arguments_are_one_line_errors(home, tmp_path):
    with pytest.raises(mr.RegistryError, match="neither a directory nor an installed model"):
        mr.resolve_model("nope")
    gone = tmp_path / "gone"
    gone.mkdir()
    mr.register_model(mr.ModelEntry(name="m", path=str(gone)))
    gone.rmdir()
    with pytest.raises(mr.RegistryError, match="no longer exists"):
        mr.resolve_model()
    with pytest.raises(mr.RegistryError, match="no installed model named 'x'"):
        mr.set_default("x")


def test_environment_variable_picks_the_model(home, tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    monkeypatch.setenv("DS4_AGENT_MODEL", str(d))
    assert mr.resolve_model() == d.resolve()


def test_corrupt_registry_is_reported_not_overwritten(home):
    p = home / "data" / "models.json"
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with pytest.raises(mr.RegistryError, match="unreadable"):
        mr.resolve_model()
    with pytest.raises(mr.RegistryError):
        mr.register_model(mr.ModelEntry(name="m", path="/"))
    assert p.read_text() == "{not json"


def test_xdg_data_home_is_used_without_override(tmp_path, monkeypatch):
    monkeypatch.delenv("DS4_AGENT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert mr.models_dir() == tmp_path / "xdg" / "ds4-agent" / "models"


def test_concurrent_registrations_are_all_kept(home, tmp_path):
    def reg(i):
        mr.register_model(mr.ModelEntry(name=f"m{i}", path=str(tmp_path)))

    threads = [threading.Thread(target=reg, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(mr.load_registry().models) == {f"m{i}" for i in range(8)}
