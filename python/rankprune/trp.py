"""Trained Rank Pruning (TRP; Xu et al., IJCAI 2020) inside the user's own training loop.

TRP trains a network whose weights stay close to low rank, so that a low-rank decomposition at the end
costs (almost) no accuracy and needs no fine-tuning. Two things happen during training:

* a nuclear-norm regulariser: after ``backward()`` the gradient of every selected weight gets
  ``lam * U_r V_r^T`` added, where ``W = U S V^T`` is the SVD of the weight in the chosen reshape and ``r``
  is its energy rank (smallest ``r`` keeping ``energy`` of ``sum(S**2)``); with ``r`` full this is the
  gradient of ``lam * ||W||_*``;
* a periodic projection: every ``period`` optimizer steps each selected weight is replaced by its energy
  truncation ``U_r S_r V_r^T``.

Usage (the loop stays yours)::

    pruner = TrainedRankPruner(model, energy=0.9, lam=3e-4, period=20, scheme="channel")
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.regularize()          # after backward, before optimizer.step()
        optimizer.step()
        pruner.step()                # counts steps; projects every `period` calls
    small_model, plan = pruner.finalize()

Reshapes of a conv weight ``W [N, C, kh, kw]`` (N outputs, C inputs):

* ``"channel"`` (Zhang et al. 2016): ``[N, C*kh*kw]``; decomposes into a kh x kw conv C->r and a 1x1 conv
  r->N;
* ``"spatial"`` (Jaderberg et al. 2014): ``W.permute(1, 2, 0, 3)`` as ``[C*kh, N*kw]``; decomposes into a
  kh x 1 conv C->r and a 1 x kw conv r->N.

Layers whose matrices have the same shape (and dtype and device) are stacked and handled by one batched
``rankprune.ops.svd`` call; matrices whose smaller side is at least ``lowrank_min_dim`` use
``rankprune.ops.svd_lowrank`` with a rank guess that grows until it holds the energy.

Mixed precision (``torch.amp.GradScaler``): the gradients ``backward()`` leaves are multiplied by the
scaler's scale. Either call ``regularize()`` after ``scaler.unscale_(optimizer)`` (then the gradients are
true gradients and nothing else is needed), or call it before and pass ``grad_scale=scaler.get_scale()``
so that the regulariser is added in the same scaled domain. A step the scaler skips (inf/NaN gradients)
stays skipped: adding a finite term keeps the gradients non-finite.

DistributedDataParallel: pass the DDP-wrapped model or its ``.module`` (layer names are those of the bare
module, so the plan applies to the bare model). After ``backward()`` DDP has already averaged the
gradients, and the weights are identical on all ranks, so ``regularize()`` and ``step()`` compute the same
thing on every rank with no communication; the random sketches of ``svd_lowrank`` are seeded from ``seed``
and the step count, identically on every rank. All ranks must call both methods the same number of times.
"""
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops
from ._inputs import check_finite_weights, check_fraction
from .lowrank import decompose
from .nn import check_decomposable_conv, weight_matrix

__all__ = ["TrainedRankPruner", "matrix_to_weight", "default_layers"]

_SCHEMES = ("channel", "spatial")
_STATE_VERSION = 1
# Compute SVDs in at least float32: half/bfloat16 weights (pure low-precision training) are cast up.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def matrix_to_weight(matrix: Tensor, shape: Tuple[int, ...], scheme: str) -> Tensor:
    """Inverse of :func:`rankprune.nn.weight_matrix`: ``matrix [..., m, n]`` back to weights of ``shape``
    (one weight's shape, ``[N, C, kh, kw]`` or ``[out, in]``; leading dimensions of ``matrix`` are kept)."""
    _check_scheme(scheme)
    batch = tuple(matrix.shape[:-2])
    if len(shape) == 2:
        return matrix.reshape(*batch, *shape)
    n, c, kh, kw = shape
    if scheme == "channel":
        return matrix.reshape(*batch, n, c, kh, kw)
    return matrix.reshape(*batch, c, kh, n, kw).movedim(-2, -4)


def default_layers(model: nn.Module) -> List[str]:
    """TRP's selection: every ``nn.Conv2d`` with a kernel larger than 1x1 except the first conv of the model
    (in ``named_modules()`` order), leaving out convs the low-rank layers cannot replace (grouped,
    non-zero padding modes)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [name for name, m in convs[1:] if tuple(m.kernel_size) != (1, 1) and _decomposable(m)]


def _decomposable(conv: nn.Conv2d) -> bool:
    try:
        check_decomposable_conv(conv)
    except (TypeError, ValueError):
        return False
    return True


def _check_scheme(scheme) -> None:
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


class _Group:
    """Layers whose matrices share shape, dtype and device: one batched SVD call for all of them."""

    def __init__(self, names: List[str], params: List[nn.Parameter], matrix_shape: Tuple[int, int]):
        self.names = names
        self.params = params
        self.matrix_shape = matrix_shape
        # Subgradients left by the last projection, valid while the weights are the projected ones: the
        # SVD of a projected weight is the projection's own factors, so the regulariser of the next step
        # reuses them instead of running a second SVD (and keeps TRP's r, where a fresh energy rank of the
        # truncated spectrum would be lower).
        self.cached_subgradient: Optional[Tensor] = None
        # The projected weights and their tensor versions, to tell whether the weights moved since.
        self.projected_weights: Optional[Tensor] = None
        self.projected_versions: Optional[List[int]] = None
        # Ranks of the last projection (a tensor, so that no host sync is needed on the GPU).
        self.projected_ranks: Optional[Tensor] = None
        # Ranks restored by load_state_dict for weights saved right after a projection.
        self.resumed_ranks: Optional[Tensor] = None

    def stacked(self) -> Tensor:
        return torch.stack([p.detach() for p in self.params])

    def remember_projection(self, subgradient: Tensor, ranks: Tensor) -> None:
        self.cached_subgradient = subgradient
        self.projected_ranks = ranks
        self.projected_weights = self.stacked()
        self.projected_versions = [p._version for p in self.params]
        self.resumed_ranks = None

    def forget_projection(self) -> None:
        self.cached_subgradient = self.projected_weights = self.projected_versions = self.projected_ranks = None

    def unchanged_flag(self) -> Optional[Tensor]:
        """Whether the weights are still those of the last projection: None when certainly not (no
        projection yet, or a tensor version changed), else a 0-dim bool tensor comparing the values (on
        the device, no host sync), because some in-place updates (e.g. CPU fused Adam) do not bump the
        version counter."""
        if self.projected_versions is None or [p._version for p in self.params] != self.projected_versions:
            return None
        return (self.stacked() == self.projected_weights).all()


def _still_projected(groups: List[_Group]) -> List[bool]:
    """For each group, whether its weights are still those of its last projection (one host sync in all)."""
    flags = [g.unchanged_flag() for g in groups]
    pending = [f for f in flags if f is not None]
    if not pending:
        return [False] * len(groups)
    values = iter(torch.stack([f.to(pending[0].device) for f in pending]).tolist())
    return [False if f is None else next(values) for f in flags]


class TrainedRankPruner:
    """Nuclear-norm regularisation and periodic energy-rank projection of a model's weights (TRP).

    Args:
        model: the model being trained (an ``nn.Module``, or one wrapped in ``DistributedDataParallel`` /
            ``DataParallel``). Its weights are changed in place by :meth:`step` and :meth:`finalize`.
        energy: fraction of ``sum(sigma**2)`` each truncation keeps, in ``(0, 1]``.
        lam: weight of the nuclear-norm regulariser (``>= 0``; 0 disables it).
        period: :meth:`step` projects every ``period`` calls (``>= 1``).
        scheme: ``"channel"`` or ``"spatial"``, the reshape (and the decomposition :meth:`finalize` builds).
        layers: which layers to handle: ``None`` for TRP's default (:func:`default_layers`), a callable
            ``(name, module) -> bool`` over ``named_modules()``, or an iterable of module names. Allowed:
            ``nn.Conv2d`` that the low-rank layers can replace (``groups=1``, zero
            padding), and ``nn.Linear`` under ``"channel"``.
        lowrank_min_dim: matrices whose smaller side is at least this use the randomized
            ``ops.svd_lowrank``; smaller ones use the exact ``ops.svd``.
        seed: seed of the random sketches of ``svd_lowrank`` (combined with the step count).
    """

    def __init__(
        self,
        model: nn.Module,
        energy: float = 0.9,
        lam: float = 3e-4,
        period: int = 20,
        scheme: str = "channel",
        layers: Union[None, Callable[[str, nn.Module], bool], Iterable[str]] = None,
        *,
        lowrank_min_dim: int = 256,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.energy = check_fraction("energy", energy)
        self.lam = self._check_lam(lam)
        self.period = self._check_period(period)
        _check_scheme(scheme)
        self.scheme = scheme
        if isinstance(lowrank_min_dim, bool) or not isinstance(lowrank_min_dim, int) or lowrank_min_dim < 1:
            raise ValueError(f"lowrank_min_dim must be a positive int, got {lowrank_min_dim!r}")
        self.lowrank_min_dim = lowrank_min_dim
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.model = model
        self.module = _unwrap(model)
        self.layer_names = self._select(layers)
        self._calls = 0
        self._groups = self._build_groups()
        # Last known ranks (ints), used as the first guess of svd_lowrank's sketch size.
        self._rank_hint: Dict[str, int] = {}

    # ---- argument checks ------------------------------------------------------------------------------

    @staticmethod
    def _check_lam(lam) -> float:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0.0:
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        return float(lam)

    @staticmethod
    def _check_period(period) -> int:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        return period

    def _check_layer(self, name: str, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            try:
                check_decomposable_conv(module)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"layers: {name!r}: {exc}") from None
        elif isinstance(module, nn.Linear):
            if self.scheme != "channel":
                raise ValueError(f"layers: {name!r} is nn.Linear, which has no {self.scheme!r} reshape")
        else:
            raise ValueError(f"layers: {name!r} is {type(module).__name__}; TRP handles nn.Conv2d and nn.Linear")

    def _select(self, layers) -> List[str]:
        modules = dict(self.module.named_modules())
        if layers is None:
            names = default_layers(self.module)
        elif callable(layers):
            names = [name for name, m in modules.items() if name and layers(name, m)]
        elif isinstance(layers, str):
            raise TypeError("layers must be a callable, an iterable of module names or None, not a single string")
        else:
            names = list(layers)
            unknown = [n for n in names if n not in modules]
            if unknown:
                raise ValueError(f"layers: no module named {unknown[0]!r} in the model")
            if len(set(names)) != len(names):
                raise ValueError("layers: a module name is listed twice")
        for name in names:
            self._check_layer(name, modules[name])
        if not names:
            raise ValueError("layers: no layer selected (TRP's default takes convs larger than 1x1 after the first conv)")
        return names

    def _build_groups(self) -> List[_Group]:
        modules = dict(self.module.named_modules())
        by_key: Dict[tuple, Tuple[List[str], List[nn.Parameter]]] = {}
        for name in self.layer_names:
            weight = modules[name].weight
            shape = tuple(weight_matrix(weight.detach(), self.scheme).shape)
            names, params = by_key.setdefault((shape, weight.dtype, weight.device), ([], []))
            names.append(name)
            params.append(weight)
        return [_Group(names, params, key[0]) for key, (names, params) in by_key.items()]

    # ---- numerics -------------------------------------------------------------------------------------

    def _matrices(self, group: _Group) -> Tensor:
        """The group's weights as one ``[B, m, n]`` tensor (float32 at least)."""
        mats = torch.stack([weight_matrix(p.detach(), self.scheme) for p in group.params])
        return mats.float() if mats.dtype in _LOW_PRECISION else mats

    def _generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + self._calls) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def _svd(self, group: _Group, mats: Tensor, fixed_ranks: Optional[Tensor] = None):
        """``(U, S, V, r)`` of the stacked matrices: a thin (or rank-k randomized) SVD and per-matrix ranks.

        ``r`` is the energy rank unless ``fixed_ranks`` is given. The randomized path keeps the ranks it
        returns within the k it computed: it grows k until ``sum(S[:r]**2)`` reaches ``energy`` of
        ``||W||_F**2`` (the whole spectrum's energy), and falls back to the exact SVD when k would pass half
        the smaller side.
        """
        m, n = group.matrix_shape
        kmax = min(m, n)
        if kmax >= self.lowrank_min_dim:
            hints = [self._rank_hint.get(name) for name in group.names]
            if fixed_ranks is not None:
                k = int(fixed_ranks.max())
            elif None not in hints:
                k = max(hints) + max(hints) // 2 + 8
            else:
                k = kmax // 4
            total = mats.square().sum((-2, -1))  # ||W||_F^2 = sum of all sigma^2
            generator = self._generator(mats.device)
            while k <= kmax // 2:
                U, S, V = ops.svd_lowrank(mats, k, generator=generator)
                if fixed_ranks is not None:
                    return U, S, V, fixed_ranks
                # The energy outside the k computed values, appended as one extra "singular value" (the
                # op's test is a running sum): an energy rank of k + 1 means k values fall short.
                tail = (total - S.square().sum(-1)).clamp_min(0).sqrt()
                r = ops.energy_rank(torch.cat([S, tail[:, None]], -1), self.energy)
                if int(r.max()) <= k:
                    self._rank_hint.update(zip(group.names, r.tolist()))
                    return U, S, V, r
                k *= 2
        U, S, V = ops.svd(mats)
        r = fixed_ranks if fixed_ranks is not None else ops.energy_rank(S, self.energy)
        return U, S, V, r

    @staticmethod
    def _truncated(U: Tensor, S: Tensor, V: Tensor, r: Tensor, with_values: bool) -> Tensor:
        """``U_r S_r V_r^T`` (``with_values``) or ``U_r V_r^T`` for each matrix, with per-matrix ``r``."""
        keep = torch.arange(S.shape[-1], device=S.device) < r.to(S.device)[:, None]
        scale = S * keep if with_values else keep.to(S.dtype)
        return (U * scale[:, None, :]) @ V.transpose(-1, -2)

    def _write(self, group: _Group, mats: Tensor) -> None:
        weights = matrix_to_weight(mats, tuple(group.params[0].shape), self.scheme)
        with torch.no_grad():
            torch._foreach_copy_(group.params, [w.to(p.dtype) for w, p in zip(weights.unbind(0), group.params)])

    def _project_group(self, group: _Group) -> Tensor:
        """Replace the group's weights by their energy truncations; returns the ranks used."""
        U, S, V, r = self._svd(group, self._matrices(group))
        self._write(group, self._truncated(U, S, V, r, with_values=True))
        group.remember_projection(self._truncated(U, S, V, r, with_values=False), r)
        return r

    def _current_projection_ranks(self) -> List[Optional[Tensor]]:
        """Per group, the ranks of the last projection while the weights are still the projected ones (or
        those restored by load_state_dict), else None."""
        projected = _still_projected(self._groups)
        return [g.projected_ranks if p else g.resumed_ranks for g, p in zip(self._groups, projected)]

    # ---- the verbs ------------------------------------------------------------------------------------

    @torch.no_grad()
    def regularize(self, grad_scale: Union[float, Tensor] = 1.0) -> None:
        """Add ``lam * grad_scale * U_r V_r^T`` (in the weight's shape) to each selected weight's gradient.

        Call after ``loss.backward()`` and before ``optimizer.step()``. ``r`` is the energy rank of the
        current weight; right after a projection the projection's own factors are used (the projected
        weight's SVD), as TRP's reference code does. ``grad_scale`` is for gradients scaled by a
        ``GradScaler`` that are not unscaled yet: pass ``scaler.get_scale()`` (a float or a 0-dim tensor).
        A weight with no gradient gets the regulariser's alone; frozen weights (``requires_grad=False``)
        are skipped.
        """
        if isinstance(grad_scale, torch.amp.GradScaler):
            raise TypeError(
                "grad_scale must be a number or a 0-dim tensor: pass scaler.get_scale() when calling before "
                "scaler.unscale_(optimizer), or nothing when calling after it"
            )
        if isinstance(grad_scale, Tensor):
            if grad_scale.numel() != 1:
                raise ValueError(f"grad_scale must be a 0-dim tensor, got shape {tuple(grad_scale.shape)}")
        elif isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)):
            raise TypeError(f"grad_scale must be a number or a 0-dim tensor, got {type(grad_scale).__name__}")
        if self.lam == 0.0:
            return
        groups = [g for g in self._groups if any(p.requires_grad for p in g.params)]
        for group, projected in zip(groups, _still_projected(groups)):
            if projected:
                sub = group.cached_subgradient
            else:
                U, S, V, r = self._svd(group, self._matrices(group), fixed_ranks=group.resumed_ranks)
                sub = self._truncated(U, S, V, r, with_values=False)
            group.resumed_ranks = None
            terms = matrix_to_weight(sub * (grad_scale * self.lam), tuple(group.params[0].shape), self.scheme)
            grads, added = [], []
            for p, term in zip(group.params, terms.unbind(0)):
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = term.to(p.dtype).contiguous()
                else:
                    grads.append(p.grad)
                    added.append(term.to(p.dtype))
            if grads:
                torch._foreach_add_(grads, added)

    @torch.no_grad()
    def step(self) -> bool:
        """Count one training step; every ``period``-th call project each selected weight onto its energy
        truncation ``U_r S_r V_r^T``. Call after ``optimizer.step()``. Returns whether it projected."""
        self._calls += 1
        if self._calls % self.period:
            return False
        self.project()
        return True

    @torch.no_grad()
    def project(self) -> Dict[str, Tensor]:
        """Project every selected weight onto its energy truncation now (what :meth:`step` does every
        ``period`` calls). Returns ``{name: rank}`` as 0-dim tensors (no host sync on the GPU)."""
        ranks = {}
        for group in self._groups:
            r = self._project_group(group)
            ranks.update(zip(group.names, r.unbind(0)))
        return ranks

    @torch.no_grad()
    def ranks(self) -> Dict[str, int]:
        """The rank TRP keeps for each selected weight now, ``{name: rank}``: the rank of the last
        projection while the weight is still the projected one, else the energy rank of the current weight
        (the rank the next projection, or :meth:`finalize`, would give it)."""
        out: Dict[str, int] = {}
        for group, r in zip(self._groups, self._current_projection_ranks()):
            if r is None:
                r = ops.energy_rank(ops.svdvals(self._matrices(group)), self.energy)
            out.update(zip(group.names, r.tolist()))
        self._rank_hint.update(out)
        return out

    @torch.no_grad()
    def finalize(self, example_inputs=None, min_flop_saving: float = 0.0, progress: bool = True):
        """Decompose the trained model at TRP's ranks: returns ``(decomposed_model, plan)``.

        Unless the weights are still those of the last projection (e.g. :meth:`step` just projected),
        they are projected once more, in place, so the model being trained is the "projected model".
        Then ``rankprune.decompose(model, ranks=..., scheme=...)`` builds a new model with each selected
        layer factored at the rank of its projection (:meth:`ranks`); its output equals the projected
        model's output up to rounding. The trained model itself is not restructured. ``example_inputs``,
        ``min_flop_saving`` and ``progress`` are passed to ``decompose`` (layers whose factorisation would not
        save at least that fraction of their FLOPs stay dense, with their projected weights).
        """
        check_finite_weights(self.module, "TrainedRankPruner.finalize")  # before a projection writes NaN factors
        for group, r in zip(self._groups, self._current_projection_ranks()):
            if r is None:
                self._project_group(group)
        ranks = self.ranks()
        model, plan, report = decompose(
            self.module,
            ranks=ranks,
            scheme=self.scheme,
            example_inputs=example_inputs,
            min_flop_saving=min_flop_saving,
            inplace=False,
            progress=progress,
        )
        if not plan["layers"]:
            reasons = "".join(f"\n  {name}: {why}" for name, why in report["skipped"].items())
            warnings.warn(f"TrainedRankPruner.finalize decomposed no layer, the model is returned dense (with its "
                          f"projected weights); per layer:{reasons}", stacklevel=2)
        return model, plan

    # ---- checkpointing ----------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        """Everything needed to resume: hyper-parameters, step count, layer names and the ranks of the last
        projection if the weights are still the projected ones (plain ints/floats/strings)."""
        resumable = {}
        for group, projected in zip(self._groups, _still_projected(self._groups)):
            if projected:
                resumable.update(zip(group.names, group.projected_ranks.tolist()))
        return {
            "version": _STATE_VERSION,
            "energy": self.energy,
            "lam": self.lam,
            "period": self.period,
            "scheme": self.scheme,
            "seed": self.seed,
            "lowrank_min_dim": self.lowrank_min_dim,
            "layers": list(self.layer_names),
            "calls": self._calls,
            "projected_ranks": resumable,
            "rank_hint": dict(self._rank_hint),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` output. The scheme and the layer list must match this pruner's; the
        hyper-parameters and step count are taken from ``state``. Load the model's weights from the same
        checkpoint; if it was saved right after a projection, the next :meth:`regularize` uses that
        projection's ranks, exactly as an uninterrupted run would."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from TrainedRankPruner.state_dict(), got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state: unsupported version {state.get('version')!r} (expected {_STATE_VERSION})")
        if state["scheme"] != self.scheme:
            raise ValueError(f"state: scheme {state['scheme']!r} differs from this pruner's {self.scheme!r}")
        if list(state["layers"]) != self.layer_names:
            raise ValueError("state: its layer list differs from this pruner's (different model or selection)")
        self.energy = check_fraction("energy", state["energy"])
        self.lam = self._check_lam(state["lam"])
        self.period = self._check_period(state["period"])
        self.seed = int(state["seed"])
        self.lowrank_min_dim = int(state["lowrank_min_dim"])
        self._calls = int(state["calls"])
        self._rank_hint = {str(k): int(v) for k, v in state["rank_hint"].items()}
        projected = state["projected_ranks"]
        for group in self._groups:
            group.forget_projection()
            if all(name in projected for name in group.names):
                device = group.params[0].device
                group.resumed_ranks = torch.tensor([int(projected[n]) for n in group.names], device=device)
            else:
                group.resumed_ranks = None

    def __repr__(self) -> str:
        return (
            f"TrainedRankPruner(energy={self.energy}, lam={self.lam}, period={self.period}, "
            f"scheme={self.scheme!r}, layers={len(self.layer_names)} in {len(self._groups)} groups, "
            f"steps={self._calls})"
        )
