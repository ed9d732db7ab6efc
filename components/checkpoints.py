"""Checkpoints that follow the stage contract, loaded through safetensors and JSON only.

A checkpoint is a directory::

    model.safetensors   weights (never pickle)
    config.json         the model's configuration
    manifest.json       lineage: stage, parent and data md5, params hash, git sha,
                        MLflow run id, Prefect flow-run id, metrics
    samples/*.png       optional sample grids

It is written to a temporary sibling directory and renamed into place, so a crash
never leaves half a checkpoint. Its md5 is DVC's directory hash (the ``.dir`` value
``dvc.lock`` records), computed here without importing DVC, so a checkpoint can be
verified against ``dvc.lock`` or a manifest before anything reads its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"


class ChecksumMismatch(RuntimeError):
    """A checkpoint's bytes do not match the md5 it was recorded with."""


# ---------------------------------------------------------------- hashing (DVC-compatible)

def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_md5(path: Path) -> str:
    """DVC 3's hash of a directory: md5 of the sorted JSON list of {md5, relpath}, plus '.dir'."""
    path = Path(path)
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            full = Path(root) / name
            entries.append({"md5": file_md5(full), "relpath": full.relative_to(path).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    blob = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(blob).hexdigest() + ".dir"


def md5_of(path: Path) -> str:
    path = Path(path)
    return dir_md5(path) if path.is_dir() else file_md5(path)


def verify_md5(path: Path, expected: str, what: str = "checkpoint") -> None:
    if not Path(path).exists():
        raise ChecksumMismatch(f"{what} {path} is missing (expected md5 {expected})")
    actual = md5_of(path)
    if actual != expected:
        raise ChecksumMismatch(
            f"{what} {path} has md5 {actual} but {expected} was recorded; "
            "its bytes changed since it was produced (restore it with `dvc checkout` or rerun its stage)"
        )


def params_hash(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- atomic directories

def replace_dir(src: Path, dst: Path, copy: bool = False) -> None:
    """Move (or copy) ``src`` to ``dst`` atomically, replacing whatever ``dst`` held."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    staged = staging / "new"
    (shutil.copytree if copy else shutil.move)(str(src), str(staged))
    old = staging / "old"
    if dst.exists():
        os.rename(dst, old)
    os.rename(staged, dst)
    shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- model checkpoints

@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    manifest: dict[str, Any]


def save_checkpoint(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                    manifest: dict[str, Any], samples: dict[str, np.ndarray] | None = None) -> str:
    """Write a stage checkpoint atomically; returns its md5 (DVC's directory hash)."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, config)
        write_json(tmp / MANIFEST, manifest)
        for name, grid in (samples or {}).items():
            (tmp / "samples").mkdir(exist_ok=True)
            Image.fromarray(np.asarray(grid, dtype=np.uint8)).save(tmp / "samples" / f"{name}.png")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dir_md5(out_dir)


def load_checkpoint(path: Path, expected_md5: str | None = None) -> Checkpoint:
    """Load weights (safetensors) and JSON; verify the md5 first when one is given."""
    path = Path(path)
    if expected_md5 is not None:
        verify_md5(path, expected_md5)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a checkpoint: {name} is missing")
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).exists() else {}
    return Checkpoint(path, load_file(str(path / WEIGHTS)), read_json(path / CONFIG), manifest)


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "module", module)  # unwrap DDP
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


# ---------------------------------------------------------------- resumable training state

def _flatten_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{name}.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_train_state(state_dir: Path, modules: dict[str, torch.nn.Module],
                     optimizers: dict[str, torch.optim.Optimizer], step: int,
                     extra: dict[str, Any] | None = None) -> None:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        tensors.update(module_tensors(f"model.{name}", m))
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = _flatten_optimizer(name, opt)
        tensors.update(t)
        opt_meta[name] = meta
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(state_dir / "state.safetensors"))
    rng = {"torch": torch.get_rng_state().tolist()}
    write_json(state_dir / "state.json", {"step": step, "optimizers": opt_meta, "rng": rng,
                                            "extra": extra or {}})


def load_train_state(state_dir: Path, modules: dict[str, torch.nn.Module],
                     optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict[str, Any]]:
    """Restore modules, optimisers and the torch RNG in place; returns (step, extra)."""
    state_dir = Path(state_dir)
    tensors = load_file(str(state_dir / "state.safetensors"))
    meta = read_json(state_dir / "state.json")
    for name, m in modules.items():
        getattr(m, "module", m).load_state_dict(sub_state(tensors, f"model.{name}"))
    for name, opt in optimizers.items():
        om = meta["optimizers"][name]
        state: dict[int, dict[str, Any]] = {}
        for key, val in tensors.items():
            pre = f"opt.{name}."
            if key.startswith(pre):
                pid, field = key[len(pre):].split(".", 1)
                state.setdefault(int(pid), {})[field] = val
        for pid, sc in om["scalars"].items():
            state.setdefault(int(pid), {}).update(sc)
        opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
    torch.set_rng_state(torch.tensor(meta["rng"]["torch"], dtype=torch.uint8))
    return int(meta["step"]), meta.get("extra", {})
