"""Device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from utils_cv.common.device import describe_device, get_device, set_seed


def test_get_device_prefers_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device().type == expected


def test_set_seed_repeats_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()  # noqa: NPY002

    set_seed(3)
    first = draw()
    set_seed(3)
    assert draw() == first
    set_seed(4)
    assert draw() != first


def test_describe_device_names_device_and_torch_version():
    text = describe_device("cpu")
    assert text.startswith("cpu (") and torch.__version__ in text
    assert describe_device().startswith(get_device().type)
