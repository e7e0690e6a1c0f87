"""``prance.adapt``: the README's example runs as written (on the tiny finished run), and returns the run's model."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

import prance
from prance.adaptive import AdaptiveViT
from prance.pipeline.config import STAGES
from prance.training.checkpoint import load_checkpoint
from tests.conftest import REPO
from tests.pipeline.conftest import LIMIT, TINY, copy_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _readme_block() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"### The whole pipeline in one call.*?```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    block = _readme_block()
    assert "prance.adapt(None, \"fashion-mnist\"" in block and "evaluate_adaptive" in block and "benchmark(" in block
    run = copy_run(finished_run, tmp_path / "runs" / "adapt")
    calls = []
    real = prance.adapt

    @functools.wraps(real)
    def tiny_adapt(*args, **kwargs):  # the same call with the tiny run's settings (a micro model, a few steps)
        calls.append((args, kwargs))
        return real(*args, **kwargs, **TINY, limit=LIMIT, threads=1)

    monkeypatch.setattr(prance, "adapt", tiny_adapt)
    monkeypatch.chdir(tmp_path)  # out="runs/adapt" is the finished tiny run: every stage is done already
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert len(calls) == 1 and out.count("done already") == len(STAGES)

    net, summary, per_image = namespace["net"], namespace["summary"], namespace["per_image"]
    assert isinstance(net, AdaptiveViT) and net.budget == 0.5
    saved = load_checkpoint(run / "finetune" / "adaptive.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in net.model.state_dict().items())  # the run's final model
    assert net.representatives is not None  # the final model is the rounded-up one (round_up.k = 4 by default)
    assert summary["images"] == len(per_image) == 10_000  # the whole test split
    assert f"top-1 {summary['top1']:.2f}%" in out and "dense-timm" in out and "prance" in out
