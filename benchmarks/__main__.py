"""``python -m benchmarks``: run the suite (see :mod:`benchmarks.suite`)."""

from .suite import main

main()
