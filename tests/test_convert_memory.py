"""The converter's working memory does not grow with the model: converting a checkpoint several
times larger peaks at about the same RSS, below the stated bound (`convert.peak_ram_bound`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_model
from ds4_agent.engine import quant

HIDDEN, INTER, EXPERTS = 1024, 1024, 8
SHARD = 8 << 20

_SCRIPT = """
import json, os, sys, threading, time
from ds4_agent.engine import convert as cv

def rss():  # resident set size now (Linux /proc), bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

src, out, tier, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
opts = cv.ConvertOptions(tier, group_size=64, shard_bytes=shard, search=False)
c = cv.OfficialConverter(src, opts)
c.resolve_group_size()
bound = cv.peak_ram_bound(c.plan(), shard)
base = rss()
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
c.run(out)
stop.set(); t.join()
print(json.dumps({"base": base, "peak": peak[0], "bound": bound}))
"""


def _synthetic(path: Path, n_layers: int) -> Path:
    """An official-format checkpoint of FP8 attention-like and FP4 expert tensors only."""
    rng = np.random.default_rng(n_layers)
    path.mkdir()
    weight_map = {}
    for layer in range(n_layers):
        tensors = {}
        w = (rng.standard_normal((HIDDEN, HIDDEN)) * 0.02).astype(np.float32)
        codes, scales = quant.fp8_block_quantize(w)
        tensors[f"layers.{layer}.attn.wq_a.weight"] = ("F8_E4M3", codes)
        tensors[f"layers.{layer}.attn.wq_a.scale"] = ("F8_E8M0", scales)
        for e in range(EXPERTS):
            for name, shape in (
                ("w1", (INTER, HIDDEN)),
                ("w3", (INTER, HIDDEN)),
                ("w2", (HIDDEN, INTER)),
            ):
                packed, s = quant.fp4_row_quantize(
                    rng.standard_normal(shape).astype(np.float32) * 0.02
                )
                tensors[f"layers.{layer}.ffn.experts.{e}.{name}.weight"] = (
                    "I8",
                    packed.view(np.int8),
                )
                tensors[f"layers.{layer}.ffn.experts.{e}.{name}.scale"] = ("F8_E8M0", s)
        shard = f"model-{layer + 1:05d}-of-{n_layers:05d}.safetensors"
        tiny_model.write_safetensors(path / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    return path


def _peak(src: Path, out: Path, tier: str) -> dict[str, int]:
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(src), str(out), tier, str(SHARD)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(("tier", "layers"), [("lossless", (2, 8)), ("q2", (1, 4))])
def test_peak_memory_does_not_grow_with_model_size(
    tmp_path: Path, tier: str, layers: tuple[int, int]
) -> None:
    small = _synthetic(tmp_path / "small", layers[0])
    big = _synthetic(tmp_path / "big", layers[1])
    src_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    a = _peak(small, tmp_path / "o-small", tier)
    b = _peak(big, tmp_path / "o-big", tier)
    grow_small, grow_big = a["peak"] - a["base"], b["peak"] - b["base"]
    print(
        f"{tier}: source {src_bytes / 2**20:.0f} MiB; working-set growth small {grow_small / 2**20:.0f} MiB, "
        f"{layers[1] // layers[0]}× larger {grow_big / 2**20:.0f} MiB; "
        f"stated bound {b['bound'] / 2**20:.0f} MiB"
    )
    assert grow_big <= b["bound"]
    assert grow_big < grow_small + (16 << 20)
