"""Benchmark: time of RMSNorm implementations, side by side.

``python -m rmsnorm_jax.bench --help`` lists the ops, implementations and
options. The parts:

* :mod:`~rmsnorm_jax.bench.cases`: ops, implementations, inputs, the jitted
  candidates;
* :mod:`~rmsnorm_jax.bench.timing`: device time from ``jax.profiler`` traces
  on a GPU, host wall clock elsewhere;
* :mod:`~rmsnorm_jax.bench.peers` (with the worker script
  ``peer_worker.py``): the PyTorch peers and the device-copy reference;
* :mod:`~rmsnorm_jax.bench.runner`: :func:`run_benchmark`, the loop over
  cases;
* :mod:`~rmsnorm_jax.bench.report`: ratios, the markdown table, the plot;
* :mod:`~rmsnorm_jax.bench.cli`: the command line.

The shapes come from :mod:`rmsnorm_jax.shapes` (tags "bench", "smoke" and,
for the feature ops, "bench_features"), and so does the count of an op's
minimum bytes.
"""

from rmsnorm_jax.bench.cases import (DEFAULT_OPS, EPS, FEATURE_IMPLS,
                                     FEATURE_OPS, HEAD_OPS, IMPLS,
                                     LAYER_DTYPES, LAYERS, LINEN_OPS, OPS,
                                     QUANT_OPS, SMALL, Candidate,
                                     build_candidates, feature_call,
                                     min_bytes, n_sets, on_gpu, parse_cases,
                                     roofline_bytes)
from rmsnorm_jax.bench.cli import main
from rmsnorm_jax.bench.peers import PEERS, PeerWorker
from rmsnorm_jax.bench.report import add_ratios, plot, table
from rmsnorm_jax.bench.runner import run_benchmark
from rmsnorm_jax.bench.timing import (attribute, device_events, per_call,
                                      summarize, time_candidates, trace_file)

__all__ = ["DEFAULT_OPS", "EPS", "FEATURE_IMPLS", "FEATURE_OPS", "HEAD_OPS",
           "IMPLS", "LAYER_DTYPES", "LAYERS", "LINEN_OPS", "OPS", "PEERS",
           "QUANT_OPS", "SMALL", "Candidate", "PeerWorker", "add_ratios",
           "attribute", "build_candidates", "device_events", "feature_call",
           "main",
           "min_bytes", "n_sets", "on_gpu", "parse_cases", "per_call",
           "plot", "roofline_bytes", "run_benchmark", "summarize", "table",
           "time_candidates", "trace_file"]
