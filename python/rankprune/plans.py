"""Plans: what a compression step did to an architecture, as plain JSON-able data.

A plan rebuilds the compressed architecture on a freshly constructed model, so that a state_dict saved after
compression loads with ``torch.load(path, weights_only=True)``::

    model = build_model()
    model = rankprune.apply_plan(model, json.load(open("plan.json")))
    model.load_state_dict(torch.load("model.pt", weights_only=True))

Every plan is a dict with ``"method"`` ("prune", "decompose" or "compress": ``"steps"``, a list of prune and
decompose plans) and ``"version"``; a list of plans is applied in order (e.g. pruning, then decomposition).
"""
from typing import Mapping, Sequence, Union

from torch import nn

from .lowrank import apply_decompose_plan
from .plan_format import PLAN_VERSION, Plan, plan_layers  # noqa: F401  (PLAN_VERSION, plan_layers: re-exported)


def apply_plan(model: nn.Module, plan: Union[Plan, Sequence[Plan]]) -> nn.Module:
    """Rebuild on ``model`` the architecture described by ``plan`` (or by each plan of a list, in order) and
    return the model. Weights of the rebuilt layers are placeholders until a state_dict is loaded."""
    if isinstance(plan, Sequence) and not isinstance(plan, (str, bytes)):
        for step in plan:
            model = apply_plan(model, step)
        return model
    if not isinstance(plan, Mapping) or "method" not in plan:
        raise ValueError("apply_plan: expected a plan dict with a 'method' key (or a list of them)")
    method = plan["method"]
    if method == "prune":
        from .pruning import apply_prune_plan  # at call time: rankprune.pruning needs torch-pruning

        return apply_prune_plan(model, plan)
    if method == "decompose":
        return apply_decompose_plan(model, plan)
    if method == "compress":  # rankprune.compress: its steps, in order
        return apply_plan(model, list(plan_steps(plan)))
    raise ValueError(f"apply_plan: unknown plan method {method!r} (expected 'prune', 'decompose' or 'compress')")


def plan_steps(plan: Plan) -> Sequence[Plan]:
    """The steps of a ``compress`` plan, checked."""
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"plan: version {plan.get('version')!r} is not supported (expected {PLAN_VERSION})")
    steps = plan.get("steps")
    if not isinstance(steps, Sequence) or not steps or any(not isinstance(s, Mapping) or s.get("method") not in
                                                           ("prune", "decompose") for s in steps):
        raise ValueError("plan: a compress plan's 'steps' must be a non-empty list of prune / decompose plans")
    return steps
