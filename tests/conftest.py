"""Hypothesis profiles for the property-based tests (tests/test_properties.py).

``ci`` (the default) runs a bounded number of examples, derandomized so that a CI failure is
reproducible; ``long`` (``HYPOTHESIS_PROFILE=long``) runs many more (``HYPOTHESIS_MAX_EXAMPLES``,
default 300) with a random search. No deadline: an example's time is dominated by inner solves
whose cost varies with the chain.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300")),
                          deadline=None, derandomize=False, suppress_health_check=_SUPPRESS,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
