"""``--device`` text: cpu by default, cuda only when a GPU is visible, anything else refused."""

from __future__ import annotations

import pytest
import torch

from prance import PranceError
from prance.devices import resolve_device


@pytest.mark.parametrize("text", [None, "cpu", " CPU "])
def test_cpu_is_the_default_and_case_does_not_matter(text):
    assert resolve_device(text) == torch.device("cpu")


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "mps0", "", "cpu:0:1"])
def test_unknown_devices_are_refused_with_the_accepted_forms(text):
    with pytest.raises(PranceError, match="use cpu, cuda or cuda:N"):
        resolve_device(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("text", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_to_use_cpu(text):
    with pytest.raises(PranceError, match=r"no CUDA device is visible .*use --device cpu"):
        resolve_device(text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_a_gpu_and_an_index_past_the_last_one():
    assert resolve_device("cuda").type == "cuda"
    with pytest.raises(PranceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
