"""The optional fused kernels (``mg.kernels``, issue 16): with compilation on, the ReLU steps of
Moreau and FenBP give the eager rules' directions; a compile that fails warns once and runs eagerly."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

import moreaugrad as mg
from moreaugrad import kernels


@pytest.fixture(autouse=True)
def _eager_after():
    yield
    kernels.use_compile(False)
    kernels.reset()


def convnet(dtype):
    """The same model and data in any dtype: drawn in float64, then cast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.arange(6) % 3
    return model.to(dtype), x.to(dtype), y


RULES = {
    "fenchel": lambda step: mg.rules.fenchel(step),
    "fenchel_no_surrogate": lambda step: mg.rules.fenchel(step, surrogate=False),
    "moreau": lambda step: mg.rules.moreau(schedule=mg.rules.Lagrangian(step, step)),
    "moreau_paper": lambda step: mg.rules.moreau(gamma=0.5, alpha=step),
}


def run(name, step, dtype):
    model, x, y = convnet(dtype)
    result = mg.Oracle(model, mg.losses.CrossEntropy(), RULES[name](step))(x, y)
    terms = [i.state.term for i in result.info if getattr(i.state, "term", None) is not None]
    return [d for ds in result.directions if ds for d in ds.values()], terms


def close(a, b, rtol):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=rtol, atol=rtol * float(v.abs().max()))


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("step", [1.0, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_formulas_equal_the_eager_rules(name, step, dtype, monkeypatch):
    """The kernels' formulas, run uncompiled through the rules' kernel path, equal the rules' own
    eager path: to 1e-12 in float64 and to float32 rounding in float32, at a large and a small step."""
    want = run(name, step, dtype)
    monkeypatch.setattr(kernels.torch, "compile", lambda fn, **kw: fn)
    kernels.use_compile(True)
    got = run(name, step, dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    close(got[0], want[0], rtol)
    close(got[1], want[1], rtol)
    if name.startswith("fenchel") and name != "fenchel_no_surrogate":
        assert len(got[1]) == len(want[1]) > 0


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("no C++ compiler\nmore lines")
        return call

    want = run("fenchel", 1.0, torch.float64)
    monkeypatch.setattr(kernels.torch, "compile", broken)
    kernels.use_compile(True)
    with pytest.warns(kernels.CompileWarning, match="fenbp_relu could not be compiled .RuntimeError: no C"):
        got = run("fenchel", 1.0, torch.float64)
    close(got[0], want[0], 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.CompileWarning)
        run("fenchel", 1.0, torch.float64)  # failed once: eager, no second warning


def test_use_compile_takes_a_bool():
    with pytest.raises(TypeError, match="flag must be True or False"):
        kernels.use_compile(1)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_kernels_equal_eager():
    """Compiled for real (inductor, dynamic shapes): FenBP with its surrogate and Moreau on a ConvNet
    equal the eager rules, float32 and float64 (about 1 minute of compiling on 2 cores)."""
    cases = [("fenchel", torch.float32), ("moreau", torch.float32), ("fenchel", torch.float64)]
    want = {c: run(c[0], 1.0, c[1]) for c in cases}
    kernels.use_compile(True)
    with warnings.catch_warnings():
        # torch's compiler imports modules that emit DeprecationWarnings (torch.utils.mkldnn), which
        # this suite's filter turns into errors; they are torch's, not the kernels'.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("error", kernels.CompileWarning)  # a fallback would prove nothing
        for name, dtype in cases:
            got = run(name, 1.0, dtype)
            rtol = 1e-12 if dtype == torch.float64 else 2e-5
            close(got[0], want[(name, dtype)][0], rtol)
            close(got[1], want[(name, dtype)][1], rtol)
    assert all(k.compiled is not None for k in (kernels._FENBP, kernels._MOREAU))


@pytest.mark.parametrize("name", ["fenchel", "moreau"])
@pytest.mark.parametrize("step", [1e-3, 1e-5])
def test_kernel_path_in_float32_equals_float64(name, step, monkeypatch):
    """The kernel path in float32 gives the float64 directions to float32 rounding at small steps
    (the kernels take increments, never nearly equal differences)."""
    monkeypatch.setattr(kernels.torch, "compile", lambda fn, **kw: fn)
    kernels.use_compile(True)
    got, want = run(name, step, torch.float32)[0], run(name, step, torch.float64)[0]
    for u, v in zip(got, want, strict=True):
        assert float((u.double() - v).abs().max()) <= 1e-4 * float(v.abs().max())
