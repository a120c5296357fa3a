"""Hypothesis profiles for the property suite.

``quick`` (the default, in ``make test``) keeps the whole suite near a minute on 2 cores;
``thorough`` (``make test-thorough``, HYPOTHESIS_PROFILE=thorough) tries many more inputs.
``quick`` is derandomized, so a failure in CI repeats on the next run and on a laptop;
``thorough`` draws new inputs each run and keeps failures in hypothesis's database
(``.hypothesis/``, git-ignored) so that they replay. The ``@example`` s written on the tests
pin the cases that once failed.
"""

import os

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
