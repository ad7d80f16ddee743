"""The same oracles on a CUDA device: every preset's directions equal the CPU's.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``. ``MOREAUGRAD_TEST_DEVICE=cpu`` runs the same checks against the CPU
itself, a dry run of the tests' own logic. Each case runs the same numbers on the CPU in float64
and on the GPU in float64 and float32, with TF32 off (cuDNN convolutions use TF32 by default, whose 10-bit
mantissa would be the test's whole error). float64 on the GPU agrees with the CPU to rounding
(the reduction orders differ, and the inner solvers' stopping tests may stop one step apart on
the generic problems); float32 is held to the precision suite's 1e-4, with its known limits.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import moreaugrad as mg
from test_precision import KNOWN, MODELS, PRESETS, directions, max_rel_error, pair, presets

DEVICE = torch.device(os.environ.get("MOREAUGRAD_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.filterwarnings("ignore::moreaugrad.InexactSolveWarning"),
]
# Closed forms, exact solves and the Moreau presets' solves agree to rounding.
F64_TOL = 1e-9
# The target family on grouped stages runs the generic L-BFGS (tol 1e-8, at most 100 iterations):
# it stops at a relative tolerance, so two devices' iterates differ by about that times the
# problem's condition. On an H100 (2026-11-27): 2e-8 to 4e-6 for regularized TP and AL; 7e-4 for
# plain TP at kappa = 1e3, whose least squares has no proximal term (test_precision.KNOWN, _TP).
GENERIC_F64_TOL = {"target_prop": 5e-3, "regularized_target_prop": 1e-4, "augmented_lagrangian": 1e-4}


@pytest.fixture(autouse=True)
def no_tf32():
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_device(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return copy.deepcopy(model).to(DEVICE), x.to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("step", [1.0, 1e-3])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_equals_cpu(model, preset, step):
    (m32, x32), (m64, x64), y = pair(model)
    rule = presets(step)[preset]
    want = directions(m64, x64, y, rule)
    got64 = directions(*to_device(m64, x64, y), presets(step)[preset])
    assert all(g.device.type == DEVICE.type for g in got64)
    err64 = max_rel_error([g.cpu() for g in got64], want)
    tol = GENERIC_F64_TOL.get(preset, F64_TOL) if model == "grouped" else F64_TOL
    assert err64 < tol, err64
    if (model, preset, step) in KNOWN:
        return  # float32's known limits (test_precision.KNOWN) hold on any device
    got32 = directions(*to_device(m32, x32, y), presets(step)[preset])
    assert all(torch.isfinite(g).all() for g in got32)
    assert max_rel_error([g.cpu() for g in got32], want) < 1e-4


@pytest.mark.parametrize("rule", ["backprop", "moreau", "fenchel", "proxprop_cg"])
def test_pendulum_on_cuda_equals_cpu(rule):
    """A control chain (000 Sec. 4's pendulum): states, controls and the solver's scalars on the
    device."""
    rules = {"backprop": mg.rules.backprop(), "moreau": mg.rules.moreau(gamma=0.5, alpha=0.5),
             "fenchel": mg.rules.fenchel(tau=0.1), "proxprop_cg": mg.rules.proxprop(tau_theta=1.0)}
    p = mg.control.Pendulum(horizon=30)
    u = 0.3 * torch.sin(torch.arange(30, dtype=torch.float64))[:, None]
    want = mg.Oracle(p.chain(u), p.objective, rules[rule])().directions
    got = mg.Oracle(p.chain(u.to(DEVICE)), p.objective, rules[rule])().directions
    d_want = torch.cat([d["w"].reshape(-1) for d in want])
    d_got = torch.cat([d["w"].reshape(-1) for d in got])
    assert d_got.device.type == DEVICE.type
    assert float((d_got.cpu() - d_want).norm() / d_want.norm()) < F64_TOL


def test_training_step_with_torch_optim_on_cuda():
    """``oracle.backward`` fills ``.grad`` on the device, and a ``torch.optim`` step lowers the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).to(DEVICE)
    x, y = torch.randn(32, 3, 16, 16, device=DEVICE), torch.randint(0, 10, (32,), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oracle = mg.Oracle(model, nn.CrossEntropyLoss(), mg.rules.moreau(gamma=0.1, alpha=0.1))
    with torch.no_grad():
        before = float(nn.functional.cross_entropy(model(x), y))
    for _ in range(5):
        opt.zero_grad()
        oracle.backward(x, y)
        assert all(p.grad is not None and p.grad.device.type == DEVICE.type for p in model.parameters())
        opt.step()
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(x), y)) < before


def test_conv_gram_on_cuda_equals_the_patches_gram():
    from moreaugrad.lstsq import conv_gram

    torch.manual_seed(0)
    x = torch.randn(6, 3, 9, 8, dtype=torch.float64, device=DEVICE)
    a = nn.functional.unfold(x, (5, 3), padding=(2, 1)).transpose(1, 2).reshape(-1, 3 * 5 * 3)
    g, s = conv_gram(x, (5, 3), (2, 1))
    torch.testing.assert_close(g, a.T @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, a.sum(0), rtol=1e-12, atol=1e-12)
