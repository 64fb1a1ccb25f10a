"""Benchmarking model files on a target runtime: latency percentiles and
throughput per execution provider and thread count, size, parameters, MACs,
and fidelity against the first model (ALGORITHMS.md 5)."""

from pycompress.bench.measure import ModelBench, bench_models, measure_latency
from pycompress.bench.runtime import PROVIDERS, ProviderUnavailable, open_session, resolve_provider

__all__ = ["PROVIDERS", "ModelBench", "ProviderUnavailable", "bench_models", "measure_latency", "open_session",
           "resolve_provider"]
