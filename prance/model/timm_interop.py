"""Interoperability with timm's ``VisionTransformer`` / DeiT (state-dict level).

Our state-dict keys are timm's (plus ``stage_maps.*``), so import is a key filter and a shape
inference, and export drops the stage maps. Only the plain DeiT layout is accepted: cls token,
learned position embedding covering the cls token, token pooling, no layer scale, no register
or distillation tokens.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.model.metavit import MetaViT

#: Heads of the published DeiT/ViT widths, used when a bare state dict cannot tell.
_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local ``.pth``/``.pt`` checkpoint; weights may sit under ``model`` or ``state_dict``."""
    if not os.path.isfile(path):
        raise PranceError(f"checkpoint {path} does not exist; give the path of a local .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or truncated files
        raise PranceError(f"cannot read checkpoint {path} ({type(e).__name__}); the file is corrupt or not a "
                          "PyTorch checkpoint — re-download or re-save it") from None
    if isinstance(obj, Mapping) and obj.get("format") == "prance-checkpoint":
        raise PranceError(f"{path} is a prance checkpoint, not a timm/DeiT state dict; continue its run with "
                          "`prance train-dense --resume --out RUN`, or start a meta-network from it with "
                          f"`prance train-meta --init {path}`")
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: Any, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PranceError(f"{what} holds no state dict of tensors; save the model's state_dict()")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def config_from_state_dict(
    sd: Mapping[str, torch.Tensor], num_heads: int | None = None, stage_depth: int = 3
) -> ViTConfig:
    """Infer the ViT shape from a timm-style state dict."""
    unsupported = [k for k in ("dist_token", "reg_token", "norm_pre.weight", "fc_norm.weight", "blocks.0.ls1.gamma")
                   if k in sd]
    if unsupported:
        raise PranceError(f"checkpoint has {unsupported[0]!r}: only plain DeiT/ViT layouts (cls token, no "
                          "distillation/register tokens, no layer scale) are supported")
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise PranceError(f"checkpoint lacks {missing[0]!r}: it is not a timm VisionTransformer/DeiT state dict")
    embed_dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    num_patches = sd["pos_embed"].shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise PranceError("position embedding does not cover a square grid plus cls; unsupported checkpoint")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or _STANDARD_HEADS.get(embed_dim)
    if heads is None:
        raise PranceError(f"cannot tell the head count of width {embed_dim}; pass num_heads=")
    return ViTConfig(
        img_size=side * patch,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=sd["head.weight"].shape[0],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        stage_depth=stage_depth,
    )


def from_timm(
    source: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    space: SearchSpace | None = None,
    num_heads: int | None = None,
    stage_depth: int = 3,
) -> MetaViT:
    """A :class:`MetaViT` holding the weights of a timm ViT/DeiT (module, state dict or local file).

    At full size, with its identity-initialised stage maps, it reproduces the source's logits.
    """
    if isinstance(source, nn.Module):
        if getattr(source, "global_pool", "token") != "token" or getattr(source, "num_prefix_tokens", 1) != 1:
            raise PranceError("only token-pooled ViTs with a single cls token are supported")
        num_heads = num_heads or source.blocks[0].attn.num_heads
        sd = dict(source.state_dict())
    elif isinstance(source, Mapping):
        sd = unwrap_state_dict(source)
    else:
        sd = load_state_dict_file(source)
    config = config_from_state_dict(sd, num_heads, stage_depth)
    model = MetaViT(config, space)
    own = model.state_dict()
    stage_keys = {k for k in own if k.startswith("stage_maps.")}
    wanted = set(own) - stage_keys
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(wanted - set(sd))
    if unexpected or missing:
        raise PranceError(f"checkpoint does not match a ViT of this shape (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); use a plain timm VisionTransformer/DeiT checkpoint")
    for k in wanted:
        if own[k].shape != sd[k].shape:
            raise PranceError(f"checkpoint tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict({**{k: own[k] for k in stage_keys}, **{k: sd[k] for k in wanted}})
    return model


def to_timm_state_dict(model: MetaViT) -> dict[str, torch.Tensor]:
    """The full-size network as a timm ``VisionTransformer`` state dict (stage maps dropped)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("stage_maps.")}


def timm_kwargs(config: ViTConfig) -> dict[str, Any]:
    """Arguments for ``timm.models.vision_transformer.VisionTransformer`` of the same shape."""
    return dict(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
    )
