"""`model info` on the three kinds of model a user may point at."""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf_fixture
import pytest
import tiny_model
from ds4_agent.agent.model_convert import register_info
from ds4_agent.engine import convert as cv
from ds4_agent.engine.convert_info import ModelInfoError, describe


def _run_info(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    p = argparse.ArgumentParser()
    register_info(p.add_subparsers())
    args = p.parse_args(["info", str(path)])
    code = args.func(args)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_info_official_and_converted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_model.build_tiny_model("quant")
    off = describe(src)
    assert off.kind == "official"
    assert "fp4-e2m1 (1×32)" in off.classes["routed_experts"]["formats"]
    assert abs(off.classes["routed_experts"]["bits_per_weight"] - 4.25) < 1e-9
    assert abs(off.classes["attention"]["bits_per_weight"] - (8 + 8 / 128**2)) < 1e-9
    cv.OfficialConverter(src, cv.ConvertOptions("q2", group_size=64)).run(tmp_path / "q2")
    q2 = describe(tmp_path / "q2")
    assert q2.kind == "converted" and q2.tier == "q2" and q2.params == off.params
    assert q2.classes["routed_experts"]["bits_per_weight"] == 2.5  # 2 + 2·16/64
    code, out = _run_info(tmp_path / "q2", capsys)
    assert code == 0
    assert "tier: q2" in out and "affine2-g64" in out and "128 GB" in out


def test_info_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = gguf_fixture.write_tiny_gguf(tmp_path / "tiny.gguf", "q2")
    info = describe(path)
    assert info.kind == "gguf"
    assert {"IQ2_XXS", "Q2_K"} <= set(info.classes["routed_experts"]["formats"])
    code, out = _run_info(path, capsys)
    assert code == 0 and "deepseek_v4" in out


def test_info_rejects_non_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelInfoError, match="no config.json"):
        describe(tmp_path)
    code, out = _run_info(tmp_path / "missing", capsys)
    assert code == 1 and "not a model directory" in out
