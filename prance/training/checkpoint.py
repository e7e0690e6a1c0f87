"""Versioned, atomically written checkpoints.

A prance checkpoint is one ``torch.save`` file holding a plain dict::

    format          "prance-checkpoint"
    format_version  1
    prance_version  prance.__version__ of the writer
    kind            what was trained: "dense", later "meta", "selector", ...
    config          ViTConfig.to_dict()      (shape of the full-size network)
    space           SearchSpace.to_dict()    (choices the meta-network can execute)
    model           the MetaViT state dict
    train_state     everything an exact resume needs (optimizer, epoch, step, RNG states, ...)
    metrics         numbers worth keeping next to the weights (e.g. validation top-1)
    args            the run's settings, as plain values
    split           (optional) the data and holdout the model was trained and selected on
                    (``prance.data.splits.TrainingSplits.record``)

Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs pickled code.

Writes are atomic: the file is written under a temporary name in the same directory,
flushed and fsynced, then renamed over the target, and the directory is fsynced. A crash
or an exception at any point leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import prance
from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.files import atomic_write
from prance.model.metavit import MetaViT

FORMAT = "prance-checkpoint"
FORMAT_VERSION = 1
KINDS = ("dense", "meta", "selector", "joint", "adaptive")

_REQUIRED = ("format_version", "kind", "config", "space", "model")


# ----------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` so that ``path`` holds the old or the new file, never a partial one."""
    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise PranceError(
            f"cannot write checkpoint {path} ({e.strerror or e}); free disk space or choose another output folder"
        ) from e


def make_checkpoint(
    model: MetaViT,
    kind: str,
    *,
    train_state: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (see the module docstring for the fields)."""
    if kind not in KINDS:
        raise PranceError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "prance_version": prance.__version__,
        "kind": kind,
        "config": model.config.to_dict(),
        "space": model.space.to_dict(),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "train_state": _plain(dict(train_state or {})),
        "metrics": _plain(dict(metrics or {})),
        "args": _plain(dict(args or {})),
        **({} if split is None else {"split": _plain(dict(split))}),
    }


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MetaViT,
    kind: str,
    *,
    train_state: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    args: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write ``model`` and its training state to ``path``."""
    ckpt = make_checkpoint(model, kind, train_state=train_state, metrics=metrics, args=args, split=split)
    return atomic_save(ckpt, path)


def _plain(value: Any) -> Any:
    """Values ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, lists, dicts."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The global random states of torch, numpy and Python, as checkpoint-safe values."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path: str | os.PathLike[str], kind: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Read and check a prance checkpoint; ``kind`` (one or several) says which kinds are accepted.

    Every problem is a one-line :class:`PranceError` naming the file and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise PranceError(f"checkpoint {path} does not exist; check the path (a run saves last.pt and best.pt)")
    if path.is_dir():
        raise PranceError(f"checkpoint {path} is a folder; give the .pt file inside it, e.g. {path / 'best.pt'}")
    if path.stat().st_size == 0:
        raise PranceError(f"checkpoint {path} is empty (0 bytes); the write was interrupted — use another checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, unsupported types: torch raises many kinds
        raise PranceError(
            f"cannot read checkpoint {path} ({type(e).__name__}): the file is truncated, corrupt or not a "
            "prance checkpoint; use another copy (e.g. last.pt or best.pt of the run)"
        ) from None
    _check_format(obj, path)
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if obj["kind"] not in kinds:
            raise PranceError(
                f"checkpoint {path} holds a {obj['kind']!r} model, expected {' or '.join(map(repr, kinds))}; "
                "give a checkpoint of the right training stage"
            )
    return obj


def _check_format(obj: Any, path: Path) -> None:
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        looks_like_weights = isinstance(obj, Mapping) and (
            all(isinstance(v, torch.Tensor) for v in obj.values())
            or any(k in obj for k in ("model", "state_dict", "model_state"))
        )
        if looks_like_weights:
            raise PranceError(
                f"{path} is a plain state dict, not a prance checkpoint; import timm/DeiT weights with "
                f"prance.from_timm({str(path)!r}) or `prance train-dense --init timm:{path}`"
            )
        raise PranceError(f"{path} is not a prance checkpoint (no 'format: {FORMAT}' field); check the path")
    version = obj.get("format_version")
    if not isinstance(version, int):
        raise PranceError(f"checkpoint {path} has no valid format_version; the file is corrupt — use another copy")
    if version > FORMAT_VERSION:
        raise PranceError(
            f"checkpoint {path} has format version {version} (written by prance {obj.get('prance_version', '?')}), "
            f"this prance {prance.__version__} reads up to version {FORMAT_VERSION}; upgrade prance"
        )
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise PranceError(f"checkpoint {path} lacks {', '.join(missing)}; the file is corrupt — use another copy")
    if not isinstance(obj["model"], Mapping) or not all(isinstance(v, torch.Tensor) for v in obj["model"].values()):
        raise PranceError(f"checkpoint {path} holds no model state dict; the file is corrupt — use another copy")


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> MetaViT:
    """The :class:`MetaViT` a checkpoint describes, with its weights loaded (in eval mode).

    The state dict must match the stored config exactly (same keys, same shapes).
    """
    try:
        config = ViTConfig.from_dict(dict(ckpt["config"]))
        space = SearchSpace.from_dict(dict(ckpt["space"]))
        model = MetaViT(config, space)
    except (TypeError, ValueError, KeyError, PranceError) as e:
        # e.g. a search space that does not fit the model: the fix its own message names is not the user's
        raise PranceError(f"checkpoint config is invalid ({str(e).split(';')[0]}); the file is corrupt or from "
                          "another version — use another copy") from None
    own, sd = model.state_dict(), ckpt["model"]
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise PranceError(
            f"checkpoint weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the file was edited or is corrupt"
        )
    for k, v in own.items():
        if v.shape != sd[k].shape:
            raise PranceError(
                f"checkpoint tensor {k} has shape {tuple(sd[k].shape)} but its config needs {tuple(v.shape)}; "
                "the file was edited or is corrupt"
            )
    model.load_state_dict(sd)
    return model.eval()


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "atomic_save",
    "load_checkpoint",
    "make_checkpoint",
    "model_from_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
