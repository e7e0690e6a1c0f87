"""Named model shapes, in the manner of timm's ``create_model``.

DeiT presets use the published DeiT shapes (224 px, patch 16). The ``fmnist-*`` presets are
sized for 28×28 grey images (patch 4 → 49 patches + cls) and train in minutes per epoch on
two CPU cores.
"""

from __future__ import annotations

from typing import Any

from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.model.metavit import MetaViT

_DEIT = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, depth=12, mlp_ratio=4.0)
_FMNIST = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=12, mlp_ratio=4.0)

PRESETS: dict[str, dict[str, Any]] = {
    "deit-tiny": dict(_DEIT, embed_dim=192, num_heads=3),
    "deit-small": dict(_DEIT, embed_dim=384, num_heads=6),
    "deit-base": dict(_DEIT, embed_dim=768, num_heads=12),
    "fmnist-micro": dict(_FMNIST, embed_dim=48, num_heads=2),
    "fmnist-tiny": dict(_FMNIST, embed_dim=96, num_heads=3),
    "fmnist-small": dict(_FMNIST, embed_dim=192, num_heads=3),
}

DEFAULT_PRESET = "fmnist-tiny"


def preset_config(name: str, **overrides: Any) -> ViTConfig:
    """The :class:`ViTConfig` of preset ``name`` with any field overridden."""
    if name not in PRESETS:
        raise PranceError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **overrides})


def create_model(name: str = DEFAULT_PRESET, space: SearchSpace | None = None, **overrides: Any) -> MetaViT:
    """A randomly initialised :class:`MetaViT` of preset ``name``."""
    return MetaViT(preset_config(name, **overrides), space)
