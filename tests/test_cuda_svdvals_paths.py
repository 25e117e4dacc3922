"""CUDA paths of svdvals / nuclear_norm / feature_energy / feature_rank that test_svdvals.py does not reach
(issue 13, cuda-review.md section 3 items 1-5): the global-memory workspace path, the grid-stride loops of the
warp, block and global paths, the exact row thresholds between the paths, the rank epilogue and channels_last
maps on the block path, float16/bfloat16 on the block and global paths, a batch of more than 2^31 elements and
CUDA-graph capture. Which path a matrix takes (csrc/cuda/svdvals_cuda.cpp, kernels in svdvals_kernels.cu) depends on its oriented rows (after
transposing wide matrices) and on its workspace, about rows * cols values of the compute type:
  warp path   rows <= 32, grid capped at 64 blocks of 4 matrices per SM;
  block path  64 / 128 / 256 threads for rows <= 64 / <= 128 / above, grid capped at 32 blocks per SM;
  global path workspace beyond the opt-in shared memory (227 KB on H100/H200: fp32 from 239 x 239, fp64 from
              168 x 168), grid capped at 4 blocks per SM.
Results are compared with float64 LAPACK; tests of a path the CPU kernel also has run on the CPU too."""
import pytest
import torch

from rankprune import ops
from conftest import devices
from test_svdvals import check_close, check_nuclear

cuda = pytest.mark.cuda
REL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5, torch.float64: 1e-11}


def sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _compare(a, device):
    """svdvals and nuclear_norm of `a` on `device` against float64 LAPACK on the (already rounded) input."""
    ref = ops.svdvals_reference(a.cpu())
    rel = REL[a.dtype]
    check_close(ops.svdvals(a.to(device)).cpu(), ref, rel=rel)
    check_nuclear(ops.nuclear_norm(a.to(device)).cpu(), ref.sum(-1), rel=rel)


@cuda
@pytest.mark.parametrize("dtype, shape", [
    (torch.float32, (239, 239)), (torch.float64, (168, 168)), (torch.float32, (120, 600)),
    (torch.float16, (239, 239)), (torch.bfloat16, (250, 240)),
], ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else f"{v[0]}x{v[1]}")
def test_global_memory_path(dtype, shape, seed):
    # The smallest sizes whose workspace exceeds the opt-in shared memory (and a wide one, transposed to 600 rows).
    _compare(torch.randn(2, *shape, dtype=torch.float64).to(dtype), "cuda")


@cuda
@pytest.mark.parametrize("path", ["warp", "block", "global"])
def test_grid_stride_loops(path, seed):
    # More matrices than the grid has warps/blocks (its stride, in matrices), so workspaces are reused across the
    # grid-stride loop. A few distinct matrices repeated so that a matrix and the one a stride later differ.
    stride, shape = {"warp": (64 * 4 * sms(), (9, 7)), "block": (32 * sms(), (40, 12)),
                     "global": (4 * sms(), (239, 239))}[path]
    count = stride + 5
    period = 5 if stride % 5 else 7
    distinct = torch.randn(period, *shape, dtype=torch.float64).float()
    a = distinct[torch.arange(count) % period]
    ref = ops.svdvals_reference(distinct)[torch.arange(count) % period]
    check_close(ops.svdvals(a.cuda()).cpu(), ref)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rows", [32, 33, 64, 65, 128, 129])
def test_row_thresholds(device, rows, seed):
    # 32/33: warp -> block path; 64/65: 64 -> 128 threads; 128/129: 128 -> 256 threads; square and tall.
    _compare(torch.randn(4, rows, rows, dtype=torch.float64).float(), device)
    _compare(torch.randn(4, rows, 9, dtype=torch.float64).float(), device)


def _maps_of_rank(ranks, size, dtype):
    """[1, len(ranks), size, size] maps, map c of exact rank ranks[c] with its nonzero singular values in [1, 2]."""
    maps = []
    for k in ranks:
        u = torch.linalg.qr(torch.randn(size, k, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(size, k, dtype=torch.float64)).Q
        maps.append((u * (1 + torch.rand(k, dtype=torch.float64))) @ v.T)
    return torch.stack(maps)[None].to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [56, 112])  # block path with 64 and 128 threads
@pytest.mark.parametrize("channels_last", [False, True])
def test_rank_and_energy_epilogues_on_block_path(device, dtype, size, channels_last, seed):
    ranks = [1, 5, 17, size // 2, size]
    x = torch.cat([_maps_of_rank(ranks, size, dtype), _maps_of_rank(ranks[::-1], size, dtype)])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xd = x.to(device)
    # rtol far from both the nonzero singular values (>= sigma_max / 2) and the rounding residue of the zero ones
    rank = ops.feature_rank(xd, rtol=1e-8 if dtype == torch.float64 else 1e-3, reduction="none")
    assert rank.cpu().tolist() == [ranks, ranks[::-1]]
    energy = ops.feature_energy(xd, reduction="none").cpu()
    check_nuclear(energy, ops.feature_energy_reference(x, reduction="none"), rel=REL[dtype])


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(56, 56), (100, 70), (140, 130)])  # block path at 64, 128 and 256 threads
def test_half_precision_on_block_path(dtype, shape, seed):
    _compare(torch.randn(6, *shape, dtype=torch.float64).to(dtype), "cuda")


@cuda
def test_batch_over_2_31_elements():
    # 11e6 float16 14 x 14 matrices = 2.16e9 elements (4.3 GB): matrix offsets need 64-bit arithmetic. The first
    # and the last matrices are compared with LAPACK.
    count = 11_000_000
    a = torch.empty(count, 14, 14, device="cuda", dtype=torch.float16)
    assert a.numel() > 2 ** 31
    a.normal_()
    nuc = ops.nuclear_norm(a)
    ends = torch.cat([a[:256], a[-256:]]).cpu()
    del a
    ref = ops.nuclear_norm_reference(ends)
    check_nuclear(torch.cat([nuc[:256], nuc[-256:]]).cpu(), ref)


@cuda
@pytest.mark.parametrize("shape", [(14, 14), (56, 56), (239, 239)])  # warp, block and global paths
def test_cuda_graph_capture(shape, seed):
    a = torch.randn(8, *shape, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.svdvals(a)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s = ops.svdvals(a)
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(s, ops.svdvals(a))
    check_close(s.cpu(), ops.svdvals_reference(a.cpu()))
