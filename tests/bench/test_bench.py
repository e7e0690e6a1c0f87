"""prance bench: consistent rows, matched MACs, outputs written, clear errors. No test asserts a timing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from prance import Plan, PranceError, count_macs, create_model
from prance.cli import main
from prance import bench
from prance.accounting import macs_per_sample
from prance.bench import METHODS, benchmark, format_table, random_plans, select_mean, write_outputs

TARGET = 0.5
BATCHES = (1, 3)


def _micro():
    """fmnist-micro cut to 4 stages of 1 block: every method at toy cost."""
    torch.manual_seed(0)
    return create_model("fmnist-micro", depth=4, stage_depth=1).eval()


@pytest.fixture(scope="module")
def model():
    return _micro()


@pytest.fixture(scope="module")
def result(model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy matrices: one thread is faster and steadier on a busy machine
    try:
        return benchmark(model, batch_sizes=BATCHES, target_macs=TARGET, runs=2, warmup=1, rounds=2, pool=6,
                         model_label="fmnist-micro (depth 4)")
    finally:
        torch.set_num_threads(threads)


def _row(result, method, batch):
    return next(r for r in result["rows"] if r["method"] == method and r["batch_size"] == batch)


def test_every_method_is_timed_at_every_batch_size(result):
    assert [(r["batch_size"], r["method"]) for r in result["rows"]] == [(b, m) for b in BATCHES for m in METHODS]
    assert all(r["runs"] == 2 for r in result["rows"])


def test_speedup_ideal_and_efficiency_are_the_stated_ratios(result):
    assert result["meta"]["reference"] == "dense-timm"
    for b in BATCHES:
        ref = _row(result, "dense-timm", b)
        assert ref["speedup"] == pytest.approx(1.0) and ref["ideal_speedup"] == pytest.approx(1.0)
        for r in (x for x in result["rows"] if x["batch_size"] == b):
            assert r["speedup"] == pytest.approx(ref["ms_median"] / r["ms_median"])
            assert r["ideal_speedup"] == pytest.approx(ref["gmacs"] / r["gmacs"])
            assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
            assert r["images_per_s"] == pytest.approx(1000 * b / r["ms_median"])
            assert r["macs_fraction"] == pytest.approx(r["gmacs"] / result["meta"]["dense_gmacs"])
            assert r["ms_p10"] <= r["ms_p25"] <= r["ms_median"] <= r["ms_p75"] <= r["ms_p90"]


def test_costs_match_the_accounting(result, model):
    dense_gmacs = count_macs(model) / 1e9
    assert result["meta"]["dense_gmacs"] == pytest.approx(dense_gmacs)
    for b in BATCHES:
        for name in ("dense-timm", "dense"):
            r = _row(result, name, b)
            assert r["gmacs"] == pytest.approx(dense_gmacs) and r["token_fraction"] == 1.0
        for name in ("evit", "tome"):  # token baselines keep every parameter
            assert _row(result, name, b)["params_m"] == _row(result, "dense", b)["params_m"]
            assert _row(result, name, b)["token_fraction"] < 1
        assert _row(result, "static-subnet", b)["params_m"] < _row(result, "dense", b)["params_m"]
        # Both engines ran the same per-image plans on the same images.
        assert _row(result, "prance", b)["gmacs"] == _row(result, "prance-padded", b)["gmacs"]
        assert _row(result, "prance", b)["per_image_plans"] and not _row(result, "dense", b)["per_image_plans"]


@pytest.mark.parametrize("method", ["evit", "tome", "static-subnet"])
def test_static_baselines_are_matched_to_the_target_macs(result, method):
    for b in BATCHES:
        r = _row(result, method, b)
        assert r["gmacs"] / result["meta"]["dense_gmacs"] == pytest.approx(TARGET, abs=0.03)


def test_random_per_image_plans_average_the_target_and_are_labelled(model, result):
    plans = random_plans(model, TARGET, 32, seed=1)
    fractions = macs_per_sample(model, plans).double() / count_macs(model)
    assert len(plans.groups()) > 16  # really per image, not one plan repeated
    assert float(fractions.mean()) == pytest.approx(TARGET, abs=0.01)
    assert fractions.std() > 0.05
    assert "random per-image plans" in result["meta"]["methods"]["prance"]["plans"]
    assert "random per-image plans" in format_table(result)


def test_allocator_setting_is_recorded(result):
    assert result["meta"]["allocator"].startswith("glibc, mmap/trim thresholds raised")
    assert "allocator:" in format_table(result)


def test_distinct_plans_are_dealt_out_evenly_at_the_target(model):
    plans = random_plans(model, TARGET, 32, seed=2, distinct=4)
    groups = plans.groups()
    assert sorted(len(g) for g in groups) == [8, 8, 8, 8]
    fractions = macs_per_sample(model, plans).double() / count_macs(model)
    assert float(fractions.mean()) == pytest.approx(TARGET, abs=0.02)
    with pytest.raises(PranceError, match="distinct plans"):
        random_plans(model, TARGET, 8, distinct=9)


def test_select_mean_hits_a_reachable_target():
    values = torch.linspace(0, 1, 200, dtype=torch.float64)
    for target in (0.2, 0.5, 0.9):
        chosen = select_mean(values, 20, target, torch.Generator().manual_seed(0))
        assert len(set(chosen.tolist())) == 20
        assert float(values[chosen].mean()) == pytest.approx(target, abs=1e-3)


def test_json_and_png_are_written(result, tmp_path):
    json_path, png_path = write_outputs(result, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["rows"] == result["rows"]
    meta = saved["meta"]
    for key in ("torch_version", "threads", "cpu", "date", "command", "target_macs", "runs", "warmup", "methods"):
        assert key in meta
    assert meta["threads"] >= 1 and meta["methods"]["evit"]["matched"] is True
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_sizes=[0]), "batch sizes must be positive"),
        (dict(batch_sizes=[]), "at least one batch size"),
        (dict(target_macs=0.0), "--target-macs"),
        (dict(target_macs=-0.5), "--target-macs"),
        (dict(target_macs=1.5), "--target-macs"),
        (dict(methods=["dense", "fast"]), "unknown method 'fast'"),
        (dict(methods=["evit"]), "reference"),
        (dict(runs=0), "--runs"),
        (dict(batch_sizes=[8], pool=4), "pool"),
    ],
)
def test_bad_arguments_are_one_line_errors(model, kwargs, message):
    with pytest.raises(PranceError, match=message) as e:
        benchmark(model, **{"runs": 1, "warmup": 0, **kwargs})
    assert "\n" not in str(e.value)


def test_plans_files_and_static_plan_are_used(model, tmp_path):
    cfg = model.config
    plans = Plan.random(cfg, model.space, 3, generator=torch.Generator().manual_seed(0), keep_range=(0.3, 1.0))
    torch.save(plans, tmp_path / "plans.pt")
    loaded, label = bench.load_plans(tmp_path / "plans.pt", model)
    assert loaded.key(2) == plans.key(2) and "plans.pt" in label
    (tmp_path / "plans.yaml").write_text(yaml.safe_dump([plans.to_dict(i) for i in range(3)]))
    from_yaml, _ = bench.load_plans(tmp_path / "plans.yaml", model)
    assert [from_yaml.key(i) for i in range(3)] == [plans.key(i) for i in range(3)]

    static = Plan.uniform(cfg, [48, 32, 32, 32], [4.0, 3.0, 3.0, 3.0])  # about half the dense MACs
    (tmp_path / "static.yaml").write_text(yaml.safe_dump([Plan.full(cfg).to_dict(), static.to_dict()]))
    static_plans = bench.load_static_plan(tmp_path / "static.yaml", model)
    out = benchmark(model, batch_sizes=[2], methods=["dense", "static-subnet", "prance"], runs=1, warmup=0,
                    pool=3, options=bench.MethodOptions(static_plans=static_plans, static_source="static.yaml",
                                                        plans=loaded, plans_label=label))
    assert out["meta"]["reference"] == "dense"
    assert out["meta"]["methods"]["static-subnet"]["plan"] == static.to_dict()  # the one nearer the target
    assert "static.yaml" in out["meta"]["methods"]["static-subnet"]["source"]
    want = macs_per_sample(model, plans.select([0, 1])).double().mean() / 1e9
    assert _row(out, "prance", 2)["gmacs"] == pytest.approx(float(want))
    assert out["meta"]["methods"]["prance"]["plans"] == label


def test_bad_plans_file_is_a_clear_error(model, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PranceError, match="cannot read plans"):
        bench.load_plans(tmp_path / "junk.pt", model)
    torch.save({"a": torch.zeros(1)}, tmp_path / "dict.pt")
    with pytest.raises(PranceError, match="not a Plan"):
        bench.load_plans(tmp_path / "dict.pt", model)


def test_models_load_from_a_timm_file_and_a_prance_checkpoint(tmp_path):
    from prance.model import to_timm_state_dict
    from prance.training.checkpoint import save_checkpoint

    model = create_model("fmnist-micro", depth=6)  # from_timm infers the config with 3-block stages first
    torch.save({"model": to_timm_state_dict(model)}, tmp_path / "vit.pth")
    from_timm = bench.load_model(timm_path=str(tmp_path / "vit.pth"), stage_depth=model.config.stage_depth,
                                 num_heads=model.config.num_heads)
    assert from_timm.model.config == model.config and "timm" in from_timm.label and from_timm.checkpoint is None
    save_checkpoint(tmp_path / "best.pt", model, "dense")
    loaded = bench.load_model(checkpoint=str(tmp_path / "best.pt"))
    assert loaded.model.config == model.config and "dense" in loaded.label and loaded.checkpoint["kind"] == "dense"


def test_command_line_end_to_end(tmp_path, capsys, one_thread):
    code = main(["bench", "--preset", "fmnist-micro", "--batch-sizes", "2", "--runs", "1", "--warmup", "0",
                       "--pool", "2", "--threads", "1", "--methods", "dense-timm,dense,evit,prance",
                       "--profile", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "prance*" in printed and "random per-image plans" in printed
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert meta["threads"] == 1 and meta["command"].startswith("prance bench --preset fmnist-micro")
    assert "--profile" in meta["command"].split() and "--profile False" not in meta["command"]
    assert (tmp_path / "bench.png").is_file()
    profile = (tmp_path / "profile-prance-b2.txt").read_text()
    assert "ms of operator self time per call" in profile and "aten::" in profile


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1,0"], "batch sizes must be positive"),
    (["--batch-sizes", "1,x"], "comma-separated whole numbers"),
    (["--target-macs", "0"], "--target-macs"),
    (["--target-macs", "1.2"], "--target-macs"),
    (["--methods", "dense,warp"], "unknown method 'warp'"),
    (["--preset", "fmnist-micro", "--timm", "x.pth"], "not allowed with"),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("prance: error:")


def test_bench_records_device_dtype_and_threads():
    from prance.model import create_model

    torch.manual_seed(0)
    model = create_model("fmnist-micro")
    result = benchmark(model, batch_sizes=[2], methods=["dense", "prance"], runs=1, warmup=0, rounds=1,
                       device="cpu")
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["threads"] == torch.get_num_threads()
