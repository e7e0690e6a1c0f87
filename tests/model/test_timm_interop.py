from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from prance import Plan, PranceError, from_timm, to_timm_state_dict
from prance.model import timm_kwargs

SHAPES = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=10),
    "small": dict(img_size=32, patch_size=8, embed_dim=384, depth=12, num_heads=6, num_classes=10),
}


def _timm(shape: str) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(**SHAPES[shape]).eval()
    # timm's default init leaves biases at 0 and LN at identity; randomise everything so
    # the comparison exercises every tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("shape", ["tiny", "small"])
def test_full_size_reproduces_timm_logits(shape):
    ref = _timm(shape)
    model = from_timm(ref).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        diff = (model(x) - ref(x)).abs().max().item()
        diff_masked = (model(x, Plan.full(model.config), mode="masked") - ref(x)).abs().max().item()
    assert diff <= 1e-4 and diff_masked <= 1e-4


def test_local_pth_with_model_key(tmp_path):
    ref = _timm("tiny")
    path = tmp_path / "deit.pth"
    torch.save({"model": ref.state_dict(), "epoch": 3}, path)
    model = from_timm(path).eval()
    assert model.config.embed_dim == 192 and model.config.num_heads == 3 and model.config.img_size == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert (model(x) - ref(x)).abs().max() <= 1e-4


def test_export_loads_into_timm():
    ref = _timm("tiny")
    model = from_timm(ref).eval()
    clone = VisionTransformer(**timm_kwargs(model.config)).eval()
    clone.load_state_dict(to_timm_state_dict(model), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(clone(x), ref(x), atol=1e-6)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save(_timm("tiny").state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PranceError, match="corrupt"):
        from_timm(path)


def test_foreign_state_dict_is_a_clear_error():
    with pytest.raises(PranceError, match="not a timm VisionTransformer"):
        from_timm({"conv1.weight": torch.zeros(3, 3)})


def test_distilled_deit_is_rejected():
    sd = dict(_timm("tiny").state_dict())
    sd["dist_token"] = torch.zeros(1, 1, 192)
    with pytest.raises(PranceError, match="dist_token"):
        from_timm(sd)


def test_depth_not_a_multiple_of_three_with_its_own_stage_depth():
    torch.manual_seed(0)
    ref = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=3).eval()
    model = from_timm(ref, stage_depth=1).eval()
    assert model.config.depth == 4 and model.config.num_stages == 4
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert (model(x) - ref(x)).abs().max() <= 1e-5
