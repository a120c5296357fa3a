"""Which device to run on, and seeding so that a run can be repeated.

>>> set_seed(0)
>>> get_device().type in ("cpu", "cuda")
True
"""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch


def get_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device).

    A seeded run on the CPU repeats exactly on the same machine. GPU kernels such as
    cuDNN's convolution search and atomic adds may still vary between runs; pass
    ``deterministic=True`` to ask PyTorch for deterministic GPU kernels, at some cost in speed
    (ops without a deterministic version then warn instead of failing).
    """
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the global generator that np.random.* calls use)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it is read when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def describe_device(device: torch.device | str | None = None) -> str:
    """One line naming the device, its memory or threads, and the PyTorch version.

    >>> describe_device("cpu").startswith("cpu")
    True
    """
    device = get_device() if device is None else torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        memory = properties.total_memory / 2**30
        return f"{device} ({properties.name}, {memory:.0f} GiB), torch {torch.__version__}"
    return f"{device} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def cpu_model() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), for benchmark and
    result records: on Linux from /proc/cpuinfo, where ``platform.processor()`` is often
    empty; elsewhere ``platform.processor()`` or, failing that, the architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
