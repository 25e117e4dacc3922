"""Grouped convolutions (``1 < groups``, not depthwise): pruned so that every conv group keeps an equal share."""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _torch_pruning as tpa
from ._errors import PruningError


def grouped_conv_groups(module: Any) -> int:
    """``groups`` of a grouped convolution that is not depthwise (1 for every other module)."""
    if isinstance(module, nn.Conv2d) and module.groups > 1 and not (
            module.groups == module.in_channels == module.out_channels):
        return module.groups
    return 1


def prune_grouped_conv_in(conv: nn.Conv2d, removed: Sequence[int]) -> None:
    """Remove input channels ``removed`` of a grouped conv, the same number from each of its groups: the
    weight ``[out, in/groups, kh, kw]`` keeps, for the outputs of group g, the columns of g's kept inputs
    (Torch-Pruning's conv pruner slices the same columns for every group, which is only right for depthwise
    convs)."""
    groups = conv.groups
    per_group = conv.in_channels // groups
    removed_set = set(int(i) for i in removed)
    kept = [[j for j in range(per_group) if g * per_group + j not in removed_set] for g in range(groups)]
    if len({len(k) for k in kept}) != 1 or not kept[0]:
        raise PruningError(f"input channels of grouped conv (groups={groups}) can only be removed in equal "
                           f"numbers from each group, keeping at least one per group; got {sorted(removed_set)}")
    out_per_group = conv.out_channels // groups
    columns = torch.tensor(kept, dtype=torch.long, device=conv.weight.device).repeat_interleave(out_per_group, 0)
    index = columns[:, :, None, None].expand(-1, -1, *conv.weight.shape[2:])
    weight = nn.Parameter(torch.gather(conv.weight.detach(), 1, index), requires_grad=conv.weight.requires_grad)
    if conv.weight.grad is not None:
        weight.grad = torch.gather(conv.weight.grad, 1, index)
    conv.weight = weight
    conv.in_channels = len(kept[0]) * groups


def group_blocks(group, names: Dict[Any, str], graph_is_out) -> Tuple[int, Optional[str]]:
    """Into how many equal contiguous blocks of channels the group must be pruned evenly, so that every
    grouped conv in it keeps equal groups (the lcm of their ``groups``; 1 without grouped conv), or ``(0,
    reason)`` when that cannot be done."""
    n = len(group[0].idxs)
    blocks = 1
    for dep, idxs in group:
        groups = grouped_conv_groups(dep.target.module)
        if groups == 1:
            continue
        name = names.get(dep.target.module)
        module = dep.target.module
        size = module.out_channels if graph_is_out(dep.handler) else module.in_channels
        if tpa.plain_idxs(idxs) != tpa.root_idxs(idxs) or len(idxs) != size:
            return 0, (f"its channels reach grouped conv {name!r} (groups={groups}) through a concatenation or "
                       "reshape, where whole groups cannot be kept equal")
        blocks = math.lcm(blocks, groups)
    if n % blocks or n == blocks:
        return 0, (f"its {n} channels feed grouped convs needing {blocks} equal groups of at least 2 channels "
                   "to remove one from each")
    return blocks, None


def block_removal(imp: Tensor, keep: int, blocks: int) -> Tensor:
    """Indices to remove so that each of ``blocks`` contiguous blocks keeps ``ceil(keep / blocks)`` channels,
    its least important ones removed."""
    size = len(imp) // blocks
    per_block = min(size, max(1, -(-keep // blocks)))
    removed = [b * size + imp[b * size:(b + 1) * size].argsort()[: size - per_block] for b in range(blocks)]
    return torch.cat(removed)
