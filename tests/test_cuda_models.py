"""The model-level verbs on a CUDA model: each runs the same call on the CPU and on the GPU and asserts the
same decisions (ranks, kept channels) and the same outputs. In float64 the two devices agree to rounding, so
any difference is a device bug (a tensor left on the CPU, a kernel path that differs), not noise; float32
cases check the paths users run (TF32, the fused kernel) against the CPU result within a stated margin.

Covers the calibration engine (data-aware ``decompose``, ``recalibrate``), data-aware pruning (``output_error``
selection, least-squares reconstruction), the hybrid ``compress``, energy scoring and the latency model's CUDA
runtimes driving ``target_latency``. Every test is marked ``cuda`` (skipped without a GPU)."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import rankprune

pytestmark = pytest.mark.cuda


class Net(nn.Module):
    """A residual block and a concatenation (the structures the calibration engine and the pruning graph must
    follow), then a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.Conv2d(24, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.left = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
        self.mix = nn.Conv2d(32, 32, 3, padding=1, stride=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x) + self.body(self.stem(x)))
        x = self.mix(torch.cat([self.left(x), self.right(x)], 1))
        return self.head(torch.relu(x).mean((2, 3)))


def net(dtype=torch.float64):
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.uniform_(-0.2, 0.2)
    return model.to(dtype).eval()


def calibration(dtype=torch.float64, count=4, size=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


def on_cuda(batches):
    return [b.cuda() for b in batches]


def outputs(model, batches):
    with torch.no_grad():
        return torch.cat([model(b.to(next(model.parameters()).device)).double().cpu() for b in batches])


def relative(a, b):
    return float((a - b).norm() / b.norm())


def assert_on_cuda(model):
    assert all(p.is_cuda for p in model.parameters()) and all(b.is_cuda for b in model.buffers())


def test_data_aware_decompose_on_cuda_matches_the_cpu():
    data = calibration()
    cpu_model, cpu_plan, cpu_report = rankprune.decompose(net(), data=data, target_flops=0.6, progress=False)
    dense = net().cuda()
    gpu_model, gpu_plan, gpu_report = rankprune.decompose(dense, data=on_cuda(data), target_flops=0.6,
                                                          progress=False)
    assert_on_cuda(gpu_model)
    assert {k: v["rank"] for k, v in gpu_plan["layers"].items()} == {k: v["rank"] for k, v in cpu_plan["layers"].items()}
    assert relative(outputs(gpu_model, data), outputs(cpu_model, data)) < 1e-8
    assert "calibration" in gpu_report
    # the caller's model is not changed
    assert relative(outputs(dense, data), outputs(net().cuda(), data)) == 0.0


def test_data_aware_decompose_in_float32_on_cuda_is_as_good_as_on_the_cpu():
    data = calibration(torch.float32)
    dense_out = outputs(net(torch.float32), data)
    errors = {}
    for device in ("cpu", "cuda"):
        model = net(torch.float32).to(device)
        small, _, _ = rankprune.decompose(model, data=[b.to(device) for b in data], target_flops=0.6,
                                          progress=False)
        errors[device] = relative(outputs(small, data), dense_out)
    assert errors["cuda"] <= 1.25 * errors["cpu"] + 1e-3, errors


def test_default_data_aware_prune_on_cuda_matches_the_cpu():
    pytest.importorskip("torch_pruning")
    data = calibration()
    x = data[0][:1]
    cpu_model, cpu_plan = rankprune.prune(net(), x, data=data, target_flops=0.6, progress=False)
    gpu_model, gpu_plan = rankprune.prune(net().cuda(), x.cuda(), data=on_cuda(data), target_flops=0.6,
                                          progress=False)
    assert_on_cuda(gpu_model)
    assert gpu_plan["criterion"] == cpu_plan["criterion"] == "output_error"
    kept = {k: v.get("out_channels_kept") for k, v in gpu_plan["layers"].items()}
    assert kept == {k: v.get("out_channels_kept") for k, v in cpu_plan["layers"].items()}
    refits = {k: v["refit"] for k, v in gpu_plan["reconstruction"]["layers"].items()}
    assert refits == {k: v["refit"] for k, v in cpu_plan["reconstruction"]["layers"].items()} and any(refits.values())
    assert relative(outputs(gpu_model, data), outputs(cpu_model, data)) < 1e-8


def test_recalibrate_on_cuda_matches_the_cpu():
    data = calibration()
    cpu_model, gpu_model = net(), net().cuda()
    rankprune.recalibrate(cpu_model, data, progress=False)
    rankprune.recalibrate(gpu_model, on_cuda(data), progress=False)
    for (name, a), (_, b) in zip(cpu_model.named_buffers(), gpu_model.named_buffers()):
        if a.is_floating_point():
            assert torch.allclose(a, b.cpu(), rtol=1e-10, atol=1e-12), name


def test_energy_scores_on_cuda_match_the_cpu():
    # float64: in float32 cuDNN's TF32 convolutions change the maps at 1e-3, and the scores with them.
    data = calibration()
    cpu = rankprune.scoring.score(net(), data, "energy")
    gpu = rankprune.scoring.score(net().cuda(), on_cuda(data), "energy")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert torch.allclose(gpu[name].double().cpu(), cpu[name].double(), rtol=1e-6, atol=1e-9), name


def test_hybrid_compress_on_cuda_matches_the_cpu():
    pytest.importorskip("torch_pruning")
    data = calibration()
    x = data[0][:1]
    cpu_model, cpu_plan, _ = rankprune.compress(net(), x, data=data, target_flops=0.5, progress=False)
    gpu_model, gpu_plan, _ = rankprune.compress(net().cuda(), x.cuda(), data=on_cuda(data), target_flops=0.5,
                                                progress=False)
    assert_on_cuda(gpu_model)
    assert [s["method"] for s in gpu_plan["steps"]] == [s["method"] for s in cpu_plan["steps"]]
    assert relative(outputs(gpu_model, data), outputs(cpu_model, data)) < 1e-8
    applied = rankprune.apply_plan(net().cuda(), gpu_plan)
    applied.load_state_dict(gpu_model.state_dict())
    assert relative(outputs(applied, data), outputs(gpu_model, data)) == 0.0


@pytest.mark.parametrize("runtime", ["eager", "cuda_graph"])
def test_latency_targeted_decompose_on_cuda_is_measured_and_reported(runtime):
    torch.manual_seed(0)
    # Wide 3x3 convolutions, where a low-rank pair does less than half the work of the dense layer.
    model = nn.Sequential(nn.Conv2d(64, 512, 3, padding=1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(512, 64, 3, padding=1)).cuda().eval()
    x = torch.randn(16, 64, 32, 32, device="cuda")
    target = 0.9
    with warnings.catch_warnings():  # a missed target warns (timings vary on a shared GPU): checked below
        warnings.simplefilter("ignore")
        try:
            small, plan, report = rankprune.decompose(model, example_inputs=x, target_latency=target,
                                                      runtime=runtime, progress=False)
        except ValueError as exc:  # this GPU cannot reach the target: the error names what it can reach
            reachable = re.search(r"closest reachable latency is ([\d.]+) of dense", str(exc))
            assert reachable, exc
            target = min(1.0, float(reachable[1]) + 0.02)
            small, plan, report = rankprune.decompose(model, example_inputs=x, target_latency=target,
                                                      runtime=runtime, progress=False)
    assert_on_cuda(small)
    measured = report["latency"]
    assert measured["runtime"] == runtime and measured["target"] == target
    assert measured["dense"]["median_ms"] > 0 and measured["compressed"]["median_ms"] > 0 and measured["ratio"] > 0
    # closed on measurements: the structure (LatencyModel.shaped, on the GPU) was timed in the runtime
    tries = report["latency_search"]["measured_tries"]
    assert report["latency_search"]["runtime"] == runtime
    assert sum(bool(t.get("chosen")) for t in tries) == 1 and all(t["measured_ratio"] > 0 for t in tries
                                                                   if "unreachable" not in t)
    with torch.no_grad():
        y, y_small = model(x), small(x)
    assert torch.isfinite(y_small).all() and y_small.shape == y.shape
    # the returned model runs from its plan and state_dict alone
    applied = rankprune.apply_plan(copy.deepcopy(model), plan)
    applied.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(applied(x), y_small)


def test_latency_targeted_prune_on_cuda_allocates_per_measured_millisecond():
    pytest.importorskip("torch_pruning")
    data = on_cuda(calibration())
    x = data[0][:8]
    model = net().cuda()
    target = 0.8
    with warnings.catch_warnings():  # a missed target warns (timings vary on a shared GPU): checked below
        warnings.simplefilter("ignore")
        try:
            pruned, plan = rankprune.prune(model, x, data=data, target_latency=target, progress=False)
        except ValueError as exc:  # this GPU cannot reach the target: the error names what it can reach
            reachable = re.search(r"closest reachable latency is ([\d.]+) of dense", str(exc))
            assert reachable, exc
            target = min(1.0, float(reachable[1]) + 0.02)
            pruned, plan = rankprune.prune(model, x, data=data, target_latency=target, progress=False)
    assert_on_cuda(pruned)
    assert plan["criterion"] == "output_error"
    assert plan["latency_search"]["allocation"] == "output error per measured millisecond saved"
    assert plan["latency"]["runtime"] == "eager" and plan["latency"]["ratio"] > 0
    tries = plan["latency_search"]["measured_tries"]
    chosen = [t for t in tries if t.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["ratio"] == plan["ratio"]
