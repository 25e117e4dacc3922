"""Decompose a model's Conv2d/Linear layers into low-rank layers, choosing ranks per layer or by a budget.

The package follows the pipeline of :func:`decompose` (``decompose.py``):

- ``cost.py``: a candidate layer, its shapes on the example inputs and what each rank costs and loses;
- ``selection.py``: which layers may be replaced;
- ``passes.py``: the calibration passes of the data-aware path, run by :mod:`rankprune.calibration`;
- ``factoring.py``: weight SVD, whitened SVD, the asymmetric refit, and the low-rank module from factors;
- ``allocation.py``: ranks by energy, ratio or budget (with measured sensitivities), FLOPs, parameters or
  measured latency;
- ``latency_budget.py``: ``target_latency`` (the candidate ranks timed by :mod:`rankprune.latency`) and the
  measured check of the result against the dense model;
- ``surgery.py``: replacing the module and recording the plan and report entries;
- ``measure.py``: FLOPs and output errors on the example inputs, for the report;
- ``plan.py``: :func:`apply_decompose_plan`, which rebuilds the architecture from a plan.

Without calibration data each layer's weight matrix ``W`` is truncated by its own SVD (minimising
``||W - W_r||_F``). With ``data`` the factors minimise the error of the layer's *output* on the calibration
inputs (see docs/lowrank.md).
"""
from ..columns import MAX_SAMPLES_PER_BATCH
from .allocation import DEFAULT_MIN_RANK
from .decompose import decompose
from .factoring import (DEFAULT_DAMPING, LOWRANK_SVD_MAX_FRACTION, LOWRANK_SVD_MIN_DIM, MAX_REFIT_GROWTH,
                        REFIT_DAMPING_STEPS)
from .passes import MAX_COVARIANCE_DIM
from .plan import apply_decompose_plan

# The tunables stay reachable as rankprune.lowrank.<NAME>, where the CLI's help and the benchmarks read them.
__all__ = ["decompose", "apply_decompose_plan", "DEFAULT_MIN_RANK", "DEFAULT_DAMPING", "MAX_SAMPLES_PER_BATCH",
           "LOWRANK_SVD_MAX_FRACTION", "LOWRANK_SVD_MIN_DIM", "MAX_REFIT_GROWTH", "REFIT_DAMPING_STEPS",
           "MAX_COVARIANCE_DIM"]
