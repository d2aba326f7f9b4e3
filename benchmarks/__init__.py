"""Benchmarks that print side-by-side ratios (not tests): `python -m benchmarks.run_all`.

Each script measures its configurations in one run, rounds interleaved, medians reported,
and writes benchmarks/results/NAME.json (``--smoke``: a tiny model, 2 steps, for CI).
"""
import os
import sys

# OpenMP threads that spin while waiting make CPU timings erratic on a machine shared with
# other jobs (see common.passive_omp). libgomp reads this when torch is first imported,
# so it only takes effect for `python -m benchmarks.NAME`, not in a process that already
# imported torch.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
