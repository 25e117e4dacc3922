"""The layout every plan shares (``"method"``, ``"version"``, ``"layers"``) and its check; imports nothing of
rankprune, so that the verbs that write plans and :mod:`rankprune.plans`, which applies them, both use it."""
from typing import Dict, Mapping

Plan = Mapping[str, object]

# Bumped when a plan's layout changes; apply_* refuse plans of another version.
PLAN_VERSION = 1


def plan_layers(plan: Plan, method: str, layout: str) -> Dict[str, dict]:
    """Check that ``plan`` is a current ``method`` plan and return its ``"layers"`` mapping; ``layout`` describes
    one layer entry for the error message."""
    if not isinstance(plan, Mapping) or plan.get("method") != method:
        raise ValueError(f"plan: expected a dict with method {method!r} (as returned by rankprune.{method})")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"plan: version {plan.get('version')!r} is not supported (expected {PLAN_VERSION})")
    layers = plan.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError(f"plan: 'layers' must be a dict {{module name: {layout}}}")
    return dict(layers)
