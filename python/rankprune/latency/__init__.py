"""Latency measured on the target: what compression makes faster is measured, not counted in FLOPs.

- :class:`LatencyModel`: per-layer latencies of a model's Conv2d/Linear layers and of their candidate shapes
  (:class:`Variant`: the low-rank pair at a rank, fewer output/input channels), timed at the model's real input
  shapes in a runtime (``"eager"``: PyTorch on the model's device; ``"cuda_graph"``: CUDA graphs;
  ``"onnxruntime"``: ONNX Runtime on the CPU), cached on disk; it predicts a compressed model's latency and
  picks the rank / channel multiples the hardware rewards from measured sweeps.
- :func:`compare` and :func:`verify`: the measured end-to-end latency of a compressed model against dense
  (interleaved rounds, median and spread); ``verify`` warns when the model is not faster or misses a target;
  :func:`meet_measured` closes the loop of a latency target on measurements of the structures built for it;
  :func:`reference_timer` makes the dense model's timer once for the loop and the final check.
- :func:`clear_cache` (also ``rankprune bench clear-cache``), :func:`cache_dir` (``$RANKPRUNE_CACHE_DIR/latency``,
  default ``~/.cache/rankprune/latency``).

See docs/latency.md.
"""
from .cache import CACHE_ENV, cache_dir, clear_cache
from .model import DENSE, LatencyModel, Variant, best_multiple
from .runtimes import RUNTIMES, check_runtime, compare, latency_settings, meet_measured, reference_timer, verify

__all__ = ["LatencyModel", "Variant", "DENSE", "best_multiple", "compare", "verify", "meet_measured", "reference_timer",
           "check_runtime", "latency_settings", "RUNTIMES", "clear_cache", "cache_dir", "CACHE_ENV"]
