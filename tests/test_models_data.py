import os

import pytest
import torch

from rankprune import data, models, report


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "mobilenetv2", "resnet50"])
def test_builtin_models_run(name):
    model = models.build(name, num_classes=7, width=0.25).eval()
    x = torch.randn(2, *models.INPUT_SHAPES[name][:1], 32, 32) if name != "resnet50" else torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 7)


def test_build_by_module_factory():
    model = models.build("rankprune.models.resnet_cifar:resnet20", num_classes=3, width=0.25)
    assert model.fc.out_features == 3
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet999")
    with pytest.raises(ValueError, match="cannot import"):
        models.build("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no callable"):
        models.build("rankprune.models:nothing_here")


def test_synthetic_is_deterministic_and_balanced():
    a = data.synthetic_cifar("train", n=500, seed=3)
    b = data.synthetic_cifar("train", n=500, seed=3)
    c = data.synthetic_cifar("test", n=500, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (500, 3, 32, 32) and a.images.dtype == torch.uint8
    counts = a.labels.bincount(minlength=10)
    assert counts.min() > 20
    x, y = a[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    xb, yb = a[[0, 1, 2]]
    assert xb.shape == (3, 3, 32, 32) and torch.equal(xb[0], x)


def test_loaders_batches():
    train, test = data.loaders(batch_size=64, n_train=200, n_test=100)
    xs = [x for x, _ in train]
    assert sum(x.shape[0] for x in xs) == 200 and xs[0].shape == (64, 3, 32, 32)
    assert sum(y.shape[0] for _, y in test) == 100


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.synthetic_cifar("val")
    with pytest.raises(ValueError, match="n must be"):
        data.synthetic_cifar("train", n=0)
    with pytest.raises(ValueError, match="expected 'synthetic'"):
        data.load("nowhere-to-be-found")


def test_tensor_file_and_folder(tmp_path):
    images = torch.rand(5, 3, 16, 16)
    torch.save({"images": images, "labels": torch.arange(5)}, tmp_path / "d.pt")
    ds = data.load(str(tmp_path / "d.pt"))
    assert len(ds) == 5 and torch.equal(ds.labels, torch.arange(5))
    torch.save(images, tmp_path / "x.pt")
    assert data.tensor_file(str(tmp_path / "x.pt")).labels.tolist() == [0] * 5
    torch.save(torch.rand(0, 3, 4, 4), tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no images"):
        data.tensor_file(str(tmp_path / "empty.pt"))
    pil = pytest.importorskip("PIL.Image")
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "imgs" / cls)
        for i in range(2):
            pil.new("RGB", (20, 10), (i * 50, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = data.load(str(tmp_path / "imgs"))
    assert ds.images.shape == (4, 3, 32, 32) and ds.labels.tolist() == [0, 0, 1, 1]


def test_model_stats_counts_flops_and_channels():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 5))
    stats = report.model_stats(model, torch.randn(1, 3, 4, 4))
    assert stats["params"] == 3 * 8 * 9 + 8 + 128 * 5 + 5
    assert stats["flops"] == 2 * (8 * 16 * 27 + 128 * 5)
    assert stats["layers"]["0"] == {"type": "Conv2d", "in": 3, "out": 8, "groups": 1}
    text = report.render(report.compare(model, model, torch.randn(1, 3, 4, 4), eval_fn=lambda m: 0.5))
    assert "| FLOPs per example | 8.19K | 8.19K | +0.0% |" in text
    assert "| accuracy | 50.00% | 50.00% | +0.00 pt |" in text
    # a loss reads as a negative change (after minus before), never as a positive "reduction"
    drop = {"before": stats, "after": stats, "params_ratio": 1.0, "flops_ratio": 0.5, "accuracy_before": 0.9,
            "accuracy_after": 0.5345}
    text = report.render(drop, per_layer=False)
    assert "| FLOPs per example | 8.19K | 8.19K | -50.0% |" in text
    assert "| accuracy | 90.00% | 53.45% | -36.55 pt |" in text
