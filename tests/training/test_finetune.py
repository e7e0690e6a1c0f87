"""``prance finetune``: the meta-network trained under the selector's per-image decisions, and the
static-plan baseline, on real Fashion-MNIST images with a micro model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prance import create_model
from prance.accounting import count_macs
from prance.adaptive import AdaptiveViT
from prance.cli import main
from prance.config import SearchSpace
from prance.data import build_dataset
from prance.data.splits import Holdout, holdout_set
from prance.errors import PranceError
from prance.evaluation.sweep import candidate_subnets
from prance.model.metavit import MetaViT
from prance.plan import Plan
from prance.selector.budget import DualAscent
from prance.selector.selector import Selector, SelectorConfig
from prance.training.checkpoint import atomic_save, load_checkpoint, make_checkpoint, save_checkpoint
from prance.training.finetune import (FinetuneConfig, JointTask, Pipeline, StaticTask, Student, choose_static_plan,
                                     pipeline_of, run_finetune, selector_training_for)
from prance.training.selector import SelectorTrainConfig
from prance.training.run import DistContext
from tests.conftest import cli_error

pytestmark = pytest.mark.usefixtures("one_thread")

#: 3 stages of 2 blocks: decisions before stages 1 and 2.
MICRO = dict(embed_dim=32, depth=6, num_heads=2, stage_depth=2)
SPLIT = {"data": "fashion-mnist", "holdout": {"fraction": 0.1, "seed": 0}}
BUDGET = 0.6


def _meta() -> MetaViT:
    torch.manual_seed(0)
    model = create_model("fmnist-micro", **MICRO)
    model.space = SearchSpace(widths=(16, 24, 32), mlp_ratios=(2.0, 4.0), heads=(2,), token_mode="merge",
                              min_keep=0.25)
    return model


def _selector(model: MetaViT) -> Selector:
    torch.manual_seed(1)
    return Selector(model.config, model.space, SelectorConfig(hidden=16, budget=BUDGET))


@pytest.fixture
def pipeline(tmp_path: Path) -> dict[str, Path]:
    """A dense teacher and an adaptive model (meta-network + selector) of one pipeline, as files."""
    torch.manual_seed(2)
    save_checkpoint(tmp_path / "dense.pt", create_model("fmnist-micro", **MICRO), "dense", split=SPLIT)
    model = _meta()
    AdaptiveViT(model, _selector(model), BUDGET, split=SPLIT).save(tmp_path / "adaptive.pt")
    return {"dense": tmp_path / "dense.pt", "adaptive": tmp_path / "adaptive.pt"}


def _cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=2, batch_size=16, limit=48, holdout_limit=32, warmup_steps=1, log_every=1)
    return FinetuneConfig(**{**base, **kw})


def _images(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    data = build_dataset("fashion-mnist", "train", img_size=28, in_chans=1, train_augment=False, limit=n)
    pairs = [data[i] for i in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _teacher() -> MetaViT:
    torch.manual_seed(3)
    return create_model("fmnist-micro", **MICRO)


# ----------------------------------------------------------------------------- one step
@pytest.mark.parametrize("static", [False, True], ids=["joint", "static-plan"])
def test_the_loss_decreases_on_a_fixed_batch(static: bool, fmnist_dir: str) -> None:
    model = _meta()
    images, labels = _images()
    cfg = _cfg()
    ctx = DistContext()
    if static:
        plan = Plan.uniform(model.config, [32, 24, 16], [4.0] * 2 + [2.0] * 4, merge_keep=0.5)
        task = StaticTask(model, _teacher(), plan, [], cfg, ctx)
    else:
        task = JointTask(model, _teacher(), _selector(model), BUDGET, [], cfg, ctx)
    net = task.network()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        loss, logs = task.step(net, images, labels, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        assert {"loss_ce", "loss_kd", "top1"} <= set(logs)
    assert losses[-1] < 0.85 * losses[0] and max(losses[-3:]) < min(losses[:3]), losses


def _assert_gradients_follow(model: MetaViT, widths: list[int], ratios: list[float], exact_zero: bool = True) -> None:
    """Every weight channel the plan leaves inactive has exactly zero gradient; active ones mostly not.

    ``widths`` is the residual width of each stage, ``ratios`` the MLP ratio of each block,
    read from the plan; the MLP's hidden width is round(ratio · width) (DESIGN.md §1).
    """
    cfg = model.config
    for b, blk in enumerate(model.blocks):
        w = widths[b // cfg.stage_depth]
        hidden = round(ratios[b] * w)
        inactive = [blk.norm1.weight.grad[w:], blk.norm2.weight.grad[w:], blk.attn.qkv.weight.grad[:, w:],
                    blk.attn.proj.weight.grad[w:], blk.attn.proj.bias.grad[w:], blk.mlp.fc1.weight.grad[hidden:],
                    blk.mlp.fc1.weight.grad[:, w:], blk.mlp.fc1.bias.grad[hidden:], blk.mlp.fc2.weight.grad[w:],
                    blk.mlp.fc2.weight.grad[:, hidden:], blk.mlp.fc2.bias.grad[w:]]
        for g in inactive:
            assert torch.count_nonzero(g) == 0, f"block {b}: an inactive channel got a gradient"
        for g in (blk.mlp.fc1.weight.grad[:hidden, :w], blk.attn.qkv.weight.grad[:, :w]):
            assert (g != 0).float().mean() > 0.9, f"block {b}: active weights got no gradient"
    assert torch.count_nonzero(model.head.weight.grad[:, widths[-1]:]) == 0
    assert (model.head.weight.grad[:, : widths[-1]] != 0).float().mean() > 0.9


def test_the_gradient_reaches_exactly_the_weights_the_selectors_plan_activates(fmnist_dir: str) -> None:
    model = _meta()
    selector = _selector(model)
    selector.knob.fill_(-1.0)  # every raw action at its low end: the smallest choices
    images, labels = _images(4)
    task = JointTask(model, _teacher(), selector, BUDGET, [], _cfg(), DistContext())
    loss, _ = task.step(task.network(), images, labels, 0)
    loss.backward()
    executed = task.network()(images, policy=selector, budget=torch.full((4,), BUDGET, dtype=torch.float64))[1]
    assert executed.widths.unique().tolist() == [16, 32]  # stage 0 full size, then the smallest width
    assert set(executed.mlp_ratios[:, 2:].unique().tolist()) == {2.0}
    _assert_gradients_follow(model, [32, 16, 16], [4.0, 4.0] + [2.0] * 4)


def test_each_images_gradient_follows_its_own_plan_in_a_mixed_batch(fmnist_dir: str) -> None:
    model = _meta()
    images, _ = _images(3)
    plans = Plan.cat([Plan.uniform(model.config, [32, 24, 16], [4.0, 4.0, 2.0, 4.0, 2.0, 2.0], merge_keep=0.5),
                      Plan.full(model.config),
                      Plan.uniform(model.config, [32, 16, 24], [4.0] * 6)])
    logits, executed = Student(model)(images, policy=lambda state: plans)  # each image its own plan
    assert torch.equal(executed.widths, plans.widths)
    logits[0].sum().backward()  # image 0 alone
    _assert_gradients_follow(model, [32, 24, 16], [4.0, 4.0, 2.0, 4.0, 2.0, 2.0])


def test_a_static_step_runs_under_its_plan_only(fmnist_dir: str) -> None:
    model = _meta()
    plan = Plan.uniform(model.config, [32, 24, 16], [4.0, 4.0, 2.0, 2.0, 4.0, 2.0])
    task = StaticTask(model, _teacher(), plan, [], _cfg(), DistContext())
    images, labels = _images(4)
    task.step(task.network(), images, labels, 0)[0].backward()
    _assert_gradients_follow(model, [32, 24, 16], [4.0, 4.0, 2.0, 2.0, 4.0, 2.0])


# ----------------------------------------------------------------------------- whole runs
@pytest.mark.slow
def test_finetuning_trains_on_training_images_only_and_never_reads_the_test_split(
    pipeline: dict[str, Path], reads: list, tmp_path: Path, fmnist_dir: str
) -> None:
    assert main([str(a) for a in ["finetune", "--adaptive", pipeline["adaptive"], "--teacher", pipeline["dense"],
                                  "--epochs", "2", "--batch-size", "16", "--limit", "48", "--holdout-limit", "32",
                                  "--warmup-steps", "1", "--alternate", "2", "--threads", "1",
                                  "--out", tmp_path / "joint"]]) == 0
    run_finetune(pipeline["adaptive"], _cfg(static_plan="auto", static_candidates=3), tmp_path / "static",
                 teacher=str(pipeline["dense"]), verbose=False)
    held_out = set(torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:6_000].tolist())
    assert {split for split, _, _ in reads} == {"train"}  # not one test image
    trained = set().union(*(rows for _, augmented, rows in reads if augmented))
    chosen_on = set().union(*(rows for _, augmented, rows in reads if not augmented))
    assert len(trained) == 48 and not trained & held_out
    assert chosen_on and chosen_on <= held_out
    ppo = [json.loads(line) for line in (tmp_path / "joint" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo if r["event"] == "ppo"] == [2, 4]  # one PPO update every 2 steps


def test_without_augmentation_finetuning_reads_plain_training_images_and_resume_keeps_the_choice(
    pipeline: dict[str, Path], reads: list, tmp_path: Path, fmnist_dir: str
) -> None:
    common = dict(teacher=str(pipeline["dense"]), verbose=False)
    run_finetune(pipeline["adaptive"], _cfg(epochs=1, augment=False), tmp_path / "plain", **common)
    held_out = set(torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:6_000].tolist())
    assert reads and not any(augmented for _, augmented, _ in reads)
    assert len(set().union(*(rows for _, _, rows in reads)) - held_out) == 48  # every training image, plain
    with pytest.raises(PranceError, match="augment=True, but the run used False"):
        run_finetune(pipeline["adaptive"], _cfg(epochs=1), tmp_path / "plain", resume=True, **common)


def test_the_auto_static_plan_needs_the_same_compute_within_the_slack(fmnist_dir: str) -> None:
    model = _meta()
    held = holdout_set("fashion-mnist", img_size=28, in_chans=1, holdout=Holdout(), limit=16)
    dense = count_macs(model.config, Plan.full(model.config))
    macs = {name: count_macs(model.config, plan) for name, plan in candidate_subnets(model.config, model.space)}
    target = 0.6 * dense
    fitting = sorted((m for m in macs.values() if m <= target), reverse=True)
    assert len(fitting) > 4 and fitting[3] < target - 0.01 * dense  # a wide band would compare cheaper subnets
    for slack in (0.01, 0.05, 1.0):
        name, plan, rows = choose_static_plan(model, held, target, 4, slack=slack, progress=False)
        band = [m for m in fitting if m >= target - slack * dense] or fitting[:1]
        assert sorted((macs[r["name"]] for r in rows), reverse=True) == band[:4]
        assert count_macs(model.config, plan) == macs[name] and name in {r["name"] for r in rows}
    with pytest.raises(PranceError, match="static-slack"):
        FinetuneConfig(static_slack=1.5)


@pytest.mark.slow
def test_an_interrupted_joint_run_resumes_to_the_same_weights_and_selector(pipeline: dict[str, Path],
                                                                           tmp_path: Path, fmnist_dir: str) -> None:
    common = dict(teacher=str(pipeline["dense"]), verbose=False)
    cfg = _cfg(alternate=2)
    run_finetune(pipeline["adaptive"], cfg, tmp_path / "whole", **common)
    paused = run_finetune(pipeline["adaptive"], cfg, tmp_path / "parts", stop_after=4, **common)
    assert not paused["complete"] and paused["step"] == 4  # mid-epoch 2, after the second PPO update
    run_finetune(pipeline["adaptive"], cfg, tmp_path / "parts", resume=True, **common)
    for name in ("last.pt", "adaptive.pt"):
        a, b = (load_checkpoint(tmp_path / run / name) for run in ("whole", "parts"))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        sa, sb = a["selector"]["state"], b["selector"]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    start = load_checkpoint(pipeline["adaptive"])["selector"]["state"]
    assert any(not torch.equal(start[k], sa[k]) for k in sa if k.startswith("agent"))  # PPO moved it
    with pytest.raises(PranceError, match="resuming"):
        run_finetune(pipeline["adaptive"], _cfg(alternate=3), tmp_path / "parts", resume=True, **common)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_alternating_run_resumes_on_a_gpu(pipeline: dict[str, Path], tmp_path: Path, fmnist_dir: str) -> None:
    """The resumed selector is on the GPU before its PPO optimiser's state is loaded onto it."""
    common = dict(teacher=str(pipeline["dense"]), verbose=False, device="cuda")
    paused = run_finetune(pipeline["adaptive"], _cfg(alternate=2), tmp_path / "gpu", stop_after=4, **common)
    assert not paused["complete"]
    assert run_finetune(pipeline["adaptive"], _cfg(alternate=2), tmp_path / "gpu", resume=True, **common)["complete"]


@pytest.mark.slow
def test_the_written_adaptive_model_is_the_best_epoch_calibrated_onto_the_budget(
    pipeline: dict[str, Path], tmp_path: Path, fmnist_dir: str
) -> None:
    summary = run_finetune(pipeline["adaptive"], _cfg(), tmp_path / "joint", teacher=str(pipeline["dense"]),
                           verbose=False)
    adaptive = AdaptiveViT.load(tmp_path / "joint" / "adaptive.pt")
    best = load_checkpoint(tmp_path / "joint" / "best.pt", kind="joint")
    assert load_checkpoint(tmp_path / "joint" / "adaptive.pt")["kind"] == "adaptive"
    # The saved model: best.pt's weights and selector (its knob included).
    own = adaptive.model.state_dict()
    assert all(torch.equal(own[k], best["model"][k]) for k in own)
    sel = adaptive.selector.state_dict()
    assert all(torch.equal(sel[k], best["selector"]["state"][k]) for k in sel)
    assert adaptive.budget == BUDGET
    # Its outputs: the physical engine's logits equal the saved weights run masked under the same plans,
    # and on the held-out images it reproduces the top-1 and mean MACs its calibration recorded.
    held = holdout_set("fashion-mnist", img_size=28, in_chans=1, holdout=Holdout(), limit=32)
    x = torch.stack([held[i][0] for i in range(len(held))])
    y = torch.stack([held[i][1] for i in range(len(held))])
    logits = adaptive(x)
    reference = create_model("fmnist-micro", **MICRO)
    reference.space = adaptive.model.space
    reference.load_state_dict(best["model"])
    torch.testing.assert_close(logits, reference(x, adaptive.last.plan, mode="masked"), atol=1e-4, rtol=1e-4)
    cal = adaptive.calibration
    assert 100.0 * float((logits.argmax(-1) == y).float().mean()) == pytest.approx(cal["holdout_top1"])
    assert float(adaptive.last.macs_ratio.mean()) == pytest.approx(cal["holdout_macs_ratio"], abs=1e-9)
    assert abs(cal["holdout_macs_ratio"] - BUDGET) <= 0.02 * BUDGET  # the knob put the mean on the budget
    assert cal["holdout_top1"] == summary["best_score"]


def test_a_static_plan_run_trains_exactly_under_the_given_plan(pipeline: dict[str, Path], tmp_path: Path,
                                                               fmnist_dir: str, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    given = {"widths": [32, 24, 16], "mlp_ratios": [4.0, 4.0, 2.0, 4.0, 2.0, 2.0], "merge_keep": [0.5, 0.75]}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(given))
    trained_with: list[Plan | None] = []
    real = MetaViT.forward

    def spy(self, x, plan=None, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step (the teacher runs under no_grad, validation in inference)
            trained_with.append(plan)
        return real(self, x, plan, *args, **kwargs)

    monkeypatch.setattr(MetaViT, "forward", spy)
    run_finetune(pipeline["adaptive"], _cfg(static_plan=str(tmp_path / "plan.yaml")), tmp_path / "static",
                 teacher=str(pipeline["dense"]), verbose=False)
    assert len(trained_with) == 6  # 2 epochs of 3 steps
    for plan in trained_with:
        assert plan.batch_size == 1 and plan.widths[0].tolist() == given["widths"]
        assert plan.mlp_ratios[0].tolist() == given["mlp_ratios"]
        assert plan.merge_keep[0, 1:].tolist() == given["merge_keep"] and plan.keep.eq(1).all()
    written = yaml.safe_load((tmp_path / "static" / "plan.yaml").read_text())
    assert written["widths"] == given["widths"] and written["merge_keep"][1:] == given["merge_keep"]
    best = load_checkpoint(tmp_path / "static" / "best.pt", kind="meta")
    assert best["args"]["static_plan"]["plan"]["mlp_ratios"] == given["mlp_ratios"]


def test_auto_picks_the_best_holdout_subnet_within_the_adaptive_models_macs(pipeline: dict[str, Path],
                                                                           tmp_path: Path, fmnist_dir: str) -> None:
    # Any fitting subnet may compete here (slack 1); the band below the target is tested above.
    run_finetune(pipeline["adaptive"], _cfg(static_plan="auto", static_candidates=4, static_slack=1.0, max_steps=1),
                 tmp_path / "static", teacher=str(pipeline["dense"]), verbose=False)
    choice = json.loads((tmp_path / "static" / "static_choice.json").read_text())
    # The adaptive model's mean MACs on the same 32 held-out images, measured here.
    adaptive = AdaptiveViT.load(pipeline["adaptive"])
    held = holdout_set("fashion-mnist", img_size=28, in_chans=1, holdout=Holdout(), limit=32)
    adaptive(torch.stack([held[i][0] for i in range(len(held))]))
    assert choice["adaptive_macs"] == pytest.approx(float(adaptive.last.macs.double().mean()))
    rows = choice["rows"]
    assert len(rows) == 4 and all(r["gmacs"] * 1e9 <= choice["adaptive_macs"] * (1 + 1e-9) for r in rows)
    best = max(r["holdout_top1"] for r in rows)
    assert choice["chosen"] in [r["name"] for r in rows if r["holdout_top1"] == best]
    written = yaml.safe_load((tmp_path / "static" / "plan.yaml").read_text())
    assert written["name"] == choice["chosen"]


def _selector_run(pipeline: dict[str, Path], tmp_path: Path, adaptive_records_args: bool
                  ) -> tuple[Path, dict, dict]:
    """A train-selector run folder: adaptive.pt (naming its meta-network or not) and last.pt with λ = 1.5, the
    meta-network's run naming the pipeline's dense model."""
    run = tmp_path / "selector-run"
    run.mkdir()
    meta = tmp_path / "meta.pt"
    save_checkpoint(meta, _meta(), "meta", args={"run": {"init": str(pipeline["dense"]), "teacher": "init"}},
                    split=SPLIT)
    args = {"meta": str(meta), "train": {"budget": BUDGET}}
    ckpt = load_checkpoint(pipeline["adaptive"])
    if adaptive_records_args:
        ckpt["args"] = args
    atomic_save(ckpt, run / "adaptive.pt")
    last = make_checkpoint(_meta(), "selector", args=args,
                           train_state={"dual": DualAscent([BUDGET], init=1.5).state_dict()}, split=SPLIT)
    last.update(selector=ckpt["selector"], budget=BUDGET)
    atomic_save(last, run / "last.pt")
    return run, ckpt, last


def test_the_teacher_defaults_to_the_dense_model_its_pipeline_records(pipeline: dict[str, Path], tmp_path: Path,
                                                                      fmnist_dir: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """train-selector's adaptive.pt records no teacher; its run's last.pt names the meta-network, whose run
    names the dense model it learned from."""
    run, _, _ = _selector_run(pipeline, tmp_path, adaptive_records_args=False)
    monkeypatch.chdir(tmp_path)  # paths given relative to the working folder are recorded absolutely
    run_finetune(Path("selector-run/adaptive.pt"), _cfg(max_steps=1, epochs=1), "out", verbose=False)
    start = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[0])
    assert start["teacher"] == str(pipeline["dense"])
    args = load_checkpoint(tmp_path / "out" / "last.pt")["args"]
    assert args["adaptive"] == str(run / "adaptive.pt") and args["teacher"] == str(pipeline["dense"])
    # Without that record the teacher must be given.
    (run / "last.pt").unlink()
    with pytest.raises(PranceError, match="records no dense teacher; give one with --teacher"):
        run_finetune(run / "adaptive.pt", _cfg(), tmp_path / "out2", verbose=False)
    assert not (tmp_path / "out2").exists()


def test_the_selector_runs_lambda_comes_from_its_last_pt_when_adaptive_pt_records_only_its_args(
        pipeline: dict[str, Path], tmp_path: Path) -> None:
    """train-selector's adaptive.pt names its meta-network (args) but holds no training state: λ for alternating
    fine-tuning is the run's last.pt's, and only when that file holds the same selector."""
    run, ckpt, last = _selector_run(pipeline, tmp_path, adaptive_records_args=True)
    found = pipeline_of(load_checkpoint(run / "adaptive.pt"), run / "adaptive.pt")
    assert found.teacher == str(pipeline["dense"]) and found.selector_settings == {"budget": BUDGET}
    assert found.dual is not None and float(found.dual["lam"][0]) == 1.5
    # A last.pt of other selector weights: the settings still come from adaptive.pt, λ starts afresh.
    last["selector"] = {**ckpt["selector"], "state": {k: v + 1 if v.is_floating_point() else v
                                                  for k, v in ckpt["selector"]["state"].items()}}
    atomic_save(last, run / "last.pt")
    found = pipeline_of(load_checkpoint(run / "adaptive.pt"), run / "adaptive.pt")
    assert found.teacher == str(pipeline["dense"]) and found.dual is None


def test_alternating_without_recorded_selector_settings_trains_with_todays_defaults() -> None:
    """No selector settings on record (e.g. a fine-tuned model fine-tuned again): PPO uses train-selector's
    defaults, not the values that reproduce runs recorded before a setting existed."""
    model = _meta()
    fresh = selector_training_for(_selector(model), BUDGET, Pipeline(None, None, None), None)
    assert fresh.settings == SelectorTrainConfig(budget=BUDGET) and fresh.settings.reward == "gain"
    old = selector_training_for(_selector(model), BUDGET, Pipeline(None, {"budget": BUDGET}, None), None)
    assert old.settings.reward == "outcome"  # a record without the setting reads as its run behaved


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_errors_and_create_no_folder(pipeline: dict[str, Path], tmp_path: Path,
                                                             fmnist_dir: str, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "dense5.pt"
    save_checkpoint(other, create_model("fmnist-micro", **{**MICRO, "num_classes": 5}), "dense", split=SPLIT)
    adaptive, dense, out = pipeline["adaptive"], pipeline["dense"], tmp_path / "out"
    cases = [
        (dense, dense, [], "holds a 'dense' model, expected"),
        (adaptive, adaptive, [], "holds a 'adaptive' model, expected 'dense'"),
        (adaptive, other, [], "5 classes"),
        (tmp_path / "missing.pt", dense, [], "does not exist"),
        (adaptive, tmp_path / "missing.pt", [], "does not exist"),
        (adaptive, dense, ["--static-plan", "nope.yaml"], "give an existing plan file"),
        (adaptive, dense, ["--static-plan", "auto", "--alternate", "2"], "give one of them"),
        (adaptive, dense, ["--distill-weight", "1.5"], "--distill-weight"),
        (adaptive, dense, ["--temperature", "0"], "--temperature"),
    ]
    for source, teacher, flags, fragment in cases:
        cli_error(capsys, ["finetune", "--adaptive", source, "--teacher", teacher, "--limit", "32", "--out", out,
                           *flags], fragment)
        assert not out.exists()
