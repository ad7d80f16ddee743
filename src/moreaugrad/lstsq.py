"""Regularised least squares on a stage, exact or by matrix-free conjugate gradient (004 App. B).

Target, proximal and augmented-Lagrangian rules all reduce, on a stage that is linear in the
variable being updated, to one problem. With ``J`` the Jacobian of ``phi_t`` in that variable at the
recorded point and a residual ``r`` (shaped like ``x_t``):

    ``delta = argmin_d  scale <r, J d> + kappa/2 ||J d + r||^2 + c/2 ||d||^2``
    ``      = -(scale + kappa) (kappa J^T J + c I)^{-1} J^T r``

(the first term is absent when ``scale = 0``). ProxProp (004 eq. 11) is ``scale = 0, kappa = 1,
c = 1/tau_theta`` with ``r = tau lambda``; the augmented-Lagrangian weight step (000 Algo 8) is
``scale = beta, c = 1/alpha``; ``c = 0`` is plain least squares, solved for the minimum-norm
``delta`` (target propagation's approximate inverse, 000 eq. 40).

Exact solves use the Gram matrix of the layer input for ``Linear`` and ``Conv2d`` weights (one
batched solve whose size is independent of the batch, 004 eq. 44; on the CPU a stride-1
convolution's from shifted products of its input, :func:`conv_gram`, without unfolding it, else
from its unfolded patches in blocks of samples) and ``W^T W`` for ``Linear`` inputs; :class:`CG`
runs ``k`` matrix-free steps on ``kappa J^T J + c I`` for any stage, with ``J^T`` from the recorded
graph and ``J`` by eager forward-mode AD. For a stage that is not linear in the
variable this is the Gauss-Newton (linearised) step.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction
from torch.nn.attention import SDPBackend, sdpa_kernel

from .chain import plain
from .checks import check_count
from .solvers import axpy, gdot, tolerance, unit_of
from .types import SolveInfo, Weights


@dataclass(frozen=True)
class Exact:
    """Solve exactly: the Gram closed form where one is registered (``Linear``, ``Conv2d``), else CG
    to the relative tolerance ``||residual|| <= tol ||rhs||`` per group (at most ``max_iter`` steps;
    ``tol`` is floored at the dtype's rounding level, see ``solvers.tolerance``).

    ``rcond``: plain least squares (``c = 0``, target propagation's fits and inverses) is solved by
    the pseudo-inverse with singular values below ``rcond`` times the largest dropped (a truncated
    SVD). The exact minimum-norm solution follows directions the data barely determine: with a
    dtype's own cutoff, float32 and float64 disagree there, and ``Oracle.step`` diverges (ReLU MLP
    64-32-32-10 on digits, batch 32, target_prop: loss 2.3 to 1e5 in 30 steps at float64's own
    cutoff, to 1.69 at ``1e-3`` in float32 and float64 alike).
    """

    tol: float = 1e-10
    max_iter: int = 500
    rcond: float = 1e-3


@dataclass(frozen=True)
class CG:
    """``steps`` matrix-free conjugate-gradient iterations from 0 (004 Sec. 5.1 uses 1, 3 or 5).
    Every iterate is a descent direction (004 Prop. 5).

    ``per_output=True`` runs one CG per output unit of a ``Linear`` layer (per output channel of a
    ``Conv2d``), each with its own step sizes, as the authors' code does: the weight problem
    ``V (kappa A~^T A~ + c I) = R^T A~`` separates over the rows of ``V``, so this is block CG on
    the block-diagonal system, at the same cost per step. It reaches the same solution as the
    single CG as ``steps`` grows, by a different path. Other stages (no row form) run one CG for
    all their weights, and their solve report says so.
    """

    steps: int = 3
    per_output: bool = False

    def __post_init__(self) -> None:
        check_count("CG", "steps", self.steps)


Method = Exact | CG


def _budget(method: Method) -> tuple[int, float]:
    """``(steps, tol)``: ``k`` steps and no tolerance for ``CG(k)``, the cap and tolerance of ``Exact``."""
    return (method.steps, 0.0) if isinstance(method, CG) else (method.max_iter, method.tol)


@functools.cache
def _load_forward_ad() -> None:
    """torch 2.13 loads its forward-AD decompositions through ``torch.jit.script`` on first use,
    which warns that it is deprecated: torch's own business, so that one warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                category=DeprecationWarning)
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(1), torch.zeros(1))


SMALL_JVP = 1 << 14
"""Entries of the primals up to which :func:`jvp` takes two reverse passes, not forward mode."""


def jvp(fn: Any, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), J tangents)`` by eager forward-mode AD (dual tensors), or by two reverse
    passes: for an op without a forward-mode formula (``weight_norm``'s kernel), and for small
    primals (at most :data:`SMALL_JVP` entries: a dynamics step, a small layer's weights).

    On the CPU, torch 2.13's forward mode runs the formula of every op that mixes a dual tensor
    with a plain one (``x * 0.5``, ``x @ W`` with only ``W`` dual) through its Python references,
    about 150 us each whatever the size: a pendulum step's jvp took 430 us, against 72 us by two
    reverse passes (which equal it to rounding; on large layers both cost about the same).
    """
    # Attention through its math kernel: the fused CPU/GPU kernels have no forward-mode formula
    # and no double backward.
    with sdpa_kernel(SDPBackend.MATH):
        tried = ""  # why the two reverse passes did not apply (text: an exception would hold their graph)
        if sum(p.numel() for p in primals) <= SMALL_JVP:
            try:
                return _jvp_by_two_vjps(fn, primals, tangents, custom=False)
            except _CustomFunction:  # forward mode first, then the two passes again
                pass
            except (NotImplementedError, RuntimeError) as err:  # no double backward: try forward mode
                if not isinstance(err, NotImplementedError) and "not implemented" not in str(err):
                    raise
                tried = str(err)
        _load_forward_ad()
        try:
            with fwAD.dual_level():
                out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
                primal, tangent = fwAD.unpack_dual(out)
        except NotImplementedError as err:
            if not tried:
                try:
                    return _jvp_by_two_vjps(fn, primals, tangents)
                except NotImplementedError as again:
                    tried = str(again)
            raise NotImplementedError(f"jvp of {fn!r}: neither route applies. Two reverse passes: "
                                      f"{tried}. Forward mode: {err}") from err
    return primal, torch.zeros_like(primal) if tangent is None else tangent


def _jvp_by_two_vjps(fn: Any, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...],
                     custom: bool = True) -> tuple[Tensor, Tensor]:
    """``J v = d/du <J^T u, v>``: the vjp is linear in ``u``, so its vjp against ``v`` is ``J v``.

    Raises ``NotImplementedError`` rather than read a wrong ``J v`` off a vjp that is not
    differentiable in ``u``: where no gradient reaches ``u`` at all, and where a custom autograd
    Function's ``once_differentiable`` backward cut a part of it. A custom Function whose backward
    detaches its result cannot be told apart, so with ``custom=False`` (:func:`jvp`'s first try) a
    graph with any custom Function is refused, and forward mode (its ``jvp``) goes first. A vjp
    that is constant zero by its formula (``round``, ``sign``) is refused too; forward mode gives
    its ``J v``."""
    with torch.enable_grad():
        ps = [p.detach().requires_grad_(True) for p in primals]
        out = fn(*ps)
        if not out.requires_grad:  # out does not depend on the primals
            return out.detach(), torch.zeros_like(out)
        functions = _graph_has([out], lambda node: isinstance(node, BackwardCFunction))
        if functions and not custom:
            raise _CustomFunction(f"jvp: {fn!r} calls a custom autograd Function: forward mode first")
        u = torch.zeros_like(out, requires_grad=True)
        gs = torch.autograd.grad(out, ps, u, create_graph=True, allow_unused=True)
        used = [(g, t) for g, t in zip(gs, tangents, strict=True) if g is not None]
        if not used:  # no primal reaches out
            return out.detach(), torch.zeros_like(out)
        # Each used g is J_i^T u: linear in u, so a second pass reaches u unless the first one cut it.
        cut = any(not g.requires_grad for g, _ in used) or (
            functions and _graph_has([g for g, _ in used], _once_differentiable))
        jv = None if cut else torch.autograd.grad([g for g, _ in used], u, [t for _, t in used],
                                                  allow_unused=True)[0]
        if jv is None:
            raise NotImplementedError(f"jvp: the vjp of {fn!r} is not differentiable (an autograd Function "
                                      f"without a double backward?), so J v cannot be taken by two vjps")
    return out.detach(), jv.detach()


class _CustomFunction(NotImplementedError):
    """:func:`_jvp_by_two_vjps` defers a graph with a custom autograd Function to forward mode."""


def _once_differentiable(node: Any) -> bool:
    """The node a ``once_differentiable`` backward leaves in a recorded gradient (it raises if run)."""
    return type(node).__name__ == "Error"


def _graph_has(roots: list[Tensor], test: Any) -> bool:
    """Whether the autograd graph behind ``roots`` holds a node that passes ``test``."""
    seen: set[Any] = set()
    stack = [t.grad_fn for t in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if test(node):
            return True
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return False


EXACT_RESIDUAL = 8  # in units of eps ||b||: a CG residual at the rounding of the right-hand side


def cg(apply: Any, b: list[Tensor], steps: int, groups: int, tol: float = 0.0,
       metric: Any = None) -> tuple[list[Tensor], SolveInfo]:
    """Conjugate gradient for ``M x = b`` from ``x = 0``, per group; ``M`` must be SPD.

    With ``tol > 0`` it stops when every group's residual is below ``tolerance(tol, ||b_g||)``
    (relative to the right-hand side); with ``tol = 0`` it runs ``steps`` steps (``CG(k)``), or
    fewer when every residual is down to the rounding of ``b`` (``EXACT_RESIDUAL eps ||b_g||``:
    solved exactly, as on a problem of fewer than ``k`` dimensions).
    ``metric``, when given, is a linear map ``P`` (SPD, commuting with ``M``) that makes the inner
    product ``<P u, v>``: CG applies ``P`` once per step, to the residual, keeps ``P p`` by
    recurrence and calls ``apply(p, P p)``, so an operator that is a polynomial in ``P`` costs
    nothing more. A non-positive ``<p, M p>`` (``M`` not positive definite) stops the solve and is reported.
    """
    # CG is linear in b: run it on b in one unit for all groups (a power of 2, so exactly), so
    # that <r, r> of a tiny right-hand side does not underflow to 0 in float32.
    unit = unit_of(b)
    if unit != 1.0:
        x, info = cg(apply, [t / unit for t in b], steps, groups, tol, metric)
        return [xi * unit for xi in x], info
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = r
    Pr = r if metric is None else metric(r)
    Pp = Pr
    rr = gdot(Pr, r, groups)
    # CG(k) (tol = 0) still stops once the residual is at the rounding of b: the problem's
    # dimension reached (a control's 1-D weight problem is exact after one step), further steps
    # would only rework rounding, at the cost of an operator each.
    bound = tolerance(tol, rr.sqrt()) if tol > 0 else EXACT_RESIDUAL * torch.finfo(rr.dtype).eps * rr.sqrt()
    it, message = 0, ""
    for it in range(1, steps + 1):  # noqa: B007 - reported
        Ap = apply(p) if metric is None else apply(p, Pp)
        pAp = gdot(Pp, Ap, groups)
        live = rr > 0
        if bool((live & (pAp <= 0)).any()):
            message = "operator not positive definite"
            it -= 1
            break
        a = torch.where(live, rr / pAp.where(live, torch.ones_like(pAp)), 0.0)
        x = axpy(x, a, p, groups)
        r = axpy(r, -a, Ap, groups)
        Pr = r if metric is None else metric(r)
        rr_new = gdot(Pr, r, groups)
        if bool((rr_new.sqrt() <= bound).all()):
            rr = rr_new
            break
        beta = torch.where(live, rr_new / rr.where(live, torch.ones_like(rr)), 0.0)
        p = axpy(r, beta, p, groups)
        Pp = p if metric is None else axpy(Pr, beta, Pp, groups)
        rr = rr_new
    res = float(rr.max().sqrt()) if rr.numel() else 0.0
    ok = not message and bool((rr.sqrt() <= bound).all())
    return x, SolveInfo(f"conjugate gradient ({steps} steps max)", it, res,
                        None if (tol == 0 and not message) else ok, message)


# -- the weight problem -------------------------------------------------------------------------


PATCH_BLOCK = 4
"""The most entries of unfolded patches formed at once, in multiples of the layer input's."""


Pair = tuple[int, int]


def patches_gram(x: Tensor, kernel: Pair, padding: Pair, stride: Pair = (1, 1),
                 dilation: Pair = (1, 1)) -> tuple[Tensor, Tensor]:
    """``a^T a`` and ``a^T 1`` of a convolution's unfolded patches ``a``, one GEMM per block of
    samples: a block's patches ``(b, C k k, L)`` are laid out ``(C k k, b L)`` (a copy, so two
    blocks' worth are live at once), and a block of more than one sample holds at most
    :data:`PATCH_BLOCK` times as many entries as the input, so a stride-1 kernel's patches (``k k``
    times the input) never exist whole: on an H100 the 004 ConvNet's exact ProxProp peaked at 4.5x
    plain's memory with them whole, 1.6x in blocks. Smaller blocks cost time on the CPU (a 3x3
    stride-2 layer of All-CNN-C: 24 ms whole, 33 ms in blocks of the input's size)."""
    p0 = F.unfold(x[:1], kernel, dilation, padding, stride)  # (1, K, L): the patches' shape
    K, L = p0.shape[1], p0.shape[2]
    rows = max(1, PATCH_BLOCK * x.numel() // max(1, K * L))
    g, s = x.new_zeros(K, K), x.new_zeros(K)
    for xb in x.split(rows):
        p = F.unfold(xb, kernel, dilation, padding, stride)
        p = p.transpose(0, 1).reshape(K, -1)
        g.addmm_(p, p.T)
        s += p.sum(1)
    return g, s


@dataclass(frozen=True)
class _Rows:
    """A stage linear in ``w`` written as rows: ``phi(w, x)`` reshaped to ``(N, out)`` equals
    ``A~ W~^T`` with ``A~ = [a, 1]`` (``N x k~``) and ``W~ = [W, b]`` (``out x k~``).

    ``A~`` itself is formed only for plain least squares' pseudo-inverse. ``A~ V^T`` is the layer
    with weights ``V`` and ``R^T A~`` is its weight gradient, taken by the layer's own kernels (for
    a convolution: ``conv2d`` and ``convolution_backward``, with no unfolded patches); the Gram
    matrix ``A~^T A~ = [[a^T a, a^T 1], [1^T a, N]]`` of 004 eq. 44 is formed with the bias block
    written analytically; for a convolution of stride 1 from shifted products of its input
    (:func:`conv_gram`) on the CPU, for any other from its unfolded patches ``(B, C k k, L)``,
    one GEMM per block of samples.
    """

    x: Tensor  # the layer input x_{t-1}: (N, in) for Linear, (B, C, H, W) for Conv2d
    module: nn.Linear | nn.Conv2d
    out_shape: torch.Size

    @property
    def conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def bias(self) -> bool:
        return self.module.bias is not None

    @property
    def weight_shape(self) -> torch.Size:
        return self.module.weight.shape

    @property
    def n(self) -> int:
        """``N``, the number of rows (samples, times output positions for a convolution)."""
        return self.out_shape[0] * self.out_shape[2:].numel() if self.conv else self.x.shape[0]

    @property
    def k(self) -> int:
        """``k~``, the number of columns (inputs, plus one for the bias)."""
        return self.weight_shape[1:].numel() + self.bias

    def rows(self, r: Tensor) -> Tensor:
        """A tensor shaped like ``x_t`` as ``(N, out)`` rows, in the order of ``A~``."""
        if self.conv:  # (B, C, H, W) -> (B * H * W, C)
            return r.flatten(2).transpose(1, 2).reshape(-1, r.shape[1])
        return r.reshape(-1, r.shape[-1])

    @functools.cached_property
    def patches(self) -> Tensor:
        """A convolution's unfolded input, ``(B, C k k, L)``."""
        m = self.module
        return F.unfold(self.x, m.kernel_size, m.dilation, m.padding, m.stride)

    def matrix(self) -> Tensor:
        """``A~`` (``N x k~``), formed."""
        a = self.patches.transpose(1, 2).reshape(-1, self.patches.shape[1]) if self.conv else self.x
        return torch.cat([a, torch.ones_like(a[:, :1])], 1) if self.bias else a

    @property
    def shifted(self) -> bool:
        """A convolution of stride and dilation 1 on the CPU, whose Gram matrix :func:`conv_gram`
        forms from shifted products of the input instead of unfolded patches. On a GPU its loop of
        small products is bound by kernel launches: on an H100 (torch 2.11, float32) its earlier
        form took 53 ms for each of the 004 ConvNet's layers, against 1.3-1.5 ms for the patches'
        GEMM."""
        return (self.conv and self.x.dim() == 4 and self.x.device.type == "cpu"
                and self.module.stride == (1, 1) and self.module.dilation == (1, 1))

    def gram(self) -> Tensor:
        """``A~^T A~`` (``k~ x k~``)."""
        if self.shifted:
            g, s = conv_gram(self.x, self.module.kernel_size, self.module.padding)
        elif self.conv:
            m = self.module
            g, s = patches_gram(self.x, m.kernel_size, m.padding, m.stride, m.dilation)
        else:
            g, s = self.x.T @ self.x, self.x.sum(0)
        if not self.bias:
            return g
        k = g.shape[0]
        out = g.new_empty(k + 1, k + 1)
        out[:k, :k], out[:k, k], out[k, :k], out[k, k] = g, s, s, self.n
        return out

    def layer(self, v: Tensor) -> Tensor:
        """``A~ V^T`` shaped like ``x_t``: the layer with weights ``V`` (``out x k~``)."""
        w = self.weights(v)
        if self.conv:
            m = self.module
            return F.conv2d(self.x, w["weight"], w.get("bias"), m.stride, m.padding, m.dilation)
        return F.linear(self.x, w["weight"], w.get("bias"))

    def rta(self, r: Tensor) -> Tensor:
        """``R^T A~`` (``out x k~``) for ``r`` shaped like ``x_t``: the layer's weight gradient."""
        if self.conv:
            m = self.module
            weight = m.weight.detach().to(self.x.dtype)  # its shape and dtype (a half model in float32)
            _, g, s = torch.ops.aten.convolution_backward(
                r, self.x, weight, [weight.shape[0]] if self.bias else None, m.stride, m.padding,
                m.dilation, False, [0], 1, (False, True, self.bias))
            g = g.reshape(g.shape[0], -1)
        else:
            R = r.reshape(-1, r.shape[-1])
            g, s = R.T @ self.x, R.sum(0) if self.bias else None
        return torch.cat([g, s[:, None]], 1) if self.bias else g

    def outer(self) -> Tensor:
        """``A~ A~^T = a a^T + 1 1^T`` (``N x N``), for a ``Linear`` layer."""
        xxT = self.x @ self.x.T
        return xxT + 1 if self.bias else xxT

    def times(self, z: Tensor) -> Weights:
        """``Z A~`` for coefficients ``Z`` (``out x N``) of a ``Linear`` layer, as the layer's weights:
        ``Z a`` and ``Z 1``, each its own tensor (no ``out x k~`` matrix to split and copy)."""
        out = {"weight": z @ self.x}
        if self.bias:
            out["bias"] = z.sum(1)
        return out

    def stack(self, w: Weights) -> Tensor:
        """``W~ = [W, b]`` (``out x k~``) from the stage's weights, the inverse of :meth:`weights`."""
        W = w["weight"].reshape(self.weight_shape[0], -1)
        return torch.cat([W, w["bias"][:, None]], 1) if self.bias else W

    def weights(self, d: Tensor) -> Weights:
        out = {"weight": d[:, : self.weight_shape[1:].numel()].reshape(self.weight_shape)}
        if self.bias:
            out["bias"] = d[:, -1]
        return out


GRAM_BUDGET = 1
"""The temporaries of :func:`conv_gram`'s window sums, about, in multiples of the input's size.
On the 004 ConvNet (CPU), exact ProxProp's peak memory is 1.52x plain with 1 and 1.61x with 2, at
the same speed within this machine's noise."""


def conv_gram(x: Tensor, kernel: tuple[int, int], padding: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The Gram matrix ``a^T a`` of a stride-1 convolution's patches ``a`` (``N x C kh kw``, rows
    in ``F.unfold``'s order) and their column sums ``a^T 1``, without forming the patches.

    Entry ``((c, i, j), (c', i', j'))`` sums ``x_pad[b, c, p + i, q + j] x_pad[b, c', p + i', q + j']``
    over the samples and the ``Ho x Wo`` output positions: a window sum, starting at ``(i, j)``, of
    products of the input with itself shifted by ``(i' - i, j' - j)``. :func:`_gram_by_rows` forms
    them with several times fewer multiply-adds than the patches' GEMM and no copy of the patches;
    in float32 it is also the more accurate, its float32 sums running over the samples and rows,
    not over all ``N`` rows of the patches. A map smaller than the kernel's reach (``Ho < kh - 1``)
    takes the patches themselves (:func:`patches_gram`). No graph is recorded.

    On this project's 2-core CPU (float32, 5x5 kernels, batch 128), the 004 ConvNet's layers of 3,
    16 and 20 channels: 4-5, 12-17 and 8-13 ms (this VM's spread), against 11-13, 24 and 16 ms for
    one product per shift and row start (this function before).
    """
    kh = kernel[0]
    with torch.no_grad():
        if x.shape[2] + 2 * padding[0] - kh + 1 >= kh - 1:
            return _gram_by_rows(x, kernel, padding), _window_sums(x, kernel, padding)
        return patches_gram(x, kernel, padding)


def _accumulator(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64


def _gram_by_rows(x: Tensor, kernel: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """:func:`conv_gram`'s ``a^T a`` by row windows: for a shift ``(di, dj)`` the row windows
    ``[i, i + Ho)``, ``i < kh - di``, share the core ``[e, Ho)``, ``e = kh - di - 1``. One product
    contracts the core's rows and the samples together (a contiguous range in the layout
    ``(column, channel, row * sample)``), batched over the columns; the ``2 e`` edge rows are
    products per position (both factors contiguous ranges of the layout ``(row * column, channel,
    sample)`` with zero margin columns, where a shift is an offset), added to each window by their
    prefix sums; the column windows are differences of a prefix sum over the columns, all ``(dj, i, j)``
    of a row shift at once. About ``kh (2 kw - 1)`` products of ``Wp C^2 Hp B`` multiply-adds, most
    of them long ones. Needs ``Ho >= kh - 1`` (a window's edges do not overlap): :func:`conv_gram`
    checks."""
    B, C, H, W = x.shape
    kh, kw = kernel
    ph, pw = padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    ew = kw - 1  # a margin of zero columns, so that every column shift stays inside
    Wr = Wp + 2 * ew
    cols = F.pad(x, (pw + ew, pw + ew, ph, ph)).permute(3, 1, 2, 0).contiguous().view(Wr, C, Hp * B)

    def positions(first: int) -> Tensor:
        """Rows ``[first, first + kh - 1)`` in the layout ``(row * column, channel, sample)``."""
        rows = cols[:, :, first * B:(first + kh - 1) * B].view(Wr, C, kh - 1, B)
        return rows.permute(2, 0, 1, 3).reshape((kh - 1) * Wr, C, B)

    # The edge rows of every window lie in the first and the last kh - 1 rows.
    edges = {0: positions(0), Ho: positions(Ho)} if kh > 1 else {}
    K = C * kh * kw
    G = x.new_zeros(K, K)
    channel = torch.arange(C, device=x.device) * (kh * kw)
    acc = _accumulator(x)

    def windows(di: int, shifts: list[int]) -> None:
        """Write the blocks of the row shift ``di`` and the column shifts ``shifts`` into ``G``."""
        e, S = kh - di - 1, len(shifts)
        core = x.new_empty(S, Wp, C, C)
        n = max(0, (e - 1) * Wr + Wp)  # the edge rows' positions, margins between rows included
        lo, up = x.new_empty(2, S, e * Wr, C, C)  # positions past n are margins: never read
        for k, dj in enumerate(shifts):
            torch.bmm(cols[ew:ew + Wp, :, e * B:Ho * B],
                      cols[ew + dj:ew + dj + Wp, :, (e + di) * B:(Ho + di) * B].transpose(1, 2), out=core[k])
            for out, first in ((lo, 0), (up, Ho)) if e else ():
                flat, b = edges[first], ew + di * Wr + dj
                torch.bmm(flat[ew:ew + n], flat[b:b + n].transpose(1, 2), out=out[k, :n])
        # Window i: the core, and the rows [i, e) and [Ho, Ho + i); a zero column in front, so that
        # the prefix sum over the columns is formed in place.
        prefix = x.new_zeros(S, e + 1, Wp + 1, C, C, dtype=acc)
        rows = prefix[:, :, 1:]
        rows.copy_(core[:, None])
        del core
        if e:  # in place, one edge-sized float64 temporary at a time
            low = lo.view(S, e, Wr, C, C)[:, :, :Wp]
            lower = low.cumsum(1, dtype=acc)  # rows [i, e) = all of them - rows [0, i] + row i
            rows[:, :e] += lower[:, -1:]
            rows[:, :e] -= lower
            rows[:, :e] += low
            del lower
            rows[:, 1:] += up.view(S, e, Wr, C, C)[:, :, :Wp].cumsum(1, dtype=acc)
        del lo, up
        prefix.cumsum_(2)
        # (dj, i, j) with the right factor's column j + dj inside the kernel; at di = 0 the shifts
        # dj > 0 also give the mirrored blocks, dj = 0 is its own mirror.
        d = torch.tensor(shifts, device=x.device)
        j = torch.arange(kw, device=x.device)
        valid = ((j + d[:, None] >= 0) & (j + d[:, None] < kw))[:, None, :].expand(S, e + 1, kw)
        k, i, j = valid.nonzero(as_tuple=True)
        block = (prefix[k, i, j + Wo] - prefix[k, i, j]).to(x.dtype)  # (blocks, C, C)
        here = (i * kw + j)[:, None, None] + channel[:, None]
        there = ((i + di) * kw + j + d[k])[:, None, None] + channel[None, :]
        G.index_put_((here, there), block)
        mirror = slice(None) if di else d[k] != 0
        G.index_put_((there[mirror].transpose(1, 2), here[mirror].transpose(1, 2)),
                     block[mirror].transpose(1, 2))

    # Column shifts in groups whose window sums (in acc) and edge products take about the input's
    # size (the counted buffers; the smaller ones beside them add up to about half as much again).
    per_shift = C * C * (kh * (Wp + 1) * torch.finfo(acc).bits // 8 + 2 * (kh - 1) * Wr * x.element_size())
    group = max(1, int(GRAM_BUDGET * x.numel() * x.element_size() // max(1, per_shift)))
    for di in range(kh):
        shifts = list(range(-(kw - 1) if di else 0, kw))
        for g in range(0, len(shifts), group):
            windows(di, shifts[g:g + group])
    return G


def _window_sums(x: Tensor, kernel: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """``a^T 1`` of a stride-1 convolution's patches: box sums of the padded, sample-summed input."""
    kh, kw = kernel
    ph, pw = padding
    Ho, Wo = x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1
    sums = F.pad(x.sum(0), (pw, pw, ph, ph)).to(_accumulator(x))  # (C, Hp, Wp), then its box sums
    prefix = F.pad(sums.cumsum(1).cumsum(2), (1, 0, 1, 0))
    i, j = torch.arange(kh, device=x.device)[:, None], torch.arange(kw, device=x.device)[None, :]
    s = prefix[:, i + Ho, j + Wo] - prefix[:, i, j + Wo] - prefix[:, i + Ho, j] + prefix[:, i, j]
    return s.to(x.dtype).reshape(-1)


def _rows(site: Any) -> _Rows | None:
    """The row form of a ``Linear`` or ``Conv2d`` stage whose weights are all variables, else None
    (also for a parametrized or hooked module, which is not linear in its raw parameters)."""
    m = site.stage.module
    if not plain(m) or set(site.w) != {n for n, _ in m.named_parameters()}:
        return None
    x = site.x_prev.detach()
    if isinstance(m, nn.Linear):
        return _Rows(x.reshape(-1, m.in_features), m, site.x.shape)
    if (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple)):
        return _Rows(x, m, site.x.shape)
    return None


def _ridge_rows(rows: _Rows, r: Tensor, kappa: float, c: float, extra: Tensor | None = None,
                rcond: float = 0.0, batch_sum: Any = None) -> Weights:
    """``(R^T A~ + extra) (kappa A~^T A~ + c I)^{-1}`` for the rows ``R`` of ``r``, as the layer's
    weights (tensors of the solver's own, which the caller may change in place): one symmetric
    solve of size ``k~`` (004 eq. 44), or of size ``N`` when the batch is the smaller side of a
    ``Linear`` layer and there is no ``extra``, by the push-through identity
    ``A~ (kappa A~^T A~ + c I)^{-1} = (kappa A~ A~^T + c I)^{-1} A~``. With ``batch_sum`` (a
    data-parallel batch) the Gram matrix and ``R^T A~`` are summed over the shards, in one call."""
    n, k = rows.n, rows.k
    if c == 0 and extra is None:  # truncated least squares: pinv(A~), not pinv(A~^T A~) (cond^2)
        if batch_sum is not None:
            raise NotImplementedError(
                "lstsq: plain least squares (c = 0, target propagation's fits) is solved by the "
                "pseudo-inverse of the rows, which a data-parallel batch does not hold on one rank")
        return rows.weights((torch.linalg.pinv(rows.matrix(), rtol=rcond) @ rows.rows(r)).T / kappa)
    eye = functools.partial(torch.eye, dtype=rows.x.dtype, device=rows.x.device)
    if c > 0 and n < k and extra is None and not rows.conv and batch_sum is None:
        return rows.times(_sym_solve(kappa * rows.outer() + c * eye(n), rows.rows(r), c).T)
    G, rhs = _gram_and_rhs(rows, r, batch_sum)
    rhs = rhs if extra is None else rhs + extra
    return rows.weights(_sym_solve(kappa * G + c * eye(k), rhs.T, c).T)


def _gram_and_rhs(rows: _Rows, r: Tensor, batch_sum: Any) -> tuple[Tensor, Tensor]:
    """``(A~^T A~, R^T A~)``, summed over the shards of a data-parallel batch in one call."""
    G, rhs = rows.gram(), rows.rta(r)
    if batch_sum is not None:
        G, rhs = batch_sum([G, rhs])
    return G, rhs


def _sym_solve(K: Tensor, B: Tensor, c: float) -> Tensor:
    """``K^{-1} B`` for symmetric PSD ``K``; Cholesky when regularised, minimum-norm when ``c = 0``."""
    if c > 0:
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) == 0:
            return torch.cholesky_solve(B, L)
    return torch.linalg.pinv(K, hermitian=True) @ B


# The Gram matrix of a convolution costs about as much as 128 multiply-adds per patch entry on CPU
# (004 ConvNet and All-CNN-C, torch 2.13, 2 threads: the Gram path of conv1 took 3x its three
# layer-kernel CG steps when formed from unfolded patches). conv_gram forms it faster for stride 1,
# but at a rate that depends on the channels and the allocator: in whole-oracle A/Bs, choosing it
# by a flop count made cg3 on All-CNN-C slower (4.1x against 3.3x), so the choice stays this one.
UNFOLD_COST = 128


def _by_layer(rows: _Rows, steps: int, out: int) -> bool:
    """Whether CG applies the operator by the layer's kernels rather than the Gram matrix: ``2 N k~
    out`` a step against ``N k~ (k~ + U)`` once, ``U`` a convolution's Gram cost per entry."""
    return rows.k + (UNFOLD_COST if rows.conv else 0) >= 2 * steps * out


def _cg_rows(rows: _Rows, r: Tensor, kappa: float, c: float, steps: int, tol: float,
             extra: Tensor | None = None, groups: int = 1,
             batch_sum: Any = None) -> tuple[Weights, SolveInfo]:
    """CG on ``V (kappa A~^T A~ + c I) = R^T A~ + extra`` over weights ``V`` (``out x k~``), one CG
    for all of ``V`` (``groups = 1``) or one per output row (``groups = out``, :class:`CG`'s
    ``per_output``).

    The operator is applied through whichever costs less: the Gram matrix ``G = A~^T A~`` (formed
    once in ``N k~^2`` flops, then ``out k~^2`` a step), or the layer and its weight gradient
    (``V -> R(V)^T A~`` with ``R(V) = A~ V^T``, ``2 N k~ out`` a step, by the layer's own kernels);
    the Gram matrix wins when ``k~ < 2 steps out`` (for a convolution, see :func:`_by_layer`). When
    the batch ``N`` of a ``Linear`` layer is below ``k~`` and there is no ``extra``, every iterate
    lies in the row space of ``A~`` (the right-hand side does, and the operator keeps it there) and
    CG runs on coefficients ``Z`` with ``V = Z A~`` instead: the operator is
    ``Z -> Z (kappa S + c I)`` and the inner product ``<Z1 S, Z2>``, with ``S = A~ A~^T``
    (``N x N``). Same iterates, and one
    ``out x N x N`` product per step (``cg``'s ``metric``). With ``batch_sum`` (a data-parallel
    batch) the Gram form is summed over the shards once and every rank runs the same CG.
    """
    local = batch_sum is None  # a data-parallel batch: the Gram form, summed over the shards once
    if local and rows.n < rows.k and extra is None and not rows.conv:
        S = rows.outer()
        (z,), info = cg(lambda p, pS: [kappa * pS[0] + c * p[0]], [rows.rows(r).T], steps, groups, tol,
                        metric=lambda v: [v[0] @ S])
        return rows.times(z), info
    out = rows.weight_shape[0]
    if local and _by_layer(rows, steps, out):
        rhs = rows.rta(r) if extra is None else rows.rta(r) + extra
        (d,), info = cg(lambda v: [kappa * rows.rta(rows.layer(v[0])) + c * v[0]], [rhs], steps, groups, tol)
        return rows.weights(d), info
    G, rhs = _gram_and_rhs(rows, r, batch_sum)
    rhs = rhs if extra is None else rhs + extra
    (d,), info = cg(lambda v: [kappa * (v[0] @ G) + c * v[0]], [rhs], steps, groups, tol)
    return rows.weights(d), info


def solve_weight(site: Any, r: Tensor, scale: float, kappa: float, c: float,
                 method: Method, jtr: Weights | None = None, mu: float = 0.0) -> tuple[Weights, SolveInfo]:
    """``delta_w = -(kappa J_w^T J_w + (c + mu) I)^{-1} ((scale + kappa) J_w^T r + mu w)``: the
    module doc's problem plus ``r(v) = mu ||v||^2/2`` inside it (000 App. D.6; ``mu = 0``: none).

    ``Linear`` and ``Conv2d`` work on rows (no forward-mode AD, no input gradient). ``jtr``, when
    the caller has it, is ``J_w^T r`` and saves a vjp on the generic path.
    """
    rows = _rows(site)
    steps, tol = _budget(method)
    s = scale + kappa
    w_now = {n: v.detach() for n, v in site.w.items()}
    if rows is not None:
        extra = mu * rows.stack(w_now) if mu else None
        r = r if s == 1 else s * r
        if isinstance(method, Exact):
            d = _ridge_rows(rows, r, kappa, c + mu, extra, method.rcond, site.batch_sum)
            info = SolveInfo("closed form: Gram solve")
        else:
            groups = rows.weight_shape[0] if method.per_output else 1
            d, info = _cg_rows(rows, r, kappa, c + mu, steps, tol, extra, groups, site.batch_sum)
        return {n: v.neg_() for n, v in d.items()}, info  # the solver's own tensors: negated in place
    names = list(site.w)
    g = jtr if jtr is not None else site.vjp(r)[1]  # J_w^T r, exact on the recorded graph
    w = [w_now[n] for n in names]

    def phi_w(*v: Tensor) -> Tensor:
        return site.phi(dict(zip(names, v, strict=True)))

    def apply(v: list[Tensor]) -> list[Tensor]:
        _, jv = jvp(phi_w, tuple(w), tuple(v))
        _, jtjv = site.vjp(jv)
        return [kappa * jtjv[n] + (c + mu) * vi for n, vi in zip(names, v, strict=True)]

    rhs = [s * g[n] + mu * wi if mu else s * g[n] for n, wi in zip(names, w, strict=True)]
    x, info = cg(apply, rhs, steps, 1, tol)
    if isinstance(method, CG) and method.per_output:
        info = replace(info, method=f"{info.method}, one for all weights (per_output needs a Linear or "
                                    f"Conv2d row form)")
    return {n: -xi for n, xi in zip(names, x, strict=True)}, info


# -- the state problem --------------------------------------------------------------------------


def solve_state(site: Any, r: Tensor, scale: float, kappa: float, c: float, method: Method,
                groups: int) -> tuple[Tensor, SolveInfo]:
    """``delta_x = -(scale + kappa) (kappa J_x^T J_x + c I)^{-1} J_x^T r``, per sample."""
    dx, _ = site.vjp(r, weights=False)
    module = site.stage.module
    if isinstance(method, Exact) and isinstance(module, nn.Linear) and "weight" in site.w and plain(module):
        W = site.w["weight"].detach()
        if c > 0:
            K = kappa * W.T @ W + c * torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
            d = _sym_solve(K, dx.reshape(-1, W.shape[1]).T, c).T
        else:  # minimum-norm least squares: delta = -pinv(W) r
            d = (torch.linalg.pinv(W, rtol=method.rcond) @ r.reshape(-1, W.shape[0]).T).T / kappa
        return -(scale + kappa) * d.reshape(site.x_prev.shape), SolveInfo("closed form: Gram solve")
    x0 = site.x_prev.detach()

    def apply(v: list[Tensor]) -> list[Tensor]:
        _, jv = jvp(lambda y: site.phi(x=y), (x0,), (v[0],))
        jtjv, _ = site.vjp(jv, weights=False)
        return [kappa * jtjv + c * v[0]]

    steps, tol = _budget(method)
    (x,), info = cg(apply, [dx], steps, groups, tol)
    return -(scale + kappa) * x, info
