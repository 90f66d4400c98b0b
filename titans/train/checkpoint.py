"""Checkpoints: atomic, validated on load, nothing unpickled.

Layout (one directory per saved step, under `<out_dir>/checkpoints/`):

    step_000123/
      model.safetensors    the weights (full, unsharded); tied tensors stored once, their
                           other names kept in the header metadata ("aliases")
      optimizer.pt         AdamW state keyed by parameter name: torch.save of tensors, numbers,
                           strings, lists and dicts only, read back with weights_only=True
      trainer_state.json   format, step, the size and sha256 of every other file, data position, RNG states
                           of every rank (torch / numpy / python), the TrainConfig, the tokenizer's name and
                           fingerprint, the run's facts (`run`: task, its arguments, data)
      config.json          the model config (`config.to_dict()`), when given
      carried_state.safetensors   the model states a run carries across steps (TrainConfig.carry_state),
                           every rank's; their structure is in trainer_state.json ("carried")
      tokenizer.json       the tokenizer, when it has a file (the byte tokenizer has none)
    latest                 the name of the newest step directory (a one-line text file)

Writing goes to `.tmp-step_000123/`, each file fsynced, trainer_state.json last; then the
directory is renamed into place (`os.replace`), so a process killed at any moment leaves
either the complete checkpoint or none (stale `.tmp-*` directories are ignored and cleaned).
The learning-rate schedule is a pure function of the step, so it needs no state of its own.

Loading checks that every file it reads is there with its recorded size and sha256 and parses;
any failure raises CheckpointError naming the file. `load_latest` walks back to the previous
good checkpoint with a warning. Inference (`load_optimizer=False`) reads and checks only the
weights, the config and the tokenizer, so a damaged optimizer file cannot cost it its weights.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint",
           "load_latest", "load_run_checkpoint", "list_checkpoints", "clean_temp", "rng_state", "set_rng_state", "FORMAT",
           "MODEL_FILE", "OPTIM_FILE", "CARRIED_FILE", "STATE_FILE", "CONFIG_FILE", "LATEST_FILE"]

FORMAT = "titans-checkpoint/1"
MODEL_FILE, OPTIM_FILE, CARRIED_FILE = "model.safetensors", "optimizer.pt", "carried_state.safetensors"
STATE_FILE, CONFIG_FILE, LATEST_FILE = "trainer_state.json", "config.json", "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt (the message names the file)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: everything a trainer needs to continue."""

    path: Path
    step: int
    model_state: dict[str, Tensor]
    optim_state: dict | None
    state: dict  # trainer_state.json
    config: dict | None
    carried: dict[str, Tensor] | None = None  # carried_state.safetensors (None: not in this checkpoint)


# ---------------------------------------------------------------------------------- RNG

def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def _unb64(s: str, dtype: type) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).copy()


def rng_state() -> dict:
    """This process's torch / numpy / python RNG states, as JSON-able values (base64 arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    out = {"torch": _b64(torch.get_rng_state().numpy()),
           "numpy": [name, _b64(keys.astype("<u4")), int(pos), int(has_gauss), float(cached)],
           "python": [version, _b64(np.asarray(internal, dtype="<u4")), gauss]}
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    """Restore the states saved by `rng_state`."""
    torch.set_rng_state(torch.from_numpy(_unb64(state["torch"], np.uint8)))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, _unb64(keys, "<u4"), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(i) for i in _unb64(internal, "<u4")), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(_unb64(s, np.uint8))
                                      for s in state["cuda"]])


# ------------------------------------------------------------------------------- saving

def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fingerprint(tokenizer: Any) -> str:
    from ..data.tokenizer import tokenizer_fingerprint
    return tokenizer_fingerprint(tokenizer)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dedup_shared(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store tensors that share memory (tied weights) once; the aliases map name -> kept name."""
    kept: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in kept:
            aliases[name] = kept[key]
            continue
        if key is not None:
            kept[key] = name
        out[name] = t.detach().contiguous()
    return out, aliases


def save_checkpoint(root: str | os.PathLike, step: int, *, model_state: dict[str, Tensor],
                    optim_state: dict | None, state: dict, config: dict | None = None,
                    tokenizer: Any = None, keep_last: int | None = None,
                    carried: dict[str, Tensor] | None = None) -> Path:
    """Write `root/step_{step:06d}` atomically, point `root/latest` at it, prune old ones.

    Args:
        root: the checkpoints directory (created).  step: the number of updates done.
        model_state: full model state dict (name -> tensor).
        optim_state: the optimizer state dict (tensors / numbers / strings / lists / dicts).
        state: JSON-able trainer state (data position, RNG, train config, ...); "format",
            "step" and "files" are filled in here.
        config: the model config dict (config.json).  tokenizer: has `.save(dir)` and `.name`.
        keep_last: keep only the newest this many step directories (None keeps all).
        carried: tensors of the carried model states (carried_state.safetensors), or None / {}.

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = _dedup_shared(model_state)
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT,
                                                       "aliases": json.dumps(aliases)})
    with open(tmp / MODEL_FILE, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp / MODEL_FILE, 0o666 & ~umask)  # safetensors writes 0600; match the other files
    if optim_state is not None:
        with open(tmp / OPTIM_FILE, "wb") as f:
            torch.save(optim_state, f)
            f.flush()
            os.fsync(f.fileno())
    if carried:
        save_file(carried, str(tmp / CARRIED_FILE), metadata={"format": FORMAT})
        with open(tmp / CARRIED_FILE, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp / CARRIED_FILE, 0o666 & ~umask)
    if config is not None:
        _fsync_write(tmp / CONFIG_FILE, (json.dumps(config, indent=1) + "\n").encode())
    if tokenizer is not None:
        tokenizer.save(tmp)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    meta = {**state, "format": FORMAT, "step": step, "files": files,
            "tokenizer": getattr(tokenizer, "name", None),
            "tokenizer_fingerprint": None if tokenizer is None else _fingerprint(tokenizer)}
    _fsync_write(tmp / STATE_FILE, (json.dumps(meta, indent=1) + "\n").encode())
    if final.exists():  # re-reaching a step after a fallback: swap the old one out
        trash = root / f".tmp-old-{name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    latest_tmp = root / f".tmp-{LATEST_FILE}"
    _fsync_write(latest_tmp, (name + "\n").encode())
    os.replace(latest_tmp, root / LATEST_FILE)
    _fsync_dir(root)
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The step directories under `root`, oldest first (temp directories are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_temp(root: str | os.PathLike) -> None:
    """Remove `.tmp-*` leftovers of a run killed while writing."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# ------------------------------------------------------------------------------ loading

def load_checkpoint(path: str | os.PathLike, *, load_optimizer: bool = True) -> Checkpoint:
    """Read and validate one checkpoint directory.

    load_optimizer: False for inference: optimizer.pt is neither read nor checked.

    Raises:
        CheckpointError: a file is missing, has another size or sha256 than recorded, or fails
            to parse; the message names the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory")
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(state_file)!r} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(state_file)!r} is corrupt: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {str(state_file)!r} is not a {FORMAT} trainer "
                              f"state")
    files = state.get("files", {})
    if MODEL_FILE not in files:
        raise CheckpointError(f"checkpoint file {str(path / MODEL_FILE)!r} is missing")
    for name, record in files.items():
        if name in (OPTIM_FILE, CARRIED_FILE) and not load_optimizer:
            continue
        # format 1 before checksums recorded the size only
        size, digest = (record, None) if isinstance(record, int) else (record.get("size"), record.get("sha256"))
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {str(f)!r} is truncated or corrupt: "
                                  f"{f.stat().st_size} bytes, {size} were written")
        if digest is not None and _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt: its sha256 differs from the "
                                  f"one recorded when it was written")

    model_file = path / MODEL_FILE
    try:
        with safe_open(str(model_file), framework="pt") as f:
            model_state = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(model_file)!r} is corrupt: {e}") from None
    for alias, kept in aliases.items():
        model_state[alias] = model_state[kept]

    optim_state = None
    if load_optimizer and OPTIM_FILE in files:
        optim_file = path / OPTIM_FILE
        try:
            optim_state = torch.load(optim_file, map_location="cpu", weights_only=True)
        except Exception as e:  # zip / unpickler errors have many types
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"checkpoint file {str(optim_file)!r} is corrupt or holds "
                                  f"more than tensors and plain containers (it is read with "
                                  f"weights_only=True): {type(e).__name__}: {first}") from None
    config = None
    if CONFIG_FILE in files:
        cfg_file = path / CONFIG_FILE
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint file {str(cfg_file)!r} is corrupt: {e}") from None
    carried = None
    if load_optimizer and CARRIED_FILE in files:  # training state, like the optimizer's
        carried_file = path / CARRIED_FILE
        try:
            with safe_open(str(carried_file), framework="pt") as f:
                carried = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {str(carried_file)!r} is corrupt: {e}") from None
    return Checkpoint(path=path, step=int(state["step"]), model_state=model_state,
                      optim_state=optim_state, state=state, config=config, carried=carried)


def load_latest(root: str | os.PathLike, *, load_optimizer: bool = True) -> Checkpoint | None:
    """The newest checkpoint under `root` that loads; None when there is none at all.

    A checkpoint that fails validation is skipped with a warning naming the file, and the one
    before it is tried. Raises CheckpointError when checkpoints exist but none is good.
    """
    candidates = list_checkpoints(root)
    errors = []
    for path in reversed(candidates):
        try:
            return load_checkpoint(path, load_optimizer=load_optimizer)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"skipping bad checkpoint: {e}; trying the previous one", stacklevel=2)
    if candidates:
        raise CheckpointError(f"no usable checkpoint under {str(root)!r}: " + "; ".join(errors))
    return None


def load_run_checkpoint(path: str | os.PathLike, *, load_optimizer: bool = False) -> Checkpoint | None:
    """The checkpoint at `path`: a checkpoint directory itself, or a run directory's newest good
    one (`load_latest` on `path/checkpoints`); None when `path` is neither."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return load_checkpoint(path, load_optimizer=load_optimizer)
    if (path / "checkpoints").is_dir():
        return load_latest(path / "checkpoints", load_optimizer=load_optimizer)
    return None
