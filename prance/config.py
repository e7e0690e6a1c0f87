"""Architecture and search-space configuration: the one source of truth for shapes and choices.

A :class:`ViTConfig` fixes the largest network (what a dense ViT of that shape computes);
a :class:`SearchSpace` lists the elastic choices the meta-network can execute. Both are
plain dataclasses so they round-trip through checkpoints and YAML unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from prance.errors import PranceError


@dataclass(frozen=True)
class ViTConfig:
    """Shape of the full-size (dense) Vision Transformer."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    stage_depth: int = 3
    """Blocks per stage; a decision is taken before every stage but the first."""
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise PranceError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; "
                "choose sizes that divide evenly"
            )
        if self.embed_dim % self.num_heads:
            raise PranceError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; fix the config"
            )
        if self.depth % self.stage_depth:
            raise PranceError(
                f"depth {self.depth} is not a multiple of stage_depth {self.stage_depth}; fix the config"
            )

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_stages(self) -> int:
        return self.depth // self.stage_depth

    def stage_of(self, block: int) -> int:
        return block // self.stage_depth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        return cls(**_known_fields(cls, d, "model config"))


@dataclass(frozen=True)
class SearchSpace:
    """Discrete choices of the meta-network (DESIGN.md §1, §3).

    Widths are residual (embedding) widths, shared by the blocks of a stage. MLP ratios are
    floats (hidden = round(ratio * width)). Head counts are used only when ``elastic_heads``.
    Keep ratios are continuous in ``[min_keep, 1]``; ``keep_grid`` > 0 snaps them to that step.
    """

    widths: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    heads: tuple[int, ...]
    elastic_heads: bool = False
    min_keep: float = 0.1
    keep_grid: float = 0.0
    token_mode: str = "prune"
    """How keep ratios act: "prune", "merge" or "prune_merge" (two ratios per stage)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(sorted(int(w) for w in self.widths)))
        object.__setattr__(self, "mlp_ratios", tuple(sorted(float(r) for r in self.mlp_ratios)))
        object.__setattr__(self, "heads", tuple(sorted(int(h) for h in self.heads)))
        if not self.widths or not self.mlp_ratios or not self.heads:
            raise PranceError("search space needs at least one width, MLP ratio and head count")
        if self.token_mode not in TOKEN_MODES:
            raise PranceError(
                f"unknown token mode {self.token_mode!r}; use one of {', '.join(TOKEN_MODES)}"
            )
        if not 0.0 < self.min_keep <= 1.0:
            raise PranceError(f"min_keep must be in (0, 1], got {self.min_keep}")

    @property
    def max_width(self) -> int:
        return self.widths[-1]

    @property
    def max_mlp_ratio(self) -> float:
        return self.mlp_ratios[-1]

    @property
    def max_heads(self) -> int:
        return self.heads[-1]

    def check_fits(self, config: ViTConfig) -> None:
        """Raise unless every choice can be sliced out of ``config``'s weights."""
        if self.max_width != config.embed_dim:
            raise PranceError(
                f"largest width {self.max_width} must equal embed_dim {config.embed_dim}; fix the search space"
            )
        if self.max_mlp_ratio != config.mlp_ratio:
            raise PranceError(
                f"largest MLP ratio {self.max_mlp_ratio} must equal the model's {config.mlp_ratio}; "
                "fix the search space"
            )
        if self.max_heads != config.num_heads:
            raise PranceError(
                f"largest head count {self.max_heads} must equal num_heads {config.num_heads}; fix the search space"
            )
        if self.widths[0] < 1 or self.heads[0] < 1 or self.mlp_ratios[0] <= 0:
            raise PranceError("widths, head counts and MLP ratios must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("widths", "mlp_ratios", "heads"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        return cls(**_known_fields(cls, d, "search space"))

    @classmethod
    def default_for(cls, config: ViTConfig, **overrides: Any) -> "SearchSpace":
        """Five widths from 1/2 to full, MLP ratios from half to full, heads fixed."""
        d = config.embed_dim
        widths = sorted({max(config.num_heads, int(round(d * f / 4)) * 4) for f in (0.5, 0.625, 0.75, 0.875)} | {d})
        top = config.mlp_ratio
        ratios = sorted({round(top * f, 4) for f in (0.5, 0.625, 0.75, 0.875, 1.0)})
        heads = sorted({max(1, config.num_heads // 2), config.num_heads})
        kwargs: dict[str, Any] = dict(widths=tuple(widths), mlp_ratios=tuple(ratios), heads=tuple(heads))
        kwargs.update(overrides)
        space = cls(**kwargs)
        space.check_fits(config)
        return space


TOKEN_MODES = ("prune", "merge", "prune_merge")


def _known_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise PranceError(f"unknown {what} keys {unknown}; this checkpoint or file is from another version or model")
    return {k: v for k, v in d.items() if k in names}


def mlp_hidden(width: int, ratio: float) -> int:
    """MLP hidden width of a block: ``round(ratio * width)``, at least 1."""
    return max(1, int(round(ratio * width)))


__all__ = ["ViTConfig", "SearchSpace", "TOKEN_MODES", "mlp_hidden"]
