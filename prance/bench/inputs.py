"""What a benchmark runs on: the model (a checkpoint, timm weights or a preset) and its input images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from prance.adaptive import SELECTOR_KINDS, AdaptiveViT
from prance.model.metavit import MetaViT


@dataclass(frozen=True)
class Subject:
    """The model to benchmark, a label for it and, when it came from a checkpoint, that checkpoint (loaded once).

    ``adaptive`` is set for a checkpoint with a selector: PRANCE is then that model deciding for
    itself (its meta-network is ``model``).
    """

    model: MetaViT
    label: str
    checkpoint: Mapping[str, Any] | None = None
    path: str | None = None
    adaptive: AdaptiveViT | None = None


@dataclass(frozen=True)
class Images:
    """Pre-loaded input images and where they come from (no tensor: random inputs are made by the benchmark)."""

    tensor: torch.Tensor | None = None
    label: str | None = None
    indices: list[int] | None = None  # positions in their split


def load_model(checkpoint: str | None = None, timm_path: str | None = None, preset: str | None = None,
               stage_depth: int = 3, num_heads: int | None = None) -> Subject:
    """The model to benchmark: a prance checkpoint, a timm .pth or a preset (random weights).

    ``stage_depth`` and ``num_heads`` apply to timm weights only (checkpoints and presets carry
    their own); ``num_heads`` is needed for widths other than the published DeiT/ViT ones.
    """
    if checkpoint is not None:
        from prance.training.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(checkpoint)
        label = f"{checkpoint} ({ckpt['kind']})"
        if ckpt["kind"] in SELECTOR_KINDS:
            adaptive = AdaptiveViT.from_checkpoint(ckpt, checkpoint)
            return Subject(adaptive.model, label, ckpt, checkpoint, adaptive)
        return Subject(model_from_checkpoint(ckpt), label, ckpt, checkpoint)
    if timm_path is not None:
        from prance.model.timm_interop import from_timm

        model = from_timm(timm_path, num_heads=num_heads, stage_depth=stage_depth).eval()
        return Subject(model, f"{timm_path} (timm weights)")
    from prance.model.presets import DEFAULT_PRESET, create_model

    name = preset or DEFAULT_PRESET
    torch.manual_seed(0)
    return Subject(create_model(name).eval(), f"{name} (random weights)")


def load_images(subject: Subject, data: str | None, data_dir: str | None, n: int, seed: int) -> Images:
    """``n`` test images as one tensor (loaded before any timing), or no tensor for random inputs.

    A checkpoint's images are those of the data set it was trained on (``data`` overrides it,
    with the same classes); ``data`` "random", or None without a recorded data set, means random.
    """
    from prance.data.provenance import checkpoint_dataset, trained_on
    from prance.data.splits import final_test_set

    if data == "random":
        return Images()
    if subject.checkpoint is not None:
        if data is None and trained_on(subject.checkpoint).data is None:
            return Images()
        ds = checkpoint_dataset(subject.checkpoint, str(subject.path), data=data, data_dir=data_dir, limit=n,
                                seed=seed)
    elif data is None:
        return Images()
    else:
        cfg = subject.model.config
        ds = final_test_set(data, img_size=cfg.img_size, in_chans=cfg.in_chans, root=data_dir, limit=n, seed=seed)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return Images(images, f"{len(ds)} {ds.info.name} {ds.info.split} images (pre-loaded; seed {seed})",
                  ds.indices.tolist())
