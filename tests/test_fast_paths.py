"""Fast paths equal the plain ones in float64 (issue 16): the Gram and coefficient forms of the
row solves (004 eq. 44, App. B) against dense algebra written here, per-output CG against one CG per
row, and the fused vjp segments of the backprop sweep against stage-by-stage vjps."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moreaugrad as mg
from moreaugrad.lstsq import CG, Exact, solve_weight
from moreaugrad.sweep import record
from moreaugrad.types import Dual, StateUpdate


@pytest.fixture(autouse=True)
def _float64():
    """Every check here is in float64 (the module's own default, restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def dense_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``A~ = [a, 1]``, built here from the definition (patches by unfold for a convolution)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        a = x.reshape(-1, x.shape[-1])
    return torch.cat([a, torch.ones(a.shape[0], 1)], 1) if module.bias is not None else a


def dense_cg(M: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Textbook CG on ``M v = b`` (vectors), ``steps`` steps from 0."""
    v, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(steps):
        Mp = M @ p
        a = rr / (p @ Mp)
        v, r = v + a * p, r - a * Mp
        rr, rr_old = r @ r, rr
        p = r + rr / rr_old * p
    return v


def case(kind: str, batch: int):
    torch.manual_seed(1)
    if kind == "linear":
        m, x = nn.Linear(6, 4), torch.randn(batch, 6)
    else:
        m, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(batch, 2, 5, 5)
    site = record(mg.Chain(nn.Sequential(m)), x).sites[0]
    r = torch.randn_like(site.x)
    return m, x, site, r


def as_matrix(m: nn.Module, d: dict) -> torch.Tensor:
    W = d["weight"].reshape(m.weight.shape[0], -1)
    return torch.cat([W, d["bias"][:, None]], 1) if "bias" in d else W


def rows_of(m: nn.Module, r: torch.Tensor) -> torch.Tensor:
    return r.flatten(2).transpose(1, 2).reshape(-1, r.shape[1]) if isinstance(m, nn.Conv2d) else r


@pytest.mark.parametrize("shape,kernel,padding", [
    ((3, 2, 6, 7), (3, 3), (1, 1)), ((2, 3, 5, 5), (2, 3), (0, 1)), ((4, 1, 4, 6), (1, 1), (0, 0)),
    ((2, 2, 7, 5), (3, 2), (2, 0)), ((2, 2, 3, 3), (3, 3), (0, 0)), ((1, 3, 8, 8), (5, 5), (2, 2)),
    ((2, 4, 2, 9), (1, 4), (3, 0)), ((2, 10, 6, 5), (3, 3), (1, 1)), ((3, 6, 9, 7), (5, 5), (2, 1)),
    ((2, 3, 4, 5), (3, 3), (0, 0)), ((2, 7, 3, 3), (3, 3), (0, 0))])
def test_shifted_gram_equals_the_patches_gram(shape, kernel, padding):
    """A stride-1 convolution's Gram matrix from shifted products of its input equals ``a^T a``
    and ``a^T 1`` of the unfolded patches to 1e-12 in float64: square and rectangular kernels,
    no, equal and unequal padding (wider than the kernel's reach too), 1x1, kernel the image size,
    windows without a common core row (``Ho = kh - 1``) and maps too small for the row form."""
    from moreaugrad.lstsq import conv_gram

    torch.manual_seed(0)
    x = torch.randn(shape)
    a = F.unfold(x, kernel, 1, padding, 1).transpose(1, 2).reshape(-1, shape[1] * kernel[0] * kernel[1])
    g, s = conv_gram(x, kernel, padding)
    torch.testing.assert_close(g, a.T @ a, rtol=0, atol=1e-12 * float((a.T @ a).abs().max()))
    torch.testing.assert_close(s, a.sum(0), rtol=0, atol=1e-12 * float(a.abs().sum(0).max()))
    # Symmetric to rounding (a diagonal block's own product need not be bit-symmetric); the solves
    # read one triangle.
    torch.testing.assert_close(g, g.T, rtol=0, atol=1e-14 * float(g.abs().max()))


def test_shifted_gram_over_a_grid_of_shapes():
    """Every combination of small maps, kernels (taller and wider than the map's reach, 1-wide) and
    paddings: the Gram matrix and column sums equal the patches' to 1e-12 in float64."""
    import itertools

    from moreaugrad.lstsq import conv_gram

    torch.manual_seed(0)
    for C, H, W, kh, kw, ph, pw in itertools.product([1, 5], [3, 6], [2, 5], [1, 2, 3, 5], [1, 3, 4],
                                                     [0, 3], [0, 2]):
        if H + 2 * ph < kh or W + 2 * pw < kw:
            continue
        x = torch.randn(2, C, H, W)
        a = F.unfold(x, (kh, kw), 1, (ph, pw), 1).transpose(1, 2).reshape(-1, C * kh * kw)
        g, s = conv_gram(x, (kh, kw), (ph, pw))
        want = a.T @ a
        assert float((g - want).abs().max()) <= 1e-12 * float(want.abs().max()), (C, H, W, kh, kw, ph, pw)
        assert float((s - a.sum(0)).abs().max()) <= 1e-12 * (1 + float(a.abs().sum(0).max()))


@pytest.mark.parametrize("case", ["channels_last", "transposed", "strided", "empty batch", "requires grad"])
def test_shifted_gram_of_unusual_inputs(case):
    """Non-contiguous layouts, an empty batch (a data-parallel rank's shard can be empty) and an
    input that requires grad (no graph is recorded): the same Gram matrix as the patches'."""
    from moreaugrad.lstsq import conv_gram

    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 8)
    x = {"channels_last": x.to(memory_format=torch.channels_last), "transposed": x.transpose(2, 3),
         "strided": x[:, :, ::2], "empty batch": x[:0], "requires grad": x.requires_grad_()}[case]
    a = F.unfold(x.detach(), (5, 3), 1, (2, 1), 1).transpose(1, 2).reshape(-1, 4 * 15)
    g, s = conv_gram(x, (5, 3), (2, 1))
    assert not g.requires_grad
    torch.testing.assert_close(g, a.T @ a, rtol=0, atol=1e-12 * (1 + float((a.T @ a).abs().max())))
    torch.testing.assert_close(s, a.sum(0), rtol=0, atol=1e-12 * (1 + float(a.abs().sum(0).max())))


def test_shifted_gram_in_groups_of_shifts_equals_all_at_once(monkeypatch):
    """The column shifts are taken in groups that bound the temporaries; each shift's sums are its
    own, so one shift at a time gives the same matrix bit for bit."""
    from moreaugrad import lstsq

    torch.manual_seed(0)
    x = torch.randn(3, 6, 9, 7)
    monkeypatch.setattr(lstsq, "GRAM_BUDGET", 10_000)  # every shift of a row shift at once
    whole = lstsq.conv_gram(x, (5, 3), (2, 1))[0]
    monkeypatch.setattr(lstsq, "GRAM_BUDGET", 0)  # groups of one shift
    assert torch.equal(lstsq.conv_gram(x, (5, 3), (2, 1))[0], whole)
    monkeypatch.setattr(lstsq, "GRAM_BUDGET", 0.5)  # a fraction of the input's size
    assert torch.equal(lstsq.conv_gram(x, (5, 3), (2, 1))[0], whole)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_shifted_gram_in_float32_is_as_accurate_as_the_patches_gram(scale):
    """In float32 the shifted Gram matrix is within float32 rounding of the float64 one, at small
    and large inputs (its window sums are kept in float64): no worse than the patches' GEMM."""
    from moreaugrad.lstsq import conv_gram

    torch.manual_seed(0)
    x = scale * torch.relu(torch.randn(16, 4, 12, 12))
    want, want_s = conv_gram(x, (5, 5), (2, 2))
    got, got_s = conv_gram(x.float(), (5, 5), (2, 2))
    a = F.unfold(x.float(), (5, 5), 1, (2, 2), 1).transpose(1, 2).reshape(-1, 100)
    gemm = float(((a.T @ a).double() - want).abs().max())
    err = float((got.double() - want).abs().max())
    assert err <= max(gemm, 1e-6 * float(want.abs().max()))
    torch.testing.assert_close(got_s.double(), want_s, rtol=1e-6, atol=0)


def test_strided_convolutions_keep_the_patches_gram():
    """Stride or dilation other than 1 takes the unfolded patches (the shifted form needs stride 1);
    the Gram matrix is the patches' either way, and the CG cost model reads which one it is."""
    from moreaugrad.lstsq import _by_layer, _Rows

    torch.manual_seed(0)
    x = torch.randn(3, 2, 7, 7)
    for m, shifted in ((nn.Conv2d(2, 3, 3, padding=1), True), (nn.Conv2d(2, 3, 3, stride=2), False),
                       (nn.Conv2d(2, 3, 3, dilation=2, padding=2), False)):
        rows = _Rows(x, m, m(x).shape)
        assert rows.shifted == shifted
        # Off the CPU every convolution takes the patches (conv_gram's small products are
        # launch-bound on a GPU); the meta device stands in for one here.
        assert not _Rows(x.to("meta"), m, m(x).shape).shifted
        A = dense_rows(m, x)
        torch.testing.assert_close(rows.gram(), A.T @ A, rtol=1e-12, atol=1e-12)
        assert _by_layer(rows, 1, 1) != _by_layer(rows, 1000, 1000)  # few cheap steps: the layer


@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("conv", [dict(kernel_size=5, padding=2), dict(kernel_size=3, stride=2),
                                  dict(kernel_size=1)])
def test_patches_gram_in_blocks_equals_one_gemm(batch, conv):
    """The patches' Gram matrix (every convolution off the CPU, strided ones on it) is summed over
    blocks of samples, each about the input's size: equal to ``a^T a`` and ``a^T 1`` of all the
    patches at once to 1e-12 in float64, and in float32 within float32 rounding of it."""
    from moreaugrad.lstsq import PATCH_BLOCK, patches_gram

    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, **conv)
    x = torch.relu(torch.randn(batch, 3, 9, 9, dtype=torch.float64))
    K = 3 * m.kernel_size[0] * m.kernel_size[1]
    per_block = max(1, PATCH_BLOCK * x[0].numel() * batch // (K * m(x).shape[2:].numel()))
    if conv["kernel_size"] == 5 and batch > 1:  # 25x the input: several blocks
        assert per_block < batch
    a = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2).reshape(-1, K)
    args = m.kernel_size, m.padding, m.stride, m.dilation
    g, s = patches_gram(x, *args)
    torch.testing.assert_close(g, a.T @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, a.sum(0), rtol=1e-12, atol=1e-12)
    g32, s32 = patches_gram(x.float(), *args)
    torch.testing.assert_close(g32.double(), g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))
    torch.testing.assert_close(s32.double(), s, rtol=1e-5, atol=1e-5 * float(s.abs().max()))


# batch 2 of a Linear(6, 4) has fewer rows than columns (the coefficient form); batch 9 has more.
CASES = [("linear", 2), ("linear", 9), ("conv", 1), ("conv", 3)]


@pytest.mark.parametrize("kind,batch", CASES)
@pytest.mark.parametrize("steps", [1, 3, 6])
@pytest.mark.parametrize("per_output", [False, True])
@pytest.mark.parametrize("path", ["chosen", "gram", "layer"])
def test_cg_rows_equal_dense_cg(kind, batch, steps, per_output, path, monkeypatch):
    """``CG(k)`` and ``CG(k, per_output=True)`` on the rows equal dense CG on ``kappa A~^T A~ + c I``:
    one CG on all weights (Kronecker form), or one per output row; through the Gram matrix and
    through the layer's kernels alike, whichever the cost model would pick."""
    import moreaugrad.lstsq as lstsq

    if path != "chosen":
        monkeypatch.setattr(lstsq, "_by_layer", lambda rows, steps, out: path == "layer")
    m, x, site, r = case(kind, batch)
    kappa, c, scale = 1.3, 0.7, 0.4
    A = dense_rows(m, x)
    M = kappa * A.T @ A + c * torch.eye(A.shape[1])
    B = (scale + kappa) * rows_of(m, r).T @ A  # (out, k~)
    if per_output:
        want = torch.stack([dense_cg(M, b, steps) for b in B])
    else:
        big = torch.kron(torch.eye(B.shape[0]), M)
        want = dense_cg(big, B.reshape(-1), steps).reshape(B.shape)
    got, info = solve_weight(site, r, scale, kappa, c, CG(steps, per_output=per_output))
    torch.testing.assert_close(as_matrix(m, got), -want, rtol=1e-10, atol=1e-12)
    # k steps, or fewer once the residual is at the rounding of b (batch 2: a 2-D coefficient space)
    assert info.iterations == steps or (info.iterations < steps and info.residual <= 1e-14 * float(B.norm()))


def test_cg_stops_at_the_rounding_of_b():
    """CG(k) on a problem of fewer than k dimensions stops once its residual is at the rounding of
    the right-hand side (a control chain's 1-D weight problems: one step, not three), with the
    exact answer, and reports the steps it took."""
    from moreaugrad.lstsq import cg

    M = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    b = torch.tensor([1.0, -2.0])
    (x,), info = cg(lambda v: [M @ v[0]], [b], 5, 1)
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-14, atol=1e-14)
    assert info.iterations == 2 and info.converged is None
    P = mg.control.Pendulum(horizon=10)
    chain = P.chain(P.initial_controls(torch.float64) + 0.2)
    result = mg.Oracle(chain, P.objective, mg.rules.proxprop(tau_theta=1.0, method=CG(3)))(None)
    assert {i.weight.iterations for i in result.info if i.weight.iterations} == {1}


@pytest.mark.parametrize("kind,batch", CASES)
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_exact_rows_equal_dense_solve(kind, batch, mu):
    """The Gram closed form (004 eq. 44, with the bias block written analytically) and the
    push-through form equal the dense solve, also with ``r(v) = mu ||v||^2/2`` inside."""
    m, x, site, r = case(kind, batch)
    kappa, c, scale = 1.3, 0.7, 0.4
    A = dense_rows(m, x)
    W = as_matrix(m, dict(m.named_parameters())).detach()
    B = (scale + kappa) * rows_of(m, r).T @ A + mu * W
    want = torch.linalg.solve(kappa * A.T @ A + (c + mu) * torch.eye(A.shape[1]), B.T).T
    got, _ = solve_weight(site, r, scale, kappa, c, Exact(), mu=mu)
    torch.testing.assert_close(as_matrix(m, got), -want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,batch", CASES)
def test_per_output_cg_tends_to_exact(kind, batch):
    """Per-output CG solves the same system: its error falls with ``k`` and, a few sweeps past
    ``k = k~`` (where exact arithmetic would end), it equals the exact solve."""
    m, x, site, r = case(kind, batch)
    exact, _ = solve_weight(site, r, 0.0, 1.0, 0.5, Exact())
    k = dense_rows(m, x).shape[1]
    errs = []
    for steps in (1, 2, 3 * k):
        got, _ = solve_weight(site, r, 0.0, 1.0, 0.5, CG(steps, per_output=True))
        errs.append(float((as_matrix(m, got) - as_matrix(m, exact)).abs().max()))
    assert errs[-1] < 1e-10 * float(as_matrix(m, exact).abs().max())
    assert errs[0] > errs[1] and errs[0] > errs[-1]


def test_per_output_on_a_stage_without_rows_is_reported():
    """A stage with no row form runs one CG for all weights, and its report says so."""
    chain = mg.Chain(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)))
    rule = mg.rules.proxprop(method=CG(3, per_output=True))
    result = mg.Oracle(chain, mg.losses.CrossEntropy(), rule)(torch.randn(5, 4), torch.arange(5) % 3)
    assert "per_output needs a Linear or Conv2d" in result.info[1].weight.method
    assert "per_output" not in result.info[0].weight.method


# -- the fused vjp segments of the backprop sweep ---------------------------------------------------


def _per_stage(rule: mg.rules.Rule, tau: int) -> mg.rules.Rule:
    """The same rule given per stage: a sequence of rules is never fused."""
    return mg.rules.Rule(objective=rule.objective, state=[rule.state] * tau, weight=[rule.weight] * tau)


@pytest.mark.parametrize("tau", [1e-5, 1.0])
def test_relu_rules_in_blocks_equal_one_piece(tau, monkeypatch):
    """Moreau's and FenBP's ReLU states run block by block (``kernels.row_blocks``): with one row
    per block they equal one piece, the signals bit for bit and FenBP's surrogate term (a sum of
    the blocks' sums) to 1e-12 in float64; in float32, blocked, within float32's rounding of the
    float64 answer at small and large steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 3))
    x, y = torch.randn(6, 2, 6, 6), torch.arange(6) % 3
    results = {}
    for rule_name, rule in (("moreau", mg.rules.moreau(gamma=tau, alpha=tau)),
                            ("fenchel", mg.rules.fenchel(tau))):
        for block in (1, 1 << 40):
            monkeypatch.setattr(mg.kernels, "BLOCK_BYTES", block)
            oracle = mg.Oracle(model, mg.losses.CrossEntropy(), rule)
            results[rule_name, block] = oracle(x.requires_grad_(), y)
        one, blocked = results[rule_name, 1 << 40], results[rule_name, 1]
        assert torch.equal(blocked.input_grad, one.input_grad)
        for a, b in zip(blocked.directions, one.directions, strict=True):
            for n in a or {}:
                assert torch.equal(a[n], b[n])
        if rule_name == "fenchel":
            torch.testing.assert_close(mg.rules.contrastive_surrogate(blocked),
                                       mg.rules.contrastive_surrogate(one), rtol=1e-12, atol=0)
        monkeypatch.setattr(mg.kernels, "BLOCK_BYTES", 1)
        low = mg.Oracle(model.float(), mg.losses.CrossEntropy(), rule)(x.detach().float().requires_grad_(), y)
        model.double()
        scale = float(one.input_grad.abs().max())
        assert float((low.input_grad.double() - one.input_grad).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("surrogate", [True, False])
def test_fenchel_fuses_its_affine_stages(surrogate, monkeypatch):
    """FenBP's affine stages take the vjp: a run of them (a control chain's steps, Flatten and
    Linear) shares one autograd call, but for the output stage while the surrogate's term is asked
    for. Directions, signals and surrogate terms equal the stage-by-stage sweep to 1e-10 in float64."""
    P = mg.control.Pendulum(horizon=20)
    chain = P.chain(P.initial_controls(torch.float64) + 0.3)
    rule = mg.rules.fenchel(0.5, surrogate=surrogate)
    oracle = mg.Oracle(chain, P.objective, rule)
    assert oracle._fusable() == ([False] + [True] * (18 if surrogate else 19) + [False] * surrogate,
                                 not surrogate)
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    have = oracle(None)
    # the objective (a callable: its own call), the output stage, the rest; or the stages in one
    assert len(calls) == (3 if surrogate else 2)
    monkeypatch.undo()
    want = mg.Oracle(chain, P.objective, _per_stage(rule, 20))(None)
    for a, b in zip(have.directions, want.directions, strict=True):
        torch.testing.assert_close(a["w"], b["w"], rtol=1e-10, atol=1e-14)
    if surrogate:
        torch.testing.assert_close(mg.rules.contrastive_surrogate(have), mg.rules.contrastive_surrogate(want),
                                   rtol=1e-12, atol=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4), nn.Tanh(),
                          nn.Linear(4, 3))
    x, y = torch.randn(5, 2, 5, 5), torch.arange(5) % 3
    fused = mg.Oracle(model, mg.losses.CrossEntropy(), rule)
    assert fused._fusable()[0][:4] == [False, False, False, True]  # Flatten and Linear: one call
    have = fused(x.requires_grad_(), y)
    want = mg.Oracle(model, mg.losses.CrossEntropy(), _per_stage(rule, 6))(x, y)
    for a, b in zip(have.directions, want.directions, strict=True):
        for n in a or {}:
            torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(have.input_grad, want.input_grad, rtol=1e-10, atol=1e-14)
    if surrogate:
        torch.testing.assert_close(mg.rules.contrastive_surrogate(have), mg.rules.contrastive_surrogate(want),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["mlp", "mlp_layers", "convnet", "residual", "batchnorm", "pendulum",
                                  "dynamics"])
@pytest.mark.parametrize("with_input", [False, True])
def test_fused_backprop_equals_stage_by_stage(name, with_input):
    """Backprop with fused segments (one autograd call) equals stage-by-stage vjps to 1e-10 in
    float64: directions, the input signal and which parameters get none."""
    from helpers import as_chain, make

    results = []
    for fuse in (True, False):
        case = make(name)
        chain = as_chain(case.model)
        rule = mg.rules.backprop()
        rule = rule if fuse else _per_stage(rule, len(chain))
        x = case.x.clone().requires_grad_(with_input)
        results.append(mg.Oracle(chain, case.objective, rule)(x, case.y))
    fused, plain = results
    for a, b in zip(fused.directions, plain.directions, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys()
            for n in a:
                torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-14)
    if with_input:
        torch.testing.assert_close(fused.input_grad, plain.input_grad, rtol=1e-10, atol=1e-14)


@dataclass(frozen=True)
class _HalfTanh(mg.rules.Grad):
    """Backprop, except that a Tanh stage passes half its vjp on: not a plain vjp there."""


@mg.rules.register(_HalfTanh, "state", nn.Tanh)
def _half_tanh_state(rule, site, signal):
    dx, _ = site.vjp(signal.dual(site.x.detach()), weights=False)
    return StateUpdate(Dual(0.5 * dx))


def test_fused_segments_stop_where_a_rule_is_not_a_vjp():
    """A stage whose rule is not a plain vjp splits the chain into fused pieces around it, and the
    result equals the unfused sweep to 1e-10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    rule = mg.rules.Rule(objective=mg.rules.Grad(), state=_HalfTanh(), weight=mg.rules.Grad())
    x, y = torch.randn(7, 5), torch.arange(7) % 3
    oracle = mg.Oracle(model, mg.losses.CrossEntropy(), rule)
    # Linear-ReLU-Linear fuse; the Tanh is its own; the last Linear is alone above it.
    assert oracle._fusable() == ([False, True, True, False, False], True)
    have = oracle(x, y)
    want = mg.Oracle(model, mg.losses.CrossEntropy(), _per_stage(rule, 5))(x, y)
    for a, b in zip(have.directions, want.directions, strict=True):
        if a is not None:
            for n in a:
                torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-14)
    plain = mg.Oracle(model, mg.losses.CrossEntropy())(x, y)  # the Tanh's half shows below it
    torch.testing.assert_close(have.directions[0]["weight"], 0.5 * plain.directions[0]["weight"])


class _SeparateGrad(mg.rules.Grad):
    """``grad h`` as its own autograd call: the objective line that does not fuse."""

    def objective(self, h, output, target, horizon=1):
        return super().objective(h, output, target, horizon)


@pytest.mark.parametrize("input_grad", [False, True])
def test_objective_fused_into_the_top_segment_equals_its_own_call(input_grad):
    """Backprop takes ``grad h`` in the same autograd call as the top stages' vjps (as
    ``loss.backward()``): loss, directions and the input's gradient equal the sweep with the
    objective's gradient taken on its own, to 1e-10 in float64, and to float32's rounding in
    float32; the top stage alone (its neighbour below not a vjp) fuses with the objective too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.arange(7) % 3
    separate = mg.rules.Rule(objective=_SeparateGrad(), state=mg.rules.Grad(), weight=mg.rules.Grad())
    half = mg.rules.Rule(objective=mg.rules.Grad(), state=_HalfTanh(), weight=mg.rules.Grad())
    half_separate = mg.rules.Rule(objective=_SeparateGrad(), state=_HalfTanh(), weight=mg.rules.Grad())
    for fused_rule, plain_rule in ((mg.rules.backprop(), separate), (half, half_separate)):
        fused, plain = mg.Oracle(model, mg.losses.CrossEntropy(), fused_rule), \
            mg.Oracle(model, mg.losses.CrossEntropy(), plain_rule)
        assert fused._fusable()[1] and not plain._fusable()[1]
        want = plain(x.requires_grad_(input_grad), y)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            m = model.to(dtype)
            have = fused(x.detach().to(dtype).requires_grad_(input_grad), y)
            torch.testing.assert_close(have.loss.double(), want.loss, rtol=tol, atol=tol)
            for a, b in zip(have.directions, want.directions, strict=True):
                assert (a is None) == (b is None)
                for n in a or {}:
                    torch.testing.assert_close(a[n].double(), b[n], rtol=tol, atol=tol)
            if input_grad:
                torch.testing.assert_close(have.input_grad.double(), want.input_grad, rtol=tol, atol=tol)
            m.double()


def test_objective_fused_reports_a_non_finite_loss_as_before():
    """With the objective inside the top segment its gradient is never formed: a NaN loss (a NaN
    weight) is traced back to the objective and reported by the unfused sweep's message, also
    under ``torch.inference_mode()``; nothing is written to ``.grad``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    oracle = mg.Oracle(model, mg.losses.CrossEntropy())
    assert oracle._fusable()[1]
    x, y = torch.ones(5, 3), torch.arange(5) % 2
    for mode in (contextlib.nullcontext, torch.inference_mode):
        with mode(), pytest.raises(mg.NonFiniteError, match=re.escape(
                "the signal entering stage 3 (Linear) (from the objective) is not finite")):
            oracle.backward(x, y)
        assert all(p.grad is None for p in model.parameters())


def test_only_known_losses_join_the_top_segment():
    """A callable objective keeps its own autograd call: it may read the weights (the oracle
    differentiates ``h`` through the output only, as before), or have an infinite gradient at a
    finite loss that a ReLU below would hide; a chain without weights or input gradient does not
    fuse at all."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.arange(5) % 2
    ce = mg.losses.CrossEntropy()
    reads_weight = mg.Oracle(model, lambda out, t: ce(out, t) + 10 * model[2].weight.pow(2).sum())
    want = mg.Oracle(model, ce, mg.rules.Rule(objective=_SeparateGrad(), state=mg.rules.Grad(),
                                              weight=mg.rules.Grad()))(x, y)
    for a, b in zip(reads_weight(x, y).directions, want.directions, strict=True):
        for n in a or {}:
            torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-14)
    hidden = mg.Oracle(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), lambda out, t: out.sqrt().sum())
    with pytest.raises(mg.NonFiniteError, match="from the objective"):
        hidden(x, None)
    frozen = nn.Sequential(nn.Linear(3, 4).requires_grad_(False), nn.ReLU())
    result = mg.Oracle(frozen, lambda out, t: out.sum())(x, None)
    assert result.directions == [None, None] and torch.isfinite(result.loss)
    assert mg.Oracle(nn.Sequential(nn.ReLU()), ce)(x[:, :2], y).directions == [None]


def test_relu_difference_equals_the_piecewise_integral():
    """FenBP's five-pass ReLU difference equals the generic piecewise integral exactly, at kinks,
    on both sides of 0, for both signs of the move, in float32 and float64."""
    from moreaugrad.rules.fenchel import _piecewise_difference, _relu_difference

    generic = _piecewise_difference([0.0], [0.0, 1.0])
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        u = torch.cat([torch.randn(1000, dtype=dtype), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0, -2.0],
                                                                       dtype=dtype)])
        for scale in (1e-6, 1.0, 10.0):
            delta = scale * torch.randn_like(u)
            delta[:3] = torch.tensor([0.0, 2.0, -2.0], dtype=dtype)
            want = generic(u, delta)
            assert torch.equal(_relu_difference(u, delta), want)
            if dtype == torch.float64:
                torch.testing.assert_close(want, torch.relu(u) - torch.relu(u - delta), rtol=0, atol=1e-12)


def test_affine_dynamics_weight_closed_form_equals_the_solver():
    """A dynamics step declared affine in its control takes Moreau's linear weight closed form (the
    vjp); on the pendulum (explicit Euler: the torque enters linearly) it equals the two
    quasi-Newton steps of the generic weight solve to 1e-10."""
    P = mg.control.Pendulum(horizon=30)
    torch.manual_seed(0)
    controls = torch.randn(30, 1)
    x0 = torch.tensor([[0.3, -0.1], [0.0, 0.0]])
    results = []
    for affine in (True, False):
        chain = mg.Chain.from_dynamics(P.dynamics, controls.clone(), x0, affine=affine)
        results.append(mg.Oracle(chain, P.objective, mg.rules.moreau(0.5, 2.0))(x0))
    closed, generic = results
    assert closed.info[0].weight.method == "closed form: linear"
    assert generic.info[0].weight.method != "closed form: linear"
    for a, b in zip(closed.directions, generic.directions, strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("discretization", ["explicit", "semi_implicit", "rk4"])
def test_pendulum_declares_affine_control_only_where_it_is(discretization):
    """Euler steps are affine in the torque (second differences in w vanish); RK4's are not, and
    the chain is told so."""
    P = mg.control.Pendulum(horizon=3, discretization=discretization)
    x = torch.tensor([[0.4, -0.3], [1.2, 0.5]])
    w = torch.tensor([0.7])
    second = P.dynamics(w + 1.0, x) - 2 * P.dynamics(w, x) + P.dynamics(w - 1.0, x)
    affine = P.chain().model[0].affine
    assert affine == (discretization != "rk4")
    assert (float(second.abs().max()) < 1e-12) == affine


def test_tied_weights_are_not_fused_and_equal_autograd():
    """A Linear used by two stages (tied weights): its gradient is the sum of both stages' parts,
    as loss.backward() gives it, not twice the total (those stages are not fused)."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 5), torch.arange(6) % 3
    oracle = mg.Oracle(model, mg.losses.CrossEntropy())
    assert oracle._fusable()[0][:4] == [False] * 4
    oracle.backward(x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mg.losses.CrossEntropy()(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-13)


def test_control_rows_fuse_and_equal_autograd():
    """The controls of a dynamics chain are rows of one parameter, each stage its own row: the
    backprop oracle fuses the whole roll-out into one autograd call, and its gradient equals
    loss.backward() through the roll-out to 1e-10 in float64."""
    P = mg.control.Pendulum(horizon=20)
    chain = P.chain(P.initial_controls(torch.float64) + 0.3)
    oracle = mg.Oracle(chain, P.objective)
    assert oracle._fusable() == ([False] + [True] * 19, True)
    oracle.backward()
    got = chain.controls.grad.clone()
    chain.zero_grad()
    P.objective(chain()).backward()
    torch.testing.assert_close(got, chain.controls.grad, rtol=1e-10, atol=1e-14)



def test_backward_hands_its_directions_to_grad_and_guards_them():
    """Where ``.grad`` is None, ``backward`` puts the direction itself in ``.grad`` (no copy, as
    autograd does); the values equal ``oracle(x, y)``'s. A later in-place change of ``.grad`` (a
    second backward) makes reading the first result's directions raise, never return changed
    values; a tied weight (two stages, two directions) is never handed over, and equals autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(7, 5), torch.arange(7) % 3
    oracle = mg.Oracle(model, mg.losses.CrossEntropy())
    want = oracle(x, y).directions
    first = oracle.backward(x, y)
    assert first.directions[0]["weight"] is model[0].weight.grad
    for d, w in zip(first.directions, want, strict=True):
        if d is not None:
            for n in d:
                torch.testing.assert_close(d[n], w[n], rtol=0, atol=0)
    second = oracle.backward(x, y)  # accumulates in place into the handed-over tensors
    torch.testing.assert_close(model[0].weight.grad, 2 * want[0]["weight"])
    with pytest.raises(RuntimeError, match="modified in place since"):
        _ = first.directions
    torch.testing.assert_close(second.directions[0]["weight"], want[0]["weight"], rtol=0, atol=0)

    lin = nn.Linear(4, 4)
    tied = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 2))
    xt, yt = torch.randn(6, 4), torch.arange(6) % 2
    res = mg.Oracle(tied, mg.losses.CrossEntropy()).backward(xt, yt)
    got = lin.weight.grad.clone()
    assert all(d["weight"] is not lin.weight.grad for d in (res.directions[0], res.directions[2]))
    tied.zero_grad()
    mg.losses.CrossEntropy()(tied(xt), yt).backward()
    torch.testing.assert_close(got, lin.weight.grad)


class _AddParameter(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.b = nn.Parameter(torch.randn(*shape))

    def forward(self, x):
        return x + self.b


def test_one_memory_under_two_directions_is_copied():
    """Autograd passes one gradient on unchanged through ``x + b`` (and a reshape): two parameters'
    directions, or a direction and the input's gradient, can be one memory under two tensors. None
    of them is handed over to ``.grad``, so a second backward accumulates exactly twice autograd's
    gradient into each (review finding)."""
    torch.manual_seed(0)
    net = nn.Sequential(_AddParameter(2, 6), nn.Unflatten(1, (2, 3)), _AddParameter(2, 2, 3))
    x, y = torch.randn(2, 6, requires_grad=True), torch.randn(2, 2, 3)
    oracle = mg.Oracle(net, nn.MSELoss(reduction="sum"))
    first = oracle.backward(x, y)
    assert net[0].b.grad.untyped_storage().data_ptr() != net[2].b.grad.untyped_storage().data_ptr()
    input_grad = first.input_grad.clone()
    oracle.backward(x, y)
    net2 = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    x.grad = None
    nn.MSELoss(reduction="sum")(net(x), y).backward()
    for got, p in zip(net2, net.parameters(), strict=True):
        torch.testing.assert_close(got, 2 * p.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first.input_grad, input_grad)  # the first result's input_grad unchanged


def test_an_accumulated_result_copies_prints_and_compares():
    """A result of ``backward`` deep-copies, pickles and ``torch.save``s as a plain result (the copy
    owns its tensors), and its repr and equality never raise, even after ``.grad`` changed."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    oracle = mg.Oracle(model, mg.losses.CrossEntropy(), mg.rules.moreau())
    result = oracle.backward(x, y)
    for clone in (copy.deepcopy(result), pickle.loads(pickle.dumps(result))):
        assert type(clone) is mg.OracleResult
        torch.testing.assert_close(clone.directions[0]["weight"], result.directions[0]["weight"])
    buf = io.BytesIO()
    torch.save(result, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    torch.testing.assert_close(saved.directions[2]["bias"], result.directions[2]["bias"])
    oracle.backward(x, y)  # .grad changes in place: reading result.directions now raises
    assert repr(result).startswith("Accumulated(") and result == result
    with pytest.raises(RuntimeError, match="Clone the directions"):
        _ = result.directions


# -- jvp of a small function by two reverse passes ----------------------------------------------

class _Square(torch.autograd.Function):
    """x^2 with a backward that can be differentiated again, and no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Once(_Square):
    """x^2 with a backward that cannot be differentiated again."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _OnceWithJvp(_Once):
    """The same, with a forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.x = x
        return x * x

    @staticmethod
    def jvp(ctx, t):
        return 2 * ctx.x * t


def _jvp_cases():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    K, Y = torch.randn(3, 2, 3, generator=g), torch.randn(4, 2, 9, generator=g)
    cases = {}
    for disc in ("explicit", "rk4"):
        p = mg.control.Pendulum(discretization=disc)
        x0 = torch.tensor([[0.3, -1.2]])
        cases[f"pendulum {disc}, control"] = (lambda w, p=p, x0=x0: p.dynamics(w, x0), (torch.tensor([0.7]),))
        cases[f"pendulum {disc}, state and control"] = (lambda x, w, p=p: p.dynamics(w, x),
                                                        (x0, torch.tensor([0.7])))
    cases["linear with scalars"] = (lambda w: 0.5 * torch.tanh(F.linear(X, w)) + 1.0, (W,))
    cases["conv1d"] = (lambda k: F.relu(F.conv1d(Y, k, padding=1)), (K,))
    cases["one primal unused"] = (lambda a, b: a.sin() * 2.0, (W, X))
    cases["constant"] = (lambda a: torch.ones(3), (W,))
    return cases


@pytest.mark.parametrize("name", list(_jvp_cases()))
def test_small_jvp_by_two_vjps_equals_forward_mode(name, monkeypatch):
    fn, primals = _jvp_cases()[name]
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(p.shape, generator=g) for p in primals)
    assert sum(p.numel() for p in primals) <= mg.lstsq.SMALL_JVP
    out, jv = mg.lstsq.jvp(fn, primals, tangents)
    monkeypatch.setattr(mg.lstsq, "SMALL_JVP", -1)  # forward mode
    out_ref, jv_ref = mg.lstsq.jvp(fn, primals, tangents)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(jv, jv_ref, rtol=1e-12, atol=1e-14)
    assert not jv.requires_grad and not out.requires_grad


@pytest.mark.parametrize("size", [3, mg.lstsq.SMALL_JVP + 1], ids=["small", "large"])
def test_jvp_through_custom_functions(size):
    # A part of J v cut by a once_differentiable backward is never read as zero: forward mode
    # takes it where the Function has a jvp, else the error names both routes; a Function whose
    # backward is differentiable gets J v by two vjps when it has no jvp.
    x, v = torch.randn(size), torch.randn(size)
    expected = (2 * x + x.exp()) * v
    for function in (_Square, _OnceWithJvp):
        _, jv = mg.lstsq.jvp(lambda a, f=function: f.apply(a) + a.exp(), (x,), (v,))
        torch.testing.assert_close(jv, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="neither route applies.*not differentiable.*jvp function"):
        mg.lstsq.jvp(lambda a: _Once.apply(a) + a.exp(), (x,), (v,))


def test_proxprop_on_the_pendulum_is_the_same_by_either_jvp(monkeypatch):
    p = mg.control.Pendulum(horizon=12)
    u = torch.linspace(-1, 1, 12)[:, None]
    rule = mg.rules.proxprop(tau_theta=1.0, tau=1.0, method=CG(3))
    fast = mg.Oracle(p.chain(u.clone()), p.objective, rule)().directions
    monkeypatch.setattr(mg.lstsq, "SMALL_JVP", -1)
    ref = mg.Oracle(p.chain(u.clone()), p.objective, rule)().directions
    for a, b in zip(fast, ref, strict=True):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-13)


# -- dense Jacobians of the second-order steps by batched autograd ---------------------------------

def _by_jacrev(flat, args, argnums):
    out = torch.func.jacrev(flat, argnums=argnums)(*args)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("argnums", [(0, 1), (0,), (1,)])
def test_jacobians_by_batched_autograd_equal_jacrev(argnums):
    from moreaugrad.second_order import _jacrev_by_autograd
    p = mg.control.Pendulum(discretization="rk4")
    W = torch.randn(4, 3)
    cases = [
        (lambda v, x: p.dynamics(v, x).reshape(-1), (torch.tensor([0.7]), torch.tensor([[0.3, -1.2]]))),
        (lambda v, x: torch.tanh(F.linear(x, v.view(4, 3))).reshape(-1), (W.reshape(-1), torch.randn(5, 3))),
        (lambda v, x: (x * 2.0).reshape(-1), (torch.randn(3), torch.randn(2, 2))),  # v unused
        (lambda v, x: torch.ones(3), (torch.randn(3), torch.randn(2))),  # neither used
    ]
    for flat, args in cases:
        fast, ref = _jacrev_by_autograd(flat, args, argnums), _by_jacrev(flat, args, argnums)
        for a, b in zip(fast, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_gauss_newton_by_batched_autograd_equals_jacrev(monkeypatch):
    # The pendulum (one sample) and a small network (per-sample state blocks). Newton's Hessian
    # blocks differentiate a recorded backward, which jacrev cannot wrap: its steps are checked
    # against dense Hessian solves in test_second_order (test_dp_steps_equal_dense_solves).
    from moreaugrad import second_order
    rule = second_order.gauss_newton(gamma=0.5)
    p = mg.control.Pendulum(horizon=8, discretization="rk4")
    u = 0.3 * torch.sin(torch.linspace(0, 6, 8))[:, None]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)

    def run():
        return (mg.Oracle(p.chain(u.clone()), p.objective, rule)().directions
                + mg.Oracle(model, mg.losses.SquaredLoss(), rule)(x, y).directions)

    fast = run()
    monkeypatch.setattr(second_order, "_jacrev_by_autograd", _by_jacrev)
    for a, b in zip(fast, run(), strict=True):
        assert (a is None) == (b is None)
        for n in a or {}:
            torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-14)
