"""`ds4-agent doctor`: what this machine can run, and what to change.

Checks, in order: platform and MLX backend (Metal / CUDA / CPU), physical memory and the GPU
wired-memory limit (macOS `iogpu.wired_limit_mb`, with the command that raises it), free disk
where models and KV snapshots live, which tiers of DeepSeek V4 Flash fit and the largest safe
`--ctx` for each, the installed model, and the snapshot store's health.

Tier sizes are the converter's own plans for the published Flash shapes (no data read). The
memory model is the converter's (`convert_sizes.fit`): usable = RAM − max(8 GiB, RAM/8) once the
wired limit is raised, minus weights, runtime overhead and the fixed decode state; the rest
divided by the decode state per token is the largest context. On the CPU backend nothing is
reported as runnable: it exists for development and tests with tiny models.

`--format json` prints one object matching `DoctorReport` (`--schema` prints its JSON Schema).
Exit status 0 (the report is the result); with `--check`, 1 when no tier can run here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

GIB = 1 << 30
MIB = 1 << 20
TIERS = ("q2", "q3", "q4", "lossless")
# Below this the agent is not useful (system prompt + a few files of context).
MIN_USEFUL_CTX = 16_384


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlatformInfo(_Model):
    system: str
    machine: str
    os_version: str
    python: str
    ds4_agent: str


class BackendInfo(_Model):
    name: Literal["metal", "cuda", "cpu", "unavailable"]
    mlx_version: str | None
    device: str | None
    metal_available: bool
    note: str


class MemoryInfo(_Model):
    physical_bytes: int
    wired_limit_bytes: int | None  # what the GPU may wire now (Metal), if known
    usable_bytes: int  # what a model may use once the limit is raised
    raise_command: str | None  # how to raise the wired limit (macOS)


class DiskInfo(_Model):
    path: str
    free_bytes: int


class TierFit(_Model):
    tier: str
    size_bytes: int
    fits_memory: bool
    max_ctx: int  # largest safe --ctx for this machine's memory (0 when it does not fit)
    runnable: bool  # fits, and the backend can run it
    note: str


class InstalledModel(_Model):
    name: str | None
    path: str | None
    tier: str | None
    ok: bool
    problem: str | None


class SnapshotHealth(_Model):
    path: str
    exists: bool
    writable: bool
    total_bytes: int
    n_snapshots: int
    n_segments: int
    temp_files: int
    unreadable: int
    ok: bool
    problem: str | None


class DoctorReport(_Model):
    platform: PlatformInfo
    backend: BackendInfo
    memory: MemoryInfo
    disk_models: DiskInfo
    disk_snapshots: DiskInfo
    tiers: list[TierFit]
    fitting_tiers: list[str]
    model: InstalledModel
    snapshots: SnapshotHealth
    advice: list[str]


# --------------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------------


def _platform() -> PlatformInfo:
    from ds4_agent.agent.version import package_version

    system = platform.system()
    ver = platform.mac_ver()[0] if system == "Darwin" else platform.release()
    return PlatformInfo(
        system=system,
        machine=platform.machine(),
        os_version=ver,
        python=sys.version.split()[0],
        ds4_agent=package_version(),
    )


def _backend() -> BackendInfo:
    try:
        import mlx.core as mx
    except Exception as e:  # noqa: BLE001 - report any import failure verbatim
        return BackendInfo(
            name="unavailable",
            mlx_version=None,
            device=None,
            metal_available=False,
            note=f"MLX is not importable ({e}); reinstall ds4-agent",
        )
    metal = bool(mx.metal.is_available())
    cuda = bool(getattr(mx, "cuda", None) is not None and mx.cuda.is_available())
    name = "metal" if metal else "cuda" if cuda else "cpu"
    note = {
        "metal": "Apple GPU through Metal",
        "cuda": "NVIDIA GPU through MLX's CUDA backend",
        "cpu": "CPU backend: development and tests with tiny models only; the real model "
        "needs an Apple Silicon Mac (Metal) or MLX's CUDA backend",
    }[name]
    return BackendInfo(
        name=name,
        mlx_version=mx.__version__,
        device=str(mx.default_device()),
        metal_available=metal,
        note=note,
    )


def _sysctl(key: str) -> int | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    with contextlib.suppress(ValueError):
        return int(out.stdout.strip())
    return None


def _memory(backend: BackendInfo) -> MemoryInfo:
    from ds4_agent.engine.convert_sizes import physical_memory, usable_memory

    phys = physical_memory()
    if sys.platform == "darwin":
        phys = _sysctl("hw.memsize") or phys
    wired: int | None = None
    if backend.name == "metal":
        with contextlib.suppress(Exception):
            import mlx.core as mx

            info = mx.device_info()
            wired = int(info.get("max_recommended_working_set_size") or 0) or None
        mb = _sysctl("iogpu.wired_limit_mb")
        if mb:  # 0 means "the default"; a set value is what the GPU may wire
            wired = mb * MIB
    usable = usable_memory(phys) if phys else 0
    cmd = None
    if backend.name == "metal" and usable and (wired is None or wired < usable):
        cmd = f"sudo sysctl iogpu.wired_limit_mb={usable // MIB}"
    return MemoryInfo(
        physical_bytes=phys, wired_limit_bytes=wired, usable_bytes=usable, raise_command=cmd
    )


def _disk(path: Path) -> DiskInfo:
    from ds4_agent.engine.download import free_bytes

    return DiskInfo(path=str(path), free_bytes=free_bytes(path))


@functools.lru_cache(maxsize=1)
def _flash_tier_sizes() -> tuple[tuple[str, int], ...]:
    return tuple(_compute_tier_sizes().items())


def flash_tier_sizes() -> dict[str, int]:
    """Output bytes of each tier for the published Flash shapes (the converter's plans)."""
    return dict(_flash_tier_sizes())


def _compute_tier_sizes() -> dict[str, int]:
    from ds4_agent.engine import convert as cv
    from ds4_agent.engine.convert_sizes import flash_entries

    tensors = cv.source_tensors(flash_entries())
    sizes = {}
    for tier in TIERS:
        group = cv.choose_group_size(tensors, tier, {})[0] if tier in cv.EXPERT_BITS else 32
        sizes[tier] = cv.plan_bytes(cv.build_plan(tensors, tier, group))
    return sizes


def _ctx_within(limit: int, size: int) -> int:
    """Largest context whose state fits `limit` bytes next to `size` bytes of weights."""
    from ds4_agent.engine.convert_sizes import (
        FLASH_CONFIG,
        RUNTIME_OVERHEAD,
        state_bytes_per_token,
        state_fixed_bytes,
    )

    free = limit - size - RUNTIME_OVERHEAD - state_fixed_bytes(FLASH_CONFIG)
    ctx = int(max(free, 0) // state_bytes_per_token(FLASH_CONFIG))
    return min(ctx, int(FLASH_CONFIG["max_position_embeddings"]))


def _tiers(backend: BackendInfo, mem: MemoryInfo) -> list[TierFit]:
    from ds4_agent.engine.convert_sizes import FLASH_CONFIG, fit

    out = []
    for tier, size in flash_tier_sizes().items():
        f = fit(size, FLASH_CONFIG, mem.physical_bytes, min_context=MIN_USEFUL_CTX)
        runnable = f.fits and backend.name in ("metal", "cuda")
        if not f.fits:
            note = f"needs more memory than the ≈ {mem.usable_bytes / GIB:.0f} GiB usable here"
        elif not runnable:
            note = "fits in memory, but the backend here cannot run it at a useful speed"
        elif mem.wired_limit_bytes is not None and (
            now := _ctx_within(mem.wired_limit_bytes, size)
        ) < min(f.context_tokens, MIN_USEFUL_CTX):
            note = "fits once the wired-memory limit is raised (see advice)"
        elif mem.wired_limit_bytes is not None and now < f.context_tokens:
            note = f"fits; --ctx ≤ {now:,} at the current wired limit, the rest once raised"
        else:
            note = "fits"
        out.append(
            TierFit(
                tier=tier,
                size_bytes=size,
                fits_memory=f.fits,
                max_ctx=f.context_tokens if f.fits else 0,
                runnable=runnable,
                note=note,
            )
        )
    return out


def _installed() -> InstalledModel:
    from ds4_agent.engine import model_registry as mr

    try:
        path = mr.resolve_model()
        reg = mr.load_registry()
    except mr.NoModelError:
        return InstalledModel(
            name=None, path=None, tier=None, ok=False, problem="no model is installed"
        )
    except mr.RegistryError as e:
        return InstalledModel(name=None, path=None, tier=None, ok=False, problem=str(e))
    entry = reg.models.get(reg.default or "") if reg.default else None
    name = entry.name if entry else None
    tier = entry.tier if entry else None
    try:
        from ds4_agent.engine.config import ModelConfig

        ModelConfig.from_dir(path)
    except Exception as e:  # noqa: BLE001 - any config problem is reported, not raised
        return InstalledModel(name=name, path=str(path), tier=tier, ok=False, problem=str(e))
    return InstalledModel(name=name, path=str(path), tier=tier, ok=True, problem=None)


def _snapshots(root: Path) -> SnapshotHealth:
    base = {"path": str(root), "total_bytes": 0, "n_snapshots": 0, "n_segments": 0}
    if not root.exists():
        # A missing store is healthy: it is created on the first save.
        return SnapshotHealth(
            **base, exists=False, writable=_writable(root), temp_files=0, unreadable=0,
            ok=True, problem=None,
        )  # fmt: skip
    writable = _writable(root)
    temp = unreadable = 0
    problem = None
    try:
        from ds4_agent.sessions.snapshot_format import MAGIC_SNAPSHOT, TMP_SUFFIX, read_header_only
        from ds4_agent.sessions.store import SnapshotStore

        usage = SnapshotStore(root).usage()
        base.update(
            total_bytes=usage.total_bytes,
            n_snapshots=usage.n_snapshots,
            n_segments=usage.n_segments,
        )
        temp = sum(1 for _ in root.rglob(f"*{TMP_SUFFIX}"))
        for p in sorted((root / "snapshots").glob("*.snap"))[:1000]:
            try:
                read_header_only(p, MAGIC_SNAPSHOT)
            except Exception:  # noqa: BLE001 - each bad file is counted
                unreadable += 1
    except Exception as e:  # noqa: BLE001 - the store itself could not be read
        problem = f"cannot read the store: {e}"
    if problem is None and not writable:
        problem = f"{root} is not writable; sessions cannot be saved"
    elif problem is None and unreadable:
        problem = f"{unreadable} damaged snapshot file(s)"
    elif problem is None and temp:
        problem = f"{temp} temp file(s) left by interrupted saves (removed by the next save's gc)"
    ok = problem is None or (temp > 0 and not unreadable and writable)
    return SnapshotHealth(
        **base, exists=True, writable=writable, temp_files=temp, unreadable=unreadable, ok=ok,
        problem=problem,
    )  # fmt: skip


def _writable(path: Path) -> bool:
    p = path
    while not p.exists():
        p = p.parent
    return os.access(p, os.W_OK)


def _advice(r: DoctorReport) -> list[str]:
    a: list[str] = []
    if r.backend.name == "cpu":
        a.append(
            "This machine has no GPU backend for MLX: use it for development and tests "
            "(tiny models); run the real model on an Apple Silicon Mac with 128 GB+ "
            '(or an NVIDIA box with `pip install "mlx[cuda]"`).'
        )
    elif r.backend.name == "unavailable":
        a.append(r.backend.note)
    runnable = [t for t in r.tiers if t.runnable]
    if not runnable and r.backend.name in ("metal", "cuda"):
        q2 = next(t for t in r.tiers if t.tier == "q2")
        a.append(
            f"No tier fits {r.memory.physical_bytes / GIB:.0f} GiB of memory: q2 needs ≈ "
            f"{q2.size_bytes / GIB:.0f} GiB of weights plus context; a 128 GB Mac is the minimum."
        )
    if runnable:
        best = runnable[-1] if any(t.tier == "lossless" for t in runnable) else runnable[0]
        a.append(
            f"Recommended: `ds4-agent model download {best.tier}` (--ctx up to {best.max_ctx})."
        )
        a.append("Quit memory-heavy apps (browsers, IDEs, VMs) before long sessions.")
    if r.memory.raise_command:
        a.append(
            f"Raise the GPU wired-memory limit so the model stays resident: "
            f"`{r.memory.raise_command}` (resets at reboot)."
        )
    if not r.model.ok and runnable:
        a.append(r.model.problem or "no model installed")
    elif not r.model.ok and r.model.problem and "no model" not in r.model.problem:
        a.append(r.model.problem)
    if runnable:
        need = min(t.size_bytes for t in runnable) * 2
        if r.disk_models.free_bytes < need and not r.model.ok:
            a.append(
                f"Only {r.disk_models.free_bytes / GIB:.0f} GiB free in {r.disk_models.path}; a "
                f"download plus conversion needs ≈ {need / GIB:.0f} GiB (or use --dir elsewhere)."
            )
    if not r.snapshots.ok and r.snapshots.problem:
        a.append(f"Snapshot store: {r.snapshots.problem}.")
    return a


def build_report() -> DoctorReport:
    from ds4_agent.agent.paths import snapshots_dir
    from ds4_agent.engine.model_registry import models_dir

    backend = _backend()
    mem = _memory(backend)
    tiers = _tiers(backend, mem)
    r = DoctorReport(
        platform=_platform(),
        backend=backend,
        memory=mem,
        disk_models=_disk(models_dir()),
        disk_snapshots=_disk(snapshots_dir()),
        tiers=tiers,
        fitting_tiers=[t.tier for t in tiers if t.runnable],
        model=_installed(),
        snapshots=_snapshots(snapshots_dir()),
        advice=[],
    )
    r.advice = _advice(r)
    return r


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _print_text(r: DoctorReport) -> None:
    def row(k: str, v: str) -> None:
        print(f"{k:<12} {v}")

    p, b, m = r.platform, r.backend, r.memory
    row(
        "platform",
        f"{p.system} {p.os_version} {p.machine}, Python {p.python}, ds4-agent {p.ds4_agent}",
    )
    row("backend", f"{b.name} (MLX {b.mlx_version}, {b.device}) — {b.note}")
    wired = f"{m.wired_limit_bytes / GIB:.0f} GiB" if m.wired_limit_bytes else "n/a"
    row("memory", f"{m.physical_bytes / GIB:.0f} GiB physical, GPU wired limit {wired}, "
        f"≈ {m.usable_bytes / GIB:.0f} GiB usable by a model")  # fmt: skip
    row("disk", f"{r.disk_models.free_bytes / GIB:.0f} GiB free for models ({r.disk_models.path})")
    row(
        "",
        f"{r.disk_snapshots.free_bytes / GIB:.0f} GiB free for KV snapshots ({r.disk_snapshots.path})",
    )
    print("tiers        (DeepSeek V4 Flash)")
    for t in r.tiers:
        ctx = f"--ctx ≤ {t.max_ctx:,}" if t.fits_memory else "-"
        mark = "yes" if t.runnable else "no "
        print(f"  {t.tier:<9} {t.size_bytes / GIB:6.1f} GiB  {mark}  {ctx:<20} {t.note}")
    mdl = r.model
    row("model", f"{mdl.name or ''} {mdl.path} ({mdl.tier})" if mdl.ok else f"none: {mdl.problem}")
    s = r.snapshots
    state = "ok" if s.ok and not s.problem else s.problem or "problem"
    row(
        "snapshots",
        f"{s.n_snapshots} snapshots, {s.total_bytes / GIB:.2f} GiB — {state} ({s.path})",
    )
    if r.advice:
        print("advice")
        for line in r.advice:
            print(f"  - {line}")


def _doctor(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(DoctorReport.model_json_schema(), indent=2))
        return 0
    r = build_report()
    if args.format == "json":
        print(r.model_dump_json(indent=2))
    else:
        _print_text(r)
    return 1 if args.check and not r.fitting_tiers else 0


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of --format json")
    p.add_argument(
        "--check", action="store_true", help="exit with status 1 when no tier can run here"
    )
    p.set_defaults(func=_doctor)
