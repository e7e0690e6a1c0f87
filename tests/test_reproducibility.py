"""Same seed, same results (CPU): ``evaluate`` with random plans and a random data subset.

Bit-exact training reproducibility is tested in tests/training/test_dense.py (same seed ⇒ same weights,
other seed ⇒ other weights) and tests/training/test_meta.py; random subnets as a function of the seed in
tests/training/test_meta.py; the data subset of --limit in tests/data/test_build.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prance import create_model
from prance.cli import main
from prance.training.checkpoint import save_checkpoint
from tests.conftest import TINY

TIMING = ("seconds", "images_per_second")



def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in json.loads(out.read_text())["rows"]]


def test_evaluate_random_plans_same_seed_same_rows_other_seed_other_plans(fmnist_dir: str, tmp_path: Path, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", create_model("fmnist-tiny", **TINY), "dense")

    def run(seed: int, name: str) -> list[dict]:
        out = tmp_path / name
        torch.manual_seed(1234 + seed * 7 + len(name))  # the global RNG state must not matter
        assert main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", fmnist_dir, "--limit", "40",
                     "--batch-size", "16", "--plan", "random:4", "--seed", str(seed), "--threads", "1",
                     "--out", str(out)]) == 0
        return _rows(out)

    a, b, c = run(0, "a.json"), run(0, "bb.json"), run(1, "c.json")
    assert a == b  # plans, top-1, MACs, parameters and tokens, exactly
    assert len({json.dumps(r["plan"], sort_keys=True) for r in a}) > 1  # the K plans differ from each other
    assert [r["plan"] for r in a] != [r["plan"] for r in c]
    capsys.readouterr()
