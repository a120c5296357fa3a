"""Hypothesis profiles for the property suite.

``quick`` (the default, in ``make test``) keeps the whole suite near a minute on 2 cores;
``thorough`` (``make test-thorough``, HYPOTHESIS_PROFILE=thorough) tries many more inputs.
``quick`` is derandomized, so a failure in CI repeats on the next run and on a laptop;
``thorough`` draws new inputs each run and keeps failures in hypothesis's database
(``.hypothesis/``, git-ignored) so that they replay. The ``@example`` s written on the tests
pin the cases that once failed.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "quick",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread: the inputs here are tiny, and torch's and faiss's OpenMP threads
    take turns on every search and spin while they wait (`search._heap_chunks`), which on
    busy cores costs up to ten times the work. No result depends on the number of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
