"""PPO and the factored actor-critic, on problems whose answers are known in advance."""

from __future__ import annotations

import math

import pytest
import torch

from prance.errors import PranceError
from prance.selector.agent import ActorCritic
from prance.selector.ppo import PPOConfig, Rollout, gae, ppo_update

STEPS = 3


def _bandit_reward(x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Known optimum 1 per step: pick argmax(x[:3]) and a value of 0.25 (x[3] < 0) or 0.75 (x[3] >= 0)."""
    best = x[:, :3].argmax(1)
    target = torch.where(x[:, 3] >= 0, 0.75, 0.25)
    return (action[:, 0].long() == best).float() - 4.0 * (action[:, 1] - target) ** 2


def test_ppo_learns_a_contextual_problem_with_a_known_optimum():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    agent = ActorCritic(4 + STEPS, choices=[3, 0], hidden=32)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    cfg = PPOConfig(lr=1e-2, ent_coef=0.01, update_epochs=4, num_minibatches=4)
    b, updates, history = 64, 60, []
    for u in range(updates):
        feats, acts, logps, vals, rews = [], [], [], [], []
        for t in range(STEPS):
            x = torch.randn(b, 4, generator=gen)
            f = torch.cat([x, torch.nn.functional.one_hot(torch.full((b,), t), STEPS).float()], 1)
            with torch.no_grad():
                a, logp, _, v = agent.get_action_and_value(f, generator=gen)
            feats.append(f), acts.append(a), logps.append(logp), vals.append(v), rews.append(_bandit_reward(x, a))
        rollout = Rollout(*(torch.stack(z) for z in (feats, acts, logps, vals, rews)))
        stats = ppo_update(agent, opt, rollout, cfg, progress=u / updates, generator=gen)
        history.append(float(rollout.rewards.mean()))
        assert math.isfinite(stats["losses/approx_kl"]) and 0.0 <= stats["losses/clipfrac"] <= 1.0
    start, end = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert start < 0.4  # a uniform policy: 1/3 correct choices, a spread of values
    assert end > 0.8, (start, end)
    # The deterministic policy is near the optimum too.
    x = torch.randn(512, 4, generator=gen)
    f = torch.cat([x, torch.nn.functional.one_hot(torch.zeros(512, dtype=torch.long), STEPS).float()], 1)
    assert float(_bandit_reward(x, agent.act_deterministic(f)).mean()) > 0.9


def test_every_epoch_takes_num_minibatches_near_equal_steps_whatever_the_batch():
    """150 samples in 4 minibatches are 38 + 38 + 37 + 37, not 37 × 4 and a leftover step on 2 samples."""
    gen = torch.Generator().manual_seed(0)
    agent = ActorCritic(5, choices=[3, 0], hidden=8)
    feats = torch.randn(STEPS, 50, 5, generator=gen)
    with torch.no_grad():
        acts, logps, _, vals = agent.get_action_and_value(feats.flatten(0, 1), generator=gen)
    rollout = Rollout(feats, acts.view(STEPS, 50, -1), logps.view(STEPS, 50), vals.view(STEPS, 50),
                      torch.randn(STEPS, 50, generator=gen))
    sizes: list[int] = []
    act = agent.get_action_and_value
    agent.get_action_and_value = lambda f, a=None, generator=None: (sizes.append(len(f)), act(f, a, generator))[1]
    cfg = PPOConfig(update_epochs=2, num_minibatches=4, target_kl=None)
    ppo_update(agent, torch.optim.Adam(agent.parameters(), lr=1e-3), rollout, cfg, generator=gen)
    assert sizes == [38, 38, 37, 37] * 2


def test_gae_matches_the_textbook_recursion_per_trajectory():
    r = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]])
    v = torch.tensor([[0.2, 0.1], [0.3, -0.4], [0.0, 0.5]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, gamma, lam)
    for i in range(2):  # each column is its own trajectory, ending after the last step
        d = [r[t, i] + gamma * (v[t + 1, i] if t < 2 else 0.0) - v[t, i] for t in range(3)]
        want = [d[0] + gamma * lam * d[1] + (gamma * lam) ** 2 * d[2], d[1] + gamma * lam * d[2], d[2]]
        assert torch.allclose(adv[:, i], torch.stack(want)), i
    assert torch.allclose(ret, adv + v)
    # With gamma = lambda = 1 the return of step t is the sum of the rewards from t on.
    _, ret1 = gae(r, v, 1.0, 1.0)
    assert torch.allclose(ret1, r.flip(0).cumsum(0).flip(0))


def test_actions_stay_in_their_ranges_and_log_probs_sum_the_parts():
    torch.manual_seed(1)
    agent = ActorCritic(5, choices=[4, 1, 0, 0, 3])
    f = torch.randn(64, 5)
    a, logp, ent, _ = agent.get_action_and_value(f)
    assert ((a[:, 0] >= 0) & (a[:, 0] < 4) & (a[:, 0] == a[:, 0].round())).all()
    assert (a[:, 1] == 0).all() and ((a[:, 4] >= 0) & (a[:, 4] < 3)).all()
    assert ((a[:, 2:4] > 0) & (a[:, 2:4] < 1)).all()
    # Independent reference: the parts' densities from the raw actor outputs.
    out = agent.actor(f)
    lp = torch.log_softmax(out[:, 0:4], -1).gather(1, a[:, :1].long())[:, 0]
    lp = lp + torch.log_softmax(out[:, 4:5], -1)[:, 0]
    lp = lp + torch.log_softmax(out[:, 5:8], -1).gather(1, a[:, 4:5].long())[:, 0]
    conc = 1 + torch.nn.functional.softplus(out[:, 8:12]).view(-1, 2, 2)
    for k, j in enumerate((2, 3)):
        al, be = conc[:, 0, k], conc[:, 1, k]
        y = a[:, j]
        lp = lp + (al - 1) * y.log() + (be - 1) * (1 - y).log() - (torch.lgamma(al) + torch.lgamma(be)
                                                                   - torch.lgamma(al + be))
    assert torch.allclose(logp, lp, atol=1e-5)
    assert ent.shape == (64,)
    unit = agent.to_unit(a)
    assert torch.allclose(unit[:, 0], (a[:, 0] + 0.5) / 4) and torch.equal(unit[:, 2:4], a[:, 2:4])


@pytest.mark.parametrize("choices", [[5, 5, 5, 5, 0], [4, 1, 0, 0, 3], [3, 5, 3, 2, 5], [0, 0], [6]])
def test_deterministic_action_is_every_distributions_mode_bit_for_bit(choices):
    """The inference path skips the distribution objects; it must pick what they pick, to the last bit
    (reference: the categoricals' probabilities and the Betas' concentrations from distributions())."""
    torch.manual_seed(2)
    agent = ActorCritic(7, choices=choices)
    for p in agent.actor.parameters():  # sharp, varied outputs: argmaxes and modes across the whole range
        p.data.mul_(40.0)
    f = torch.randn(257, 7)
    cats, beta = agent.distributions(f)
    want = torch.empty(len(f), len(choices))
    for j, cat in zip(agent.discrete, cats):
        want[:, j] = cat.probs.argmax(-1).float()
    if beta is not None:
        a, b = beta.concentration1, beta.concentration0
        want[:, agent.continuous] = ((a - 1) / (a + b - 2).clamp_min(1e-6)).clamp(1e-4, 1 - 1e-4)
    got = agent.act_deterministic(f)
    assert torch.equal(got, want)
    assert len({tuple(r) for r in got[:, agent.discrete].tolist()}) > 1 or not agent.discrete
    unit = agent.to_unit(got)
    for j in range(len(choices)):
        assert torch.equal(unit[:, j], (got[:, j] + 0.5) / choices[j] if choices[j] else got[:, j])


def test_seeded_sampling_is_reproducible():
    agent = ActorCritic(3, choices=[5, 0])
    f = torch.randn(32, 3)
    a1 = agent.get_action_and_value(f, generator=torch.Generator().manual_seed(7))[0]
    a2 = agent.get_action_and_value(f, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a1, a2)


def test_bad_settings_are_refused():
    with pytest.raises(PranceError, match="gamma"):
        PPOConfig(gamma=1.5)
    with pytest.raises(PranceError, match="choices"):
        ActorCritic(3, choices=[-1])
    with pytest.raises(PranceError, match="leading shape"):
        Rollout(torch.zeros(3, 4, 2), torch.zeros(3, 4, 1), torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(3, 4))
