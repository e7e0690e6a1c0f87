"""A tiny ``prance run`` on a slice of the real Fashion-MNIST, finished once per session and copied by the
tests that continue, change or read it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

#: A micro model (3 stages of 2 blocks: decisions before stages 1 and 2) and a few steps per stage, on top of
#: the demo schedule; with --limit 200 every split is 200 images.
TINY = {
    "dense": {"preset": "fmnist-micro", "model_overrides": {"embed_dim": 32, "depth": 6, "num_heads": 2,
                                                            "stage_depth": 2},
              "epochs": 1, "batch_size": 32, "warmup_epochs": 0.1},
    "meta": {"epochs": 1, "max_steps": 6, "batch_size": 32, "warmup_steps": 1},
    "sweep": {"count": 4},
    "selector": {"updates": 3, "batch_size": 16, "hidden": 16, "checkpoint_every": 1},
    "finetune": {"max_steps": 4, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 1, "alternate": 2},
    "static_finetune": {"static_candidates": 3},
    "bench": {"batch_sizes": [1, 4], "runs": 2, "warmup": 1, "rounds": 1, "pool": 8},
    "report": {"overlays": 2},
}
LIMIT = 200


def tiny_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path


def run_argv(config: Path, out: Path, *extra: str) -> list[str]:
    """``prance run`` of the tiny settings (demo schedule, --limit 200, one thread)."""
    return ["run", "--schedule", "demo", "--config", str(config), "--limit", str(LIMIT), "--threads", "1",
            "--out", str(out), *extra]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: str) -> Path:
    """A finished tiny run (do not change it: copy it with ``copy_run``)."""
    import torch

    from prance.cli import main

    folder = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    try:
        assert main(run_argv(tiny_config(folder), folder / "run")) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "run"


def copy_run(run: Path, to: Path, stages: tuple[str, ...] | None = None) -> Path:
    """A copy of ``run``; with ``stages``, only those stages' folders and records (as if the run stopped there)."""
    import json

    if stages is None:
        shutil.copytree(run, to)
        return to
    to.mkdir(parents=True)
    record = json.loads((run / "stages.json").read_text())
    for stage in stages:
        shutil.copytree(run / stage, to / stage)
    (to / "stages.json").write_text(json.dumps({s: record[s] for s in stages}))
    return to


@pytest.fixture(scope="session")
def budget_run(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny run at budget 0.6 reusing ``finished_run``'s dense model and meta-network, and what it printed
    (do not change it)."""
    import contextlib
    import io

    import torch

    from prance.cli import main

    folder = tmp_path_factory.mktemp("budget")
    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert main(run_argv(tiny_config(folder), folder / "run", "--budget", "0.6", "--reuse",
                                 str(finished_run))) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "run", printed.getvalue()
