"""Shared fixtures: tiny model shapes that run in milliseconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prance.config import SearchSpace, ViTConfig

#: Overrides of the fmnist-tiny preset (28 px, 1 channel, 10 classes) that train in seconds.
TINY = dict(embed_dim=32, depth=3, num_heads=2, stage_depth=1)
REPO = Path(__file__).resolve().parents[1]


#: Test files that share session fixtures too costly to build twice (a finished tiny ``prance run``): under
#: pytest-xdist (``make test`` runs two workers) they run on one worker.
SHARED_RUN = ("tests/pipeline/",)


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker shares the cores with the other workers: one torch thread each (and in the
    processes it starts), or they would oversubscribe the machine and slow each other down."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """One unit of work per test file (its module fixtures are built once), one for the files in
    ``SHARED_RUN`` (pytest-xdist's own ``--dist loadgroup`` does not group under pytest 9.2)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return next((prefix for prefix in SHARED_RUN if path.startswith(prefix)), path)

    return ByFile(config, log)


@pytest.fixture(autouse=True)
def _restore_threads():
    """``--threads`` sets torch's global thread count; later tests get the old one back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def cli_error(capsys: pytest.CaptureFixture[str], argv: list, *fragments: str) -> str:
    """Run the CLI in-process; expect exit code 2 and exactly one ``prance: error:`` line naming each fragment."""
    from prance.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prance: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def tiny_config(**overrides) -> ViTConfig:
    """4 stages of 1 block, 16 patches: every code path at toy cost."""
    base = dict(img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=32, depth=4, num_heads=4,
                mlp_ratio=4.0, stage_depth=1)
    return ViTConfig(**{**base, **overrides})


def tiny_space(config: ViTConfig, **overrides) -> SearchSpace:
    base = dict(widths=(16, 24, 32), mlp_ratios=(2.0, 3.5, 4.0), heads=(2, 3, 4), elastic_heads=True,
                token_mode="prune_merge")
    return SearchSpace(**{**base, **overrides})


@pytest.fixture
def tiny():
    """A random-weight tiny MetaViT with elastic heads and prune-then-merge, in eval mode."""
    from prance.model import MetaViT

    torch.manual_seed(0)
    cfg = tiny_config()
    return MetaViT(cfg, tiny_space(cfg)).eval()


@pytest.fixture(scope="session")
def fmnist_dir() -> str:
    """The real Fashion-MNIST IDX folder (tests use small slices of it)."""
    from prance.data.fashion_mnist import find_fashion_mnist_dir

    directory = find_fashion_mnist_dir()
    if not all((directory / f"{s}-images-idx3-ubyte.gz").is_file() for s in ("train", "t10k")):
        pytest.skip("Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist")
    return str(directory)


@pytest.fixture
def one_thread():
    """Bit-exact comparisons need a fixed thread count; one thread is also fastest at these sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

