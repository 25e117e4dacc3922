"""The columns a layer multiplies its weight matrix with on calibration data (im2col patches of a convolution,
the feature vectors of any other layer), subsampled with seeded generators so that the dense and the
compressed model's passes draw the same columns: what the calibration passes of ``decompose`` and of
``prune``'s reconstruction and ``output_error`` scoring accumulate their statistics over."""
from typing import Optional

import torch
from torch import Tensor, nn

from .nn import _explicit_padding

# Calibration columns (im2col patches / tokens) kept per batch and layer call: a covariance costs d^2 per
# column, so large feature maps are subsampled (uniformly, seeded).
MAX_SAMPLES_PER_BATCH = 4096


def input_columns(module: nn.Module, x: Tensor, generator: Optional[torch.Generator] = None,
                  max_rows: int = MAX_SAMPLES_PER_BATCH) -> Tensor:
    """The columns a layer multiplies its weight matrix with, as rows ``[n, d]``: the im2col patches of a
    ``Conv2d`` input (its own stride, padding and dilation; rows in unfold's order: channel, kernel row,
    kernel column), or the feature vectors of any other layer's input (every leading dimension is a sample).
    At most ``max_rows`` of them: a uniform subsample drawn with ``generator`` (the same generator state
    gives the same positions for two inputs of the same shape)."""
    if not isinstance(module, nn.Conv2d):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > max_rows:
            rows = rows[_subsample(rows.shape[0], max_rows, generator).to(rows.device)]
        return rows
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    ph, pw = _explicit_padding(module)
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    count = batch * out_h * out_w
    if count <= max_rows:
        patches = nn.functional.unfold(x, module.kernel_size, module.dilation, (ph, pw), module.stride)  # [B, d, L]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    # Only the sampled patches, gathered from the padded input: im2col of the whole batch costs more than the
    # covariance itself. Channels last, each tap of a patch is one contiguous row (1.1-1.8x faster than
    # indexing the channels-first input, measured on 1 CPU thread).
    keep = _subsample(count, max_rows, generator).to(x.device)
    image, pixel = keep // (out_h * out_w), keep % (out_h * out_w)
    rows_at = (pixel // out_w)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # [n, kh]
    cols_at = (pixel % out_w)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # [n, kw]
    channels, padded_h, padded_w = x.shape[1], height + 2 * ph, width + 2 * pw
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, ph:ph + height, pw:pw + width] = x.permute(0, 2, 3, 1)
    at = (image[:, None, None] * padded_h + rows_at[:, :, None]) * padded_w + cols_at[:, None, :]  # [n, kh, kw]
    patches = padded.view(-1, channels).index_select(0, at.reshape(-1)).view(keep.shape[0], kh, kw, channels)
    return patches.permute(0, 3, 1, 2).reshape(keep.shape[0], -1)


def column_generator(layer_index: int, batch: int, call: int) -> torch.Generator:
    """The seeded generator of a layer's column subsample on one call (``input_columns``): the dense and the
    compressed model's passes draw the same columns. On the CPU whatever the model's device (only indices are
    drawn), so that a GPU calibration draws the CPU's columns and gives the CPU's plan."""
    return torch.Generator().manual_seed(((layer_index * 1_000_003) + batch) * 64 + call)


def _subsample(count: int, size: int, generator: Optional[torch.Generator]) -> Tensor:
    """``size`` distinct indices in ``range(count)``, uniformly at random."""
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(count, generator=generator, device=device)[:size]
