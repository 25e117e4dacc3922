"""Pruning through torch.cat: channels built dead on purpose in chosen inputs of a concatenation must be
exactly the ones removed, and removing them must leave the output unchanged."""
import pytest
import torch

import rankprune
from rankprune import models


def test_concatnet_builds_and_prunes():
    model = models.build("concatnet", num_classes=7, width=0.5).eval()
    assert models.INPUT_SHAPES["concatnet"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"DenseBlock", "InceptionBlock", "CSPBlock"} <= kinds
    pruned, plan = rankprune.prune(model, x[:1], "l1", ratio=0.5, progress=False)
    with torch.no_grad():
        assert pruned(x).shape == (2, 7)
    assert plan["flops"][1] < 0.5 * plan["flops"][0]
    with pytest.raises(ValueError, match="width"):
        models.build("concatnet", width=0)
