"""Ops on a tensor that lives on a GPU other than the current one launch on that tensor's device (its stream,
its shared-memory limits). Needs two GPUs; skipped otherwise."""
import pytest
import torch

from rankprune import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture
def second_gpu():
    with torch.cuda.device(0):
        yield torch.device("cuda", 1)


@pytest.mark.parametrize("n", [14, 56, 200])  # warp path, block path, block path above 48 KiB of shared memory
def test_svdvals_on_the_second_gpu(second_gpu, n, seed):
    a = torch.randn(64, n, n, dtype=torch.float64)
    out = ops.svdvals(a.float().to(second_gpu))
    assert out.device == second_gpu
    torch.testing.assert_close(out.double().cpu(), torch.linalg.svdvals(a), rtol=0, atol=1e-4 * n)


@pytest.mark.parametrize("m, n", [(48, 48), (144, 160)])  # 144 x 160: svd on its global workspace, QR in opt-in smem
def test_svd_and_orthonormalize_on_the_second_gpu(second_gpu, m, n, seed):
    a = torch.randn(4, m, n, dtype=torch.float64)
    U, S, V = ops.svd(a.float().to(second_gpu))
    assert U.device == S.device == V.device == second_gpu
    torch.testing.assert_close(S.double().cpu(), torch.linalg.svdvals(a), rtol=1e-4, atol=1e-4)
    tall = a if m >= n else a.mT
    q = ops.orthonormalize(tall.float().to(second_gpu))
    assert q.device == second_gpu
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    torch.testing.assert_close((q.double().mT @ q.double()).cpu(), eye.expand(4, -1, -1), rtol=0, atol=1e-4)


def test_fused_lowrank_conv2d_on_both_gpus(monkeypatch, seed):
    # The fused kernel's shared-memory opt-in is per device: run it on the current GPU, then on the other.
    monkeypatch.setenv("RANKPRUNE_LOWRANK_CONV2D", "fused")
    for device in (torch.device("cuda", 0), torch.device("cuda", 1)):
        with torch.cuda.device(0):
            x = torch.randn(2, 64, 14, 14, device=device, dtype=torch.float16)
            w1 = torch.randn(128, 64, 3, 3, device=device, dtype=torch.float16) / 24
            w2 = torch.randn(64, 128, 1, 1, device=device, dtype=torch.float16) / 11
            out = ops.lowrank_conv2d(x, w1, w2, None, 1, 1, 1)
            assert out.device == device
            torch.testing.assert_close(out.double(), ops.lowrank_conv2d_reference(x, w1, w2, None, 1, 1, 1),
                                       rtol=2e-2, atol=2e-2)
