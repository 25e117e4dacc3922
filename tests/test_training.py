import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankprune.training import evaluate, recalibrate, train


class CalibNet(nn.Module):
    """Dropout (p=0.9, so that an active one would change every statistic) -> conv -> BN -> ReLU -> conv -> BN."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.9)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, momentum=0.3)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(self.drop(x))))))
        return self.fc(x.mean((2, 3)))


def _ref_stats(t: torch.Tensor):
    """Exact per-channel mean and unbiased variance of [N, C, H, W] in float64."""
    t = t.double().transpose(0, 1).reshape(t.shape[1], -1)
    return t.mean(1), t.var(1, unbiased=True)


def _conv64(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)


def test_statistics_are_exact_over_uneven_batches(seed):
    model = CalibNet()
    batches = [torch.randn(n, 3, 6, 6) * 2 + 1 for n in (7, 5, 3)]
    recalibrate(model, batches)
    mean, var = _ref_stats(_conv64(model.conv1, torch.cat(batches)))  # no dropout: eval mode
    torch.testing.assert_close(model.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(model.bn1.num_batches_tracked) == 3
    # bn2 sees bn1 normalising each batch by that batch's own statistics (BN in train mode)
    inputs2 = []
    for x in batches:
        h = _conv64(model.conv1, x)
        m, v = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - m) / torch.sqrt(v + model.bn1.eps) * model.bn1.weight.double().view(1, -1, 1, 1) \
            + model.bn1.bias.double().view(1, -1, 1, 1)
        inputs2.append(_conv64(model.conv2, h.relu()))
    mean2, var2 = _ref_stats(torch.cat(inputs2))
    torch.testing.assert_close(model.bn2.running_mean.double(), mean2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn2.running_var.double(), var2, rtol=1e-5, atol=1e-5)


def test_batch_forms_max_batches_and_no_gradients(seed):
    model = CalibNet()
    xs = [torch.randn(4, 3, 5, 5) + i for i in range(4)]
    expected = _ref_stats(_conv64(model.conv1, torch.cat(xs[:2])))
    for data in (xs, [(x, torch.zeros(4, dtype=torch.long)) for x in xs], [[x] for x in xs], iter(xs)):
        recalibrate(model, data, max_batches=2)
        torch.testing.assert_close(model.bn1.running_mean.double(), expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bn1.running_var.double(), expected[1], rtol=1e-5, atol=1e-6)
        assert all(p.grad is None for p in model.parameters())

    class KwNet(CalibNet):
        def forward(self, image):
            return super().forward(image)

    kw = KwNet()
    kw.load_state_dict(model.state_dict())
    recalibrate(kw, [{"image": x} for x in xs[:2]])
    torch.testing.assert_close(kw.bn1.running_mean.double(), expected[0], rtol=1e-5, atol=1e-6)


def test_flags_and_momentum_restored_model_returned(seed):
    model = CalibNet().train()
    model.drop.eval()
    model.bn2.momentum = None
    before = {n: m.training for n, m in model.named_modules()}
    assert recalibrate(model, [torch.randn(2, 3, 4, 4)]) is model
    assert {n: m.training for n, m in model.named_modules()} == before
    assert model.bn1.momentum == 0.3 and model.bn2.momentum is None
    model.eval()
    recalibrate(model, [torch.randn(2, 3, 4, 4)])
    assert not any(m.training for m in model.modules())


def test_bad_data_is_refused_and_statistics_kept(seed):
    model = CalibNet()
    recalibrate(model, [torch.randn(4, 3, 5, 5)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(model, [])
    with pytest.raises(ValueError, match="got None"):
        recalibrate(model, None)
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate(model, [torch.randn(2, 3, 4, 4)], max_batches=0)
    bad = torch.randn(4, 3, 5, 5)
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^recalibrate: calibration batch 1 holds NaN or Inf \(the data itself"):
        recalibrate(model, [torch.randn(4, 3, 5, 5), bad])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.bn1.momentum == 0.3


def test_model_without_batchnorm_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="no BatchNorm"):
        assert recalibrate(model, [torch.randn(2, 3, 5, 5)]) is model



def test_train_and_evaluate_on_separable_data():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 4, 4)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = CalibNet()
    model.drop.p = 0.0
    assert train(model, loader, 20, 0.05, progress=False) is model and not model.training
    assert evaluate(model, loader) >= 0.9
