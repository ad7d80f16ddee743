"""moreaugrad's benchmark suite (issue 16): ``python -m benchmarks --help``; see README.md here."""
