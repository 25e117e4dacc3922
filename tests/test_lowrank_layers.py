import io

import pytest
import torch
from torch import nn

import rankprune
from rankprune.nn import LowRankConv2d, LowRankLinear

# (C, N, kernel, stride, padding, dilation, H, W)
CONVS = [
    (4, 6, 3, 1, 1, 1, 8, 8),
    (5, 7, (3, 2), (2, 1), (1, 2), (1, 2), 9, 8),
    (3, 8, (1, 5), (1, 2), (0, 2), 1, 6, 11),
    (6, 4, (5, 3), 3, (2, 0), (2, 1), 13, 9),
    (3, 5, 1, 2, 0, 1, 7, 7),
]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_conv_reproduces_dense(spec, scheme, dtype, seed):
    c, n, k, s, p, d, h, w = spec
    conv = nn.Conv2d(c, n, k, s, p, d, dtype=dtype)
    layer = LowRankConv2d.from_dense(conv, scheme=scheme)
    x = torch.randn(2, c, h, w, dtype=dtype)
    assert layer.first.weight.dtype == dtype
    assert _rel(layer(x), conv(x)) < TOL[dtype]
    assert _rel(layer.to_dense()(x), conv(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_linear_reproduces_dense(dtype, seed):
    linear = nn.Linear(7, 5, dtype=dtype)
    layer = LowRankLinear.from_dense(linear)
    x = torch.randn(3, 4, 7, dtype=dtype)
    assert layer.rank == 5
    assert _rel(layer(x), linear(x)) < TOL[dtype]
    assert _rel(layer.to_dense()(x), linear(x)) < TOL[dtype]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_truncation_is_the_best_rank_r_weight(scheme, seed):
    conv = nn.Conv2d(6, 8, (3, 2), dtype=torch.float64)
    n, c, kh, kw = conv.weight.shape
    m = conv.weight.reshape(n, -1) if scheme == "channel" else conv.weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    best = best.reshape(n, c, kh, kw) if scheme == "channel" else best.reshape(c, kh, n, kw).permute(2, 0, 1, 3)
    layer = LowRankConv2d.from_dense(conv, rank=3, scheme=scheme)
    assert layer.rank == 3 and layer.first.out_channels == 3
    torch.testing.assert_close(layer.to_dense().weight, best)
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, best, conv.bias))


@pytest.mark.parametrize("energy", [0.3, 0.75, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_energy_rank_is_minimal(energy, kind, seed):
    if kind == "conv":
        module = nn.Conv2d(8, 12, 3, dtype=torch.float64)
        layer = LowRankConv2d.from_dense(module, energy=energy)
        m = module.weight.reshape(12, -1)
    else:
        module = nn.Linear(16, 10, dtype=torch.float64)
        layer = LowRankLinear.from_dense(module, energy=energy)
        m = module.weight
    s2 = torch.linalg.svdvals(m) ** 2
    kept = s2.cumsum(0) / s2.sum()
    r = layer.rank
    assert kept[r - 1] >= energy - 1e-12
    assert r == 1 or kept[r - 2] < energy


def test_padding_same_and_valid(seed):
    x = torch.randn(1, 3, 9, 9)
    for padding in ("same", "valid"):
        conv = nn.Conv2d(3, 4, 3, padding=padding, dilation=2)
        assert _rel(LowRankConv2d.from_dense(conv)(x), conv(x)) < 1e-5


def test_unsupported_convolutions_are_refused():
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="asymmetrically"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 4, padding="same"))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        LowRankConv2d.from_dense(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear.from_dense(nn.Conv2d(3, 3, 1))


def test_bad_rank_arguments():
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match="exceeds the full rank 3"):
        LowRankConv2d.from_dense(conv, rank=4)
    with pytest.raises(ValueError, match="not both"):
        LowRankConv2d.from_dense(conv, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="energy"):
        LowRankConv2d.from_dense(conv, energy=1.5)
    with pytest.raises(ValueError, match="rank"):
        LowRankConv2d(2, 3, 3, rank=0)
    with pytest.raises(ValueError, match="scheme"):
        LowRankConv2d(2, 3, 3, rank=1, scheme="tucker")
    with pytest.raises(ValueError, match="scheme"):
        LowRankConv2d.from_dense(conv, scheme="tucker")


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_state_dict_round_trip(scheme, seed):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = LowRankConv2d.from_dense(conv, rank=3, scheme=scheme)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = LowRankConv2d(4, 6, 3, rank=3, stride=2, padding=1, scheme=scheme)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"first.weight", "second.weight", "second.bias"}


def _net(scheme="channel"):
    torch.manual_seed(0)
    return nn.Sequential(
        LowRankConv2d.from_dense(nn.Conv2d(3, 8, 3, padding=1), rank=4, scheme=scheme),
        nn.ReLU(),
        LowRankConv2d.from_dense(nn.Conv2d(8, 8, 3, stride=2, padding=1), rank=4, scheme=scheme),
        nn.Flatten(),
        LowRankLinear.from_dense(nn.Linear(8 * 4 * 4, 10), rank=3),
    )


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_torch_compile_fullgraph(scheme, seed):
    net = _net(scheme)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, net(x))
    out.sum().backward()
    assert x.grad is not None and net[0].first.weight.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor(seed):
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x))


def test_torch_export(seed):
    net = _net().eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(net, (x,))
    assert any("lowrank_conv2d" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), net(x))
