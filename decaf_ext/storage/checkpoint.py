"""Checkpoints of a training run: tensors in safetensors, optimizer states via torch.save, the rest in JSON.

Layout: ``<run_dir>/checkpoints/round_<R>/`` with ``tensors.safetensors`` (trainable parameters and the
torch RNG states), ``optimizers.pt`` (one AdamW state dict per agent) and ``state.json`` (round, trainer
state, Python and NumPy RNG states). A checkpoint is written under a temporary name, fsynced and renamed when
complete, so neither a crash nor a full disk leaves a half-written one; older ones are removed afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from decaf_ext.storage.loading import load_saved
from decaf_ext.errors import ConfigError, first_line
from decaf_ext.storage.files import replacing_folder

_PREFIX = "round_"
_RNG_TORCH = "rng/torch"
_RNG_CUDA = "rng/cuda/"


@dataclass
class Checkpoint:
    """Everything needed to continue a run bitwise after round `round` (1-based count of finished rounds).

    tensors: name -> tensor (e.g. each agent's trainable parameters); optimizers: one state dict per agent;
    state: JSON-serializable trainer state; rng: from :func:`capture_rng`.
    """

    round: int
    tensors: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]
    state: dict[str, Any]
    rng: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """Python, NumPy (global) and torch (CPU and every CUDA device) RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"python": [version, list(internal), gauss_next],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(run_dir: str, checkpoint: Checkpoint) -> str:
    """Write `checkpoint` under `run_dir`/checkpoints through :func:`~decaf_ext.storage.files.replacing_folder`
    (complete and fsynced before it is renamed into place; nothing left behind on an error), then drop the older
    ones; returns its folder."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"{_PREFIX}{checkpoint.round:06d}")
    tensors = {name: t.detach().cpu().contiguous() for name, t in checkpoint.tensors.items()}
    tensors[_RNG_TORCH] = checkpoint.rng["torch"]
    tensors.update({f"{_RNG_CUDA}{k}": state for k, state in enumerate(checkpoint.rng["cuda"])})
    state = {"round": checkpoint.round, "state": checkpoint.state,
             "rng": {"python": checkpoint.rng["python"], "numpy": checkpoint.rng["numpy"]}}
    with replacing_folder(final) as temporary:
        save_file(tensors, os.path.join(temporary, "tensors.safetensors"))
        torch.save(checkpoint.optimizers, os.path.join(temporary, "optimizers.pt"))
        with open(os.path.join(temporary, "state.json"), "w", encoding="utf-8") as handle:
            json.dump(state, handle)
    for name in os.listdir(root):  # older checkpoints, and what a killed save left (round_N.tmp-PID, .old-PID)
        if name.startswith(_PREFIX) and name != os.path.basename(final):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def _is_checkpoint(name: str) -> bool:
    """round_<R>, not what a killed save left (round_<R>.tmp-PID, round_<R>.old-PID)."""
    return name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit()


def latest_checkpoint(run_dir: str) -> str | None:
    """Folder of the newest complete checkpoint of `run_dir`, or None."""
    root = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if _is_checkpoint(n)) if os.path.isdir(root) else []
    return os.path.join(root, names[-1]) if names else None


def checkpoint_round(folder: str) -> int:
    """Rounds finished by the checkpoint in `folder` (from its name, without reading it)."""
    return int(os.path.basename(folder)[len(_PREFIX):])


def _read(folder: str, name: str, read: Callable[[str], Any]) -> Any:
    """`read(path)` of the checkpoint's file `name`; ConfigError naming resume and the file if it cannot be read
    (a checkpoint damaged after it was written: missing, truncated, overwritten)."""
    path = os.path.join(folder, name)
    try:
        return read(path)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        raise ConfigError(f"resume: cannot read {path!r} ({first_line(error)})") from None


def load_checkpoint(folder: str) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    tensors = _read(folder, "tensors.safetensors", load_file)
    cuda = [tensors.pop(name) for name in sorted((n for n in tensors if n.startswith(_RNG_CUDA)),
                                                 key=lambda n: int(n[len(_RNG_CUDA):]))]
    torch_rng = tensors.pop(_RNG_TORCH)
    optimizers = _read(folder, "optimizers.pt", lambda path: torch.load(path, weights_only=True))
    saved = load_saved(os.path.join(folder, "state.json"))
    rng = {**saved["rng"], "torch": torch_rng, "cuda": cuda}
    return Checkpoint(round=saved["round"], tensors=tensors, optimizers=optimizers, state=saved["state"], rng=rng)
