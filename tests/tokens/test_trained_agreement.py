"""On a trained model and real images, the engine, the physical and the masked path keep and merge
the same tokens of every image (one importance function; random weights hide near-ties)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prance import MetaViT, Plan
from prance.config import SearchSpace
from prance.data.fashion_mnist import load_fashion_mnist
from prance.engine import DynamicExecutor, MaskedExecutor
from prance.model import preset_config
from tests.conftest import TINY


def _images(fmnist_dir: str, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(split, fmnist_dir)
    x = images[:n].float().div(255).sub(0.286).div(0.353)[:, None]
    return x, labels[:n]


@pytest.fixture(scope="session")
def trained(fmnist_dir: str) -> MetaViT:
    """A TINY fmnist model trained for 300 steps on 6000 real Fashion-MNIST images (a few seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = preset_config("fmnist-tiny", **TINY)
    model = MetaViT(cfg, SearchSpace.default_for(cfg, token_mode="prune_merge", elastic_heads=True))
    x, y = _images(fmnist_dir, "train", 6000)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        i = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def _plans(model: MetaViT, n: int, seed: int) -> Plan:
    g = torch.Generator().manual_seed(seed)
    return Plan.random(model.config, model.space, n, generator=g, keep_range=(model.space.min_keep, 1.0))


def test_model_is_trained(trained, fmnist_dir):
    x, y = _images(fmnist_dir, "test", 1000)
    with torch.inference_mode():
        assert (trained(x).argmax(1) == y).float().mean() > 0.45, "the fixture should be a trained model (chance: 0.1)"


def test_physical_and_masked_paths_keep_the_same_tokens(trained, fmnist_dir, one_thread):
    x, _ = _images(fmnist_dir, "test", 2000)
    agree = total = 0
    for seed in range(3):  # one shared plan per call: the physical path traces a whole batch
        plan = _plans(trained, 1, seed)
        physical, masked = [], []
        with torch.inference_mode():
            trained(x, plan, trace=physical)
            trained(x, plan, mode="masked", trace=masked)
        same = torch.ones(len(x), dtype=torch.bool)
        for p, m in zip(physical, masked):  # which patches each surviving token covers
            covered = torch.stack([m.source[i][m.alive[i]] for i in range(len(x))])
            same &= (p.source == covered).flatten(1).all(1)
        agree, total = agree + int(same.sum()), total + len(x)
    assert agree >= 0.999 * total, f"{total - agree} of {total} images kept or merged other tokens"


def test_engine_and_masked_path_keep_the_same_tokens(trained, fmnist_dir, one_thread):
    """Per-image random plans; after each decided stage the surviving tokens (in order) must match,
    seen through the policy state (each surviving token's mean key), and so must the logits."""
    x, _ = _images(fmnist_dir, "test", 2000)
    plan = _plans(trained, len(x), seed=7)
    seen = {"engine": [], "masked": []}
    logits = {}
    for name, path in (("engine", DynamicExecutor(trained)), ("masked", MaskedExecutor(trained))):
        with torch.no_grad():
            logits[name] = path.run(x, plan, policy=lambda s, name=name: seen[name].append(s) or plan)[0]
    same = torch.ones(len(x), dtype=torch.bool)
    for e, m in zip(seen["engine"], seen["masked"]):
        same &= (e.tokens == m.tokens) & ((e.key_means - m.key_means).abs().amax(1) <= 1e-4)
    same &= (logits["engine"] - logits["masked"]).abs().amax(1) <= 1e-4
    assert int(same.sum()) >= 0.999 * len(x), f"{len(x) - int(same.sum())} of {len(x)} images differ"
