"""A ``prance run``'s settings from defaults, a named schedule, a YAML file and flags, checked up front.

Where a value comes from, lowest first: the stage dataclasses' defaults (:mod:`prance.pipeline.config`),
a named schedule (:mod:`prance.pipeline.schedules`), a YAML file (``--config``, the layout of
``RUN/config.yaml``), then command-line flags. :func:`resolve_config` applies them in that order,
fills what follows from other settings (absolute paths, the static-plan fine-tune copies the
joint fine-tune's schedule, ``limit`` caps every stage's image counts, a folder's images set the
input of a model trained from scratch) and checks everything before anything runs, so a bad value
for the last stage fails in the first second, not after hours of training.
"""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping

from prance.errors import PranceError
from prance.files import load_yaml
from prance.pipeline.config import DATASETS, RUN_FIELDS, STAGES, RunConfig

#: Largest image side a folder's images are resized to when the model is trained from scratch (no --init).
FOLDER_MAX_SIZE = 32

def resolve_config(config_file: str | os.PathLike[str] | None = None, flags: Mapping[str, Any] | None = None,
                   settings: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults ← schedule ← YAML ``config_file`` ← ``settings`` (``--set``: dotted names, None unsets) ←
    ``flags`` (``budget``, ``dense.epochs`` or ``dense: {...}``; None: not given).

    The schedule is ``flags["schedule"]``, else the file's, else "full".
    """
    from prance.pipeline.schedules import SCHEDULES

    flags = dict(flags or {})
    values = read_yaml(config_file) if config_file is not None else {}
    source = f"config {config_file}" if config_file is not None else "settings"
    schedule = flags.get("schedule") or values.get("schedule") or "full"
    if schedule not in SCHEDULES:
        raise PranceError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    cfg = merge(RunConfig(schedule=schedule), SCHEDULES[schedule], "schedule " + schedule)
    cfg = merge(cfg, values, source)
    cfg = merge(cfg, _nested(settings or {}, keep_none=True), "--set")
    cfg = merge(cfg, _nested(flags), "flags")
    if cfg.data not in DATASETS:  # a folder's path as data (--set data=PATH, or a file's data: PATH)
        cfg = replace(cfg, **data_settings(cfg.data, cfg.data_dir))
    return check(_filled(cfg))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise PranceError(f"--config {path}: file not found; give a YAML file (e.g. a run's config.yaml)")
    values = load_yaml(path, "config")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PranceError(f"config {path} must be a mapping of settings (data: ..., dense: {{epochs: ...}}), not a "
                          f"{type(values).__name__}")
    return values


def merge(cfg: RunConfig, values: Mapping[str, Any], source: str) -> RunConfig:
    """``cfg`` with ``values`` (nested like config.yaml) applied, every key and type checked."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key in STAGES:
            if not isinstance(value, Mapping):
                raise PranceError(f"{source}: {key} must be a mapping of its settings, e.g. {key}: {{...}}")
            changes[key] = _merge_stage(getattr(cfg, key), key, value, source)
        elif key in RUN_FIELDS:
            changes[key] = _typed(value, _hints(RunConfig)[key], key, source)
        else:
            raise PranceError(f"{source}: unknown setting {key!r}; settings are {', '.join(RUN_FIELDS)} and one "
                              f"mapping per stage ({', '.join(STAGES)})")
    return replace(cfg, **changes)


def _merge_stage(stage: Any, name: str, values: Mapping[str, Any], source: str) -> Any:
    hints = _hints(type(stage))
    for key in values:
        if key not in hints:
            raise PranceError(f"{source}: unknown setting {name}.{key}; {name} takes {', '.join(hints)}")
    return replace(stage, **{k: _typed(v, hints[k], f"{name}.{k}", source) for k, v in values.items()})


def _nested(given: Mapping[str, Any], keep_none: bool = False) -> dict[str, Any]:
    """Settings given as ``{"dense.epochs": 3, "meta": {"max_steps": 10}, "budget": 0.4}`` nested like config.yaml
    (None values dropped, as not given, unless ``keep_none``)."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if value is None and not keep_none:
            continue
        stage, dot, name = key.partition(".")
        if dot:
            out.setdefault(stage, {})[name] = value
        elif key in STAGES and isinstance(value, Mapping):
            out.setdefault(key, {}).update({k: v for k, v in value.items() if v is not None})
        else:
            out[key] = value
    return out


def data_settings(data: str | None, data_dir: str | None = None) -> dict[str, Any]:
    """``fashion-mnist``, ``folder`` (with ``data_dir``) or a folder's path as the settings data and data_dir."""
    if data is None or data == "fashion-mnist":
        return {"data": data, "data_dir": data_dir}
    if data == "folder":
        if data_dir is None:
            raise PranceError("data folder needs its root: --data-dir ROOT, or give the folder itself: --data ROOT")
        return {"data": "folder", "data_dir": data_dir}
    if not Path(data).is_dir():
        raise PranceError(f"data {data}: use fashion-mnist or the path of an ImageNet-layout folder (with "
                          "train/<class>/ and val/<class>/); no such folder")
    if data_dir is not None:
        raise PranceError(f"data {data} already names the folder; drop data_dir {data_dir}")
    return {"data": "folder", "data_dir": str(data)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _typed(value: Any, hint: Any, name: str, source: str) -> Any:
    """``value`` if it has type ``hint`` (ints are floats too), else a one-line error."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list and isinstance(value, list):
        return [_typed(v, typing.get_args(hint)[0], name, source) for v in value]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    kind = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}.get(
        hint, "a list" if origin is list else "a mapping")
    raise PranceError(f"{source}: {name} must be {kind}, got {value!r}")


def _filled(cfg: RunConfig) -> RunConfig:
    """What follows from other settings: absolute paths, the static-plan fine-tune's unset values, ``limit`` caps,
    a folder's input."""
    if cfg.init is not None:  # the same file whichever folder the run is continued from
        prefix = "timm:" if cfg.init.startswith("timm:") else ""
        cfg = replace(cfg, init=prefix + os.path.abspath(os.path.expanduser(cfg.init.removeprefix("timm:"))))
    if cfg.data_dir is not None:
        cfg = replace(cfg, data_dir=os.path.abspath(os.path.expanduser(cfg.data_dir)))
    joint = asdict(cfg.finetune)
    static = replace(cfg.static_finetune, **{k: joint[k] for k, v in asdict(cfg.static_finetune).items()
                                             if v is None and k in joint})
    cfg = replace(cfg, static_finetune=static)
    if cfg.limit is not None:
        capped = {}
        for stage in STAGES:
            values = asdict(getattr(cfg, stage))
            caps = {k: cfg.limit if v is None else min(v, cfg.limit) for k, v in values.items()
                    if k in ("limit", "val_limit", "holdout_limit", "test_limit")}
            capped[stage] = replace(getattr(cfg, stage), **caps)
        cfg = replace(cfg, **capped)
    if cfg.data == "folder" and cfg.init is None and cfg.data_dir is not None and cfg.dense.img_size is None:
        from prance.data.folder import image_shape

        size, chans = image_shape(cfg.data_dir)
        patch = int(cfg.dense.model_overrides.get("patch_size", 4))
        img_size = max(patch, min(size, FOLDER_MAX_SIZE) // patch * patch)
        overrides = {"in_chans": chans, **cfg.dense.model_overrides}
        cfg = replace(cfg, dense=replace(cfg.dense, img_size=img_size, model_overrides=overrides))
    return cfg


def check(cfg: RunConfig) -> RunConfig:
    """Every value checked now, by the stages' own settings classes where they exist (one-line errors)."""
    from prance.config import TOKEN_MODES
    from prance.selector.budget import check_budget
    from prance.selector.features import ENCODERS

    if cfg.data not in DATASETS:
        raise PranceError(f"unknown data {cfg.data!r}; use fashion-mnist or the path of an ImageNet-layout folder")
    if cfg.data == "folder" and cfg.data_dir is None:
        raise PranceError("data folder needs its root (data_dir: a folder with train/<class>/ and val/<class>/)")
    if cfg.mode not in TOKEN_MODES:
        raise PranceError(f"unknown mode {cfg.mode!r}; use one of {', '.join(TOKEN_MODES)}")
    check_budget(cfg.budget)
    if cfg.selector.encoder not in ENCODERS:
        raise PranceError(f"unknown selector.encoder {cfg.selector.encoder!r}; use one of {', '.join(ENCODERS)}")
    if cfg.init is not None:
        if not Path(cfg.init.removeprefix("timm:")).is_file():
            raise PranceError(f"init {cfg.init}: file not found; give a local timm/DeiT .pth or a dense checkpoint")
        if cfg.dense.img_size is not None or cfg.dense.model_overrides:
            raise PranceError("init sets the model's shape from its file; drop dense.img_size and "
                              "dense.model_overrides")
    for name, value in _counts(cfg):
        if value is not None and value < 1:
            raise PranceError(f"{name} must be at least 1, got {value}")
    for name, value in (("threads", cfg.threads), ("bench.threads", cfg.bench.threads)):
        if value is not None and value < 1:
            raise PranceError(f"{name} must be at least 1, got {value}")
    if cfg.round_up.k < 0:
        raise PranceError(f"round_up.k must be 0 (off) or a number of representatives per stage, got {cfg.round_up.k}")
    if not cfg.bench.batch_sizes:
        raise PranceError("bench.batch_sizes must name at least one batch size, e.g. [1, 64]")
    if not 0 < cfg.meta.min_keep <= 1 or not 0 <= cfg.meta.keep_grid <= 1:
        raise PranceError(f"meta.min_keep {cfg.meta.min_keep} must be in (0, 1] and meta.keep_grid "
                          f"{cfg.meta.keep_grid} in [0, 1]")
    from prance.pipeline.stages import training_configs  # the training commands' own checks

    training_configs(cfg)
    return cfg


def _counts(cfg: RunConfig) -> list[tuple[str, int | None]]:
    """Every whole-number setting that counts something (images, epochs, steps, subnets, runs)."""
    names = ("epochs", "batch_size", "limit", "val_limit", "holdout_limit", "test_limit", "max_steps", "updates",
             "count", "hidden", "static_candidates", "runs", "rounds", "pool")
    out: list[tuple[str, int | None]] = [("limit", cfg.limit)]
    for stage in STAGES:
        values = asdict(getattr(cfg, stage))
        out += [(f"{stage}.{k}", v) for k, v in values.items() if k in names]
    out += [("bench.batch_sizes", b) for b in cfg.bench.batch_sizes]
    return out




__all__ = ["FOLDER_MAX_SIZE", "check", "data_settings", "merge", "read_yaml", "resolve_config"]
