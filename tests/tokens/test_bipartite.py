"""ToMe bipartite soft matching: exact merge count, conservation, cls protection, loop reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prance.tokens import TokenState, bipartite_soft_matching, merge_source, merge_state, merge_weighted

FAST = settings(max_examples=40, deadline=None)


def start(b: int, n: int, c: int, seed: int) -> TokenState:
    g = torch.Generator().manual_seed(seed)
    return TokenState.start(torch.randn(b, n + 1, c, generator=g), track_source=True)


def ref_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample, by loops: merged features and sizes in ``[unmerged A, B]`` order (cls protected)."""
    if r == 0:
        return x, size
    a_idx, b_idx = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    m = F.normalize(metric, dim=-1)
    best = {}
    for i in a_idx[1:]:
        sims = [float(m[i] @ m[j]) for j in b_idx]
        t = max(range(len(b_idx)), key=lambda u: (sims[u], -u))
        best[i] = (sims[t], b_idx[t])
    merged = sorted(best, key=lambda i: (-best[i][0], a_idx.index(i)))[:r]
    acc = {j: (x[j] * size[j], size[j]) for j in b_idx}
    for i in merged:
        j = best[i][1]
        acc[j] = (acc[j][0] + x[i] * size[i], acc[j][1] + size[i])
    keep_a = [i for i in a_idx if i not in merged]
    xs = [x[i] for i in keep_a] + [acc[j][0] / acc[j][1] for j in b_idx]
    sizes = [size[i] for i in keep_a] + [acc[j][1] for j in b_idx]
    return torch.stack(xs), torch.stack(sizes)


@FAST
@given(b=st.integers(1, 3), n=st.integers(1, 30), c=st.integers(2, 8), r=st.integers(0, 20),
       seed=st.integers(0, 2**31), steps=st.integers(1, 3))
def test_matching_removes_min_r_cap_tokens_and_conserves_patches(b, n, c, r, seed, steps):
    state = start(b, n, c, seed)
    for step in range(steps):  # repeated merging, so sizes and sources are no longer trivial
        tokens = state.x.shape[1]
        metric = torch.randn(b, tokens, c, generator=torch.Generator().manual_seed(seed + step))
        out = merge_state(bipartite_soft_matching(metric, r), state)
        assert out.x.shape[1] == tokens - min(r, (tokens - 1) // 2)
        assert out.x.shape[1] >= min(tokens, 2)
        assert torch.equal(out.x[:, 0], state.x[:, 0]) and (out.size[:, 0] == 1).all()
        torch.testing.assert_close(out.size[:, 1:].sum(1), torch.full((b,), float(n)))
        assert (out.source[:, 1:].sum(1) == 1).all() and not out.source[:, 0].any()
        torch.testing.assert_close(out.size, out.source.sum(-1).float().clamp_min(1))
        for i in range(b):
            x, size = ref_merge(state.x[i], metric[i], state.size[i], min(r, (tokens - 1) // 2))
            torch.testing.assert_close(out.x[i], x, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out.size[i], size)
        state = out


def test_zero_or_impossible_r_is_the_identity():
    x = torch.randn(2, 2, 4)  # cls + 1 patch: nothing may merge
    assert bipartite_soft_matching(x, 5)(x) is x
    x = torch.randn(2, 9, 4)
    assert bipartite_soft_matching(x, 0)(x) is x


def test_r_is_capped_at_half_the_patch_tokens():
    x = torch.randn(2, 9, 4)
    assert bipartite_soft_matching(x, 100)(x).shape == (2, 5, 4)
    assert bipartite_soft_matching(x, 100, protect_cls=False)(x).shape == (2, 5, 4)
    x = torch.randn(2, 10, 4)
    assert bipartite_soft_matching(x, 100)(x).shape == (2, 6, 4)
    assert bipartite_soft_matching(x, 100, protect_cls=False)(x).shape == (2, 5, 4)


def test_cls_merges_only_when_unprotected():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]]])  # cls identical to token 1
    x = torch.arange(8.0).reshape(1, 4, 2)
    protected = bipartite_soft_matching(metric, 1)(x, mode="sum")
    assert torch.equal(protected[0, 0], x[0, 0])
    free = bipartite_soft_matching(metric, 1, protect_cls=False)(x, mode="sum")
    assert torch.equal(free, torch.stack([x[0, 2], x[0, 1] + x[0, 0], x[0, 3]])[None])


def test_merge_weighted_and_source_helpers():
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.0]]])
    x = torch.tensor([[[0.0], [2.0], [5.0], [4.0], [8.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 2.0, 1.0]])
    fn = bipartite_soft_matching(metric, 1)  # token 4 (A) joins token 1 (B); token 2 has no close partner
    merged, total = merge_weighted(fn, x, size)
    torch.testing.assert_close(total, torch.tensor([[1.0, 3.0, 2.0, 2.0]]))
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([0.0, 5.0, (2.0 * 1 + 8.0 * 1) / 2, 4.0]))
    source = torch.eye(5, dtype=torch.bool)[None]
    assert merge_source(fn, source)[0].int().tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 1],
                                                         [0, 0, 0, 1, 0]]
