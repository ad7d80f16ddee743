"""The table of layer constants (003 App. B, Sec. 5.1): a registry keyed by module type.

Notation of 003 Sec. 4 (eq. 19): for a function ``f`` on a set ``C``, ``m`` bounds ``||f||_2`` on
``C``, ``l`` is its Lipschitz constant and ``L`` its smoothness (the Lipschitz constant of its
gradient), all for the Euclidean norm of the *whole mini-batch*: a batch of ``m`` inputs is one
vector ``z = Vec(Z)`` (003 Sec. 2.3, footnote 4: ``||z||_2 = ||Z||_F``). ``inf`` means "not bounded"
(``m``) or "not continuously differentiable" (``L`` of ReLU, max pooling).

A layer is decomposed as in 003 eq. 6-7 into

* a bi-affine part ``b(v, z) = beta(v, z) + beta^v(v) + beta^z(z) + beta^0``
  (:class:`BiAffine`: ``L_beta`` bounds ``||beta(v, z)|| <= L_beta ||v|| ||z||``, ``l_beta_v`` and
  ``l_beta_z`` are the Lipschitz constants of the linear parts, ``beta0 = ||beta^0||``), and
* parameter-free maps ``a_{l,j}`` in ``C_{m, l, L}`` (:class:`Map`, with ``||a(0)||`` and
  ``||grad a(0)||_{2,2}`` for the recurrences of 003 Prop. 4.4).

Each entry is a function ``fn(module, shapes) -> tuple of BiAffine | Map`` registered with
:func:`register` for one or more module types (like the rule registry, HIPS/autograd's
``defvjp``). ``shapes`` gives the batch size and the per-sample input and output shapes, so the
batch size ``m`` and the number of patches ``n_p`` enter where the paper has them. A user adds a
layer with::

    @mg.smoothness.register(MyLayer)
    def _(module, shapes):
        return (mg.smoothness.Map(m=math.inf, l=2.0, L=0.0, at0=0.0, slope0=2.0, source="mine"),)

Objectives ``f`` and regularisers ``r`` of 003 Prop. 4.2 have their own table
(:func:`register_objective`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..chain import plain
from ..losses import L2, CrossEntropy, SquaredLoss

INF = math.inf


class UnsupportedModuleError(NotImplementedError):
    """A module (or objective) type without an entry in the table of constants."""


@dataclass(frozen=True)
class Shapes:
    """What an entry may read besides the module: the batch size ``m`` and the per-sample input and
    output shapes (without the batch dimension)."""

    batch: int
    input: tuple[int, ...]
    output: tuple[int, ...]

    @property
    def numel(self) -> int:
        """``eta``: the number of entries of the output of the whole batch."""
        return self.batch * math.prod(self.output)


@dataclass(frozen=True)
class BiAffine:
    """``b(v, z) = beta(v, z) + beta^v(v) + beta^z(z) + beta^0`` (003 eq. 6), with
    ``beta in BL_{L_beta}``, ``beta^v in L_{l_beta_v}``, ``beta^z in L_{l_beta_z}`` and
    ``beta0 = ||beta^0||_2`` (003 Prop. 4.4). The module's parameters are ``v``.

    ``BiAffine(0, 0, 1)`` is the identity (a layer without parameters).
    """

    L_beta: float
    l_beta_v: float = 0.0
    l_beta_z: float = 0.0
    beta0: float = 0.0
    source: str = ""

    def constants(self) -> dict[str, float]:
        return {"L_beta": self.L_beta, "l_beta_v": self.l_beta_v, "l_beta_z": self.l_beta_z,
                "beta0": self.beta0}


@dataclass(frozen=True)
class Map:
    """A parameter-free map ``a in C_{m, l, L}`` on the whole batch (003 Sec. 4, Prop. 4.4):
    ``m`` bounds ``||a(z)||``, ``l`` its Lipschitz constant, ``L`` its smoothness, ``at0 = ||a(0)||``
    and ``slope0 = ||grad a(0)||_{2,2}`` (both enter the bounds of 003 Prop. 4.4 (i)-(ii) on a ball)."""

    m: float
    l: float
    L: float
    at0: float = 0.0
    slope0: float = 0.0
    source: str = ""

    def constants(self) -> dict[str, float]:
        return {"m": self.m, "l": self.l, "L": self.L}


Piece = BiAffine | Map
Entry = Callable[[Any, Shapes], Sequence[Piece]]
_LAYERS: dict[type, Entry] = {}


def register(*module_types: type) -> Callable[[Entry], Entry]:
    """Register ``fn(module, shapes) -> (BiAffine | Map, ...)`` as the constants of ``module_types``.

    The pieces are applied in order; a :class:`BiAffine` starts a new layer ``l`` of 003 Prop. 4.4
    and every :class:`Map` after it is one of its ``a_{l,j}``. The last registration for a type wins,
    so a user may override a built-in entry.
    """
    if not module_types or not all(isinstance(t, type) for t in module_types):
        raise TypeError(f"smoothness.register: give one or more module types, got {module_types!r}")

    def deco(fn: Entry) -> Entry:
        for t in module_types:
            _LAYERS[t] = fn
        return fn

    return deco


def supported() -> list[str]:
    """The names of the module types in the table, sorted."""
    return sorted({t.__name__ for t in _LAYERS})


def lookup(module: nn.Module) -> Entry:
    """The most specific entry for ``type(module)`` (walking its MRO).

    Raises:
        UnsupportedModuleError: no entry, or a module that is not :func:`~moreaugrad.chain.plain`
            (a parametrized weight or a forward hook changes what the type computes).
    """
    name = type(module).__name__
    if not plain(module):
        raise UnsupportedModuleError(
            f"smoothness: {name} has a parametrization or a forward hook, so the table's constants "
            f"for {name} do not hold for it; register an entry for a wrapper type instead")
    for cls in type(module).__mro__:
        fn = _LAYERS.get(cls)
        if fn is not None:
            return fn
    raise UnsupportedModuleError(
        f"smoothness: no constants for module type {name}; supported: {', '.join(supported())}. "
        f"Add one with @moreaugrad.smoothness.register({name})")


# -- bilinear and linear layers (003 App. B.3) ------------------------------------------------


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


@register(nn.Linear)
def linear(module: nn.Linear, shapes: Shapes) -> tuple[Piece, ...]:
    """Fully connected layer ``Z~ = W^T Z + w0 1_m^T`` (003 eq. 8, App. B.3):
    ``L_beta = L_full = 1`` (``||W^T Z||_F <= ||W||_F ||Z||_F``) and
    ``l_beta_v = l_full = sqrt(m)`` (the offset repeated over the batch; ``0`` without bias).

    An input with extra dimensions ``(m, ..., d)`` repeats the offset over them too:
    ``l_beta_v = sqrt(m n)`` with ``n`` the number of rows per sample.
    """
    rows = math.prod(shapes.output) // module.out_features
    lv = math.sqrt(shapes.batch * rows) if _has_bias(module) else 0.0
    return (BiAffine(1.0, lv, 0.0, 0.0, "003 App. B.3: L_full = 1, l_full = sqrt(m)"),)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register(*_CONV)
def conv(module: nn.Conv1d, shapes: Shapes) -> tuple[Piece, ...]:
    """Convolution ``Xi_{i,j,k} = w_j^T Pi_k z_i + w0_j`` (003 eq. 9, App. B.3):
    ``L_beta = L_conv = sqrt(n_p)`` and ``l_beta_v = l_conv = sqrt(m n_p)`` (``0`` without bias),
    with ``n_p`` the number of patches (output positions), read off the output shape, so stride,
    padding and dilation enter through ``n_p``.

    The bound uses ``||Pi_k z|| <= ||z||`` for every patch extractor, which holds for zero padding
    and for any number of groups (a filter then sees only its group's channels). Other padding modes
    copy entries into a patch and are refused.
    """
    if module.padding_mode != "zeros":
        raise UnsupportedModuleError(
            f"smoothness: {type(module).__name__} with padding_mode={module.padding_mode!r} is not in "
            f"the table (003 App. B.3 assumes zero padding: ||Pi_k z|| <= ||z||); use padding_mode='zeros'")
    n_p = math.prod(shapes.output[1:])
    lv = math.sqrt(shapes.batch * n_p) if _has_bias(module) else 0.0
    return (BiAffine(math.sqrt(n_p), lv, 0.0, 0.0,
                     f"003 App. B.3: L_conv = sqrt(n_p), l_conv = sqrt(m n_p), n_p = {n_p}"),)


# -- activations (003 App. B.4) ---------------------------------------------------------------


@register(nn.Softplus)
def softplus(module: nn.Softplus, shapes: Shapes) -> tuple[Piece, ...]:
    """Soft-plus ``a(x) = log(1 + exp(beta x)) / beta`` elementwise (003 App. B.4):
    ``l_softplus = 1``, ``L_softplus = beta/4`` (``1/4`` for ``beta = 1``), unbounded,
    ``||a(0)|| = sqrt(eta) log(2)/beta``, ``||grad a(0)|| = 1/2``.

    torch switches to the identity above ``threshold``, a jump of the derivative of about
    ``exp(-threshold)`` that the table ignores (as the paper's smooth soft-plus does).
    """
    b = float(module.beta)
    return (Map(INF, 1.0, b / 4, math.sqrt(shapes.numel) * math.log(2) / b, 0.5,
                "003 App. B.4: l_softplus = 1, L_softplus = 1/4"),)


@register(nn.Sigmoid)
def sigmoid(module: nn.Sigmoid, shapes: Shapes) -> tuple[Piece, ...]:
    """Sigmoid ``a(x) = 1/(1 + exp(-x))`` elementwise (003 App. B.4): ``l_sig = 1/4``,
    ``L_sig = 1/10`` (``max |a''| = 1/(6 sqrt 3) = 0.096``), ``m = sqrt(eta)`` (``|a| < 1``),
    ``||a(0)|| = sqrt(eta)/2``, ``||grad a(0)|| = 1/4``."""
    n = math.sqrt(shapes.numel)
    return (Map(n, 0.25, 0.1, n / 2, 0.25, "003 App. B.4: l_sig = 1/4, L_sig = 1/10"),)


@register(nn.Tanh)
def tanh(module: nn.Tanh, shapes: Shapes) -> tuple[Piece, ...]:
    """Tanh elementwise (not in 003's list; derived as in App. B.4): ``l = 1``,
    ``L = max |tanh''| = 4/(3 sqrt 3) = 0.770`` (at ``tanh x = 1/sqrt 3``), ``m = sqrt(eta)``,
    ``a(0) = 0``, ``||grad a(0)|| = 1``."""
    return (Map(math.sqrt(shapes.numel), 1.0, 4 / (3 * math.sqrt(3)), 0.0, 1.0,
                "derived as 003 App. B.4: l = 1, L = 4/(3 sqrt 3)"),)


@register(nn.Softmax)
def softmax(module: nn.Softmax, shapes: Shapes) -> tuple[Piece, ...]:
    """Soft-max ``a(x) = exp(x)/(exp(x)^T 1)`` over one dimension, block-diagonal over the other
    entries of the batch (003 App. B.4): ``l_softmax = 2``, ``L_softmax = 4`` (the norm of a
    block-diagonal map is that of its largest block), ``m = sqrt(n)`` with ``n`` the number of
    blocks (each output has norm <= 1), ``||a(0)|| = sqrt(n/q)`` and ``||grad a(0)|| = 1/q`` for
    ``q`` classes."""
    dim = module.dim
    full = (shapes.batch, *shapes.output)
    if dim is None:  # torch's legacy implicit choice (nn.functional._get_softmax_dim)
        dim = 0 if len(full) in (0, 1, 3) else 1
    q = full[dim]
    blocks = shapes.numel // q
    return (Map(math.sqrt(blocks), 2.0, 4.0, math.sqrt(blocks / q), 1.0 / q,
                "003 App. B.4: l_softmax = 2, L_softmax = 4"),)


@register(nn.ReLU)
def relu(module: nn.ReLU, shapes: Shapes) -> tuple[Piece, ...]:
    """ReLU elementwise: ``l = 1`` and ``L = inf`` (not differentiable at 0), unbounded."""
    return (Map(INF, 1.0, INF, 0.0, 1.0, "non-smooth: l = 1, L = inf"),)


@register(nn.LeakyReLU)
def leaky_relu(module: nn.LeakyReLU, shapes: Shapes) -> tuple[Piece, ...]:
    """Leaky ReLU with slope ``s`` below 0: ``l = max(1, |s|)``, ``L = inf``, unbounded."""
    lip = max(1.0, abs(float(module.negative_slope)))
    return (Map(INF, lip, INF, 0.0, lip, "non-smooth: l = max(1, |s|), L = inf"),)


# -- linear maps without parameters: identity, flatten, pooling (003 App. B.6) ------------------


@register(nn.Identity, nn.Flatten, nn.Unflatten)
def identity(module: nn.Module, shapes: Shapes) -> tuple[Piece, ...]:
    """A reshape: ``l = 1``, ``L = 0``, unbounded, ``a(0) = 0``, ``||grad a(0)|| = 1``."""
    return (Map(INF, 1.0, 0.0, 0.0, 1.0, "reshape: l = 1, L = 0"),)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,) * n


def _overlap(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int] | None = None) -> int:
    """The most windows one input entry belongs to: ``prod_i min(k_i, ceil(span_i / s_i))`` with
    ``span_i = d_i (k_i - 1) + 1`` (1 for non-overlapping windows)."""
    dilation = dilation or (1,) * len(kernel)
    return math.prod(min(k, -(-(d * (k - 1) + 1) // s))
                     for k, s, d in zip(kernel, stride, dilation, strict=True))


_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _spatial(module: nn.Module) -> int:
    for n, types in ((1, (nn.AvgPool1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d)),
                     (2, (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d))):
        if isinstance(module, types):
            return n
    return 3


@register(*_AVG)
def avg_pool(module: nn.AvgPool2d, shapes: Shapes) -> tuple[Piece, ...]:
    """Average pooling, a linear map (003 App. B.6): for non-overlapping patches (stride >= kernel)
    ``l_avg = 1``, ``L_avg = 0``. Overlapping patches: each entry is in at most ``c`` windows, each
    mean is at most the root-mean-square of its window (its divisor is at least its number of
    entries), so ``l = sqrt(c)``. (Sharper for full windows: ``sqrt(c/K)`` with ``K`` entries per
    window; the paper keeps 1.) With ``divisor_override = D``: ``l = sqrt(c K)/D``."""
    n = _spatial(module)
    k = _tuple(module.kernel_size, n)
    c = _overlap(k, _tuple(module.stride or module.kernel_size, n))
    lip = math.sqrt(c)
    override = getattr(module, "divisor_override", None)
    if override:
        lip = math.sqrt(c * math.prod(k)) / override
    return (Map(INF, lip, 0.0, 0.0, lip, f"003 App. B.6: l_avg = {'1' if c == 1 else f'sqrt({c})'}, "
                                         f"L_avg = 0"),)


def _column_sum(n: int, o: int) -> float:
    """``max_j sum_{i: j in w_i} 1/|w_i|`` for adaptive windows of ``n`` entries into ``o`` outputs."""
    sums = [0.0] * n
    for i in range(o):
        lo, hi = (i * n) // o, -((-(i + 1) * n) // o)
        for j in range(lo, hi):
            sums[j] += 1.0 / (hi - lo)
    return max(sums)


@register(*_ADAPTIVE_AVG)
def adaptive_avg_pool(module: nn.AdaptiveAvgPool2d, shapes: Shapes) -> tuple[Piece, ...]:
    """Adaptive average pooling with windows ``w_i = [floor(i n/o), ceil((i+1) n/o))`` per spatial
    dimension: the averaging matrix has row sums 1 and column sums ``s_j = sum_{w_i ni j} 1/|w_i|``,
    so ``l <= sqrt(||A||_1 ||A||_inf) = sqrt(prod_dims max_j s_j)`` (separable), ``L = 0``. Exact
    for the identity (``o = n``); it covers an output larger than the input (one entry in up to
    ``o`` windows), which a fixed overlap count would not."""
    c = math.prod(_column_sum(n, o) for n, o in zip(shapes.input[1:], shapes.output[1:], strict=True))
    lip = math.sqrt(c)
    return (Map(INF, lip, 0.0, 0.0, lip, "003 App. B.6 (adaptive): l = sqrt(c), L = 0"),)


@register(*_MAX)
def max_pool(module: nn.MaxPool2d, shapes: Shapes) -> tuple[Piece, ...]:
    """Max pooling: ``|max a - max b| <= max |a - b|``, so ``l = sqrt(c)`` with ``c`` the most windows
    an entry is in (1 for non-overlapping patches, 003 App. B.6); ``L = inf`` (not differentiable)."""
    n = _spatial(module)
    k = _tuple(module.kernel_size, n)
    c = _overlap(k, _tuple(module.stride or module.kernel_size, n), _tuple(module.dilation, n))
    lip = math.sqrt(c)
    return (Map(INF, lip, INF, 0.0, lip, "non-smooth: l = sqrt(c), L = inf"),)


# -- normalization (003 eq. 11, App. B.5) -----------------------------------------------------


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_norm_constants(d: int, m: int, eps: float) -> Map:
    """Batch-normalization ``(Z~)_ij = (Z_ij - mu_i)/sqrt(eps + sigma_i^2)`` of ``Z in R^{d x m}``
    (003 eq. 11), as 003 App. B, Prop. B.2 derives it:

    * ``m_batch = d m``,
    * ``l_batch = 2 eps^{-1/2}``,
    * ``L_batch = 2 d m^{-1/2} eps^{-1}``.

    003 Sec. 5.2 restates Prop. B.2 with ``L_batch = 2 m^{-1/2} eps^{-1}``: without the factor ``d``.
    The derivation in App. B bounds the second-order tensor of the block-diagonal map
    ``g_bar = (g(x_1); ...; g(x_d))`` by ``d max_i ||grad^2 g(x_i)||``, which is where ``d`` comes
    from; a block-diagonal tensor has the norm of its largest block, so ``d`` could be dropped and
    Sec. 5.2's value is also an upper bound. The table follows App. B (the larger, as derived).
    The proof's intermediate bounds are sharper still (``m_nu2 <= d m^{1/2}``, ``l <= 1.09
    eps^{-1/2}``, ``L_g <= 1.6 m^{-1/2} eps^{-1}``); the exact values are ``sqrt(d m)`` and
    ``eps^{-1/2}``. ``nu(0) = 0`` and ``||grad nu(0)|| = eps^{-1/2}``.
    """
    return Map(float(d * m), 2.0 / math.sqrt(eps), 2.0 * d / (math.sqrt(m) * eps), 0.0, 1.0 / math.sqrt(eps),
               "003 App. B Prop. B.2: m = d m, l = 2 eps^-1/2, L = 2 d m^-1/2 eps^-1")


@register(*_BN)
def batch_norm(module: nn.BatchNorm2d, shapes: Shapes) -> tuple[Piece, ...]:
    """Batch-norm with batch statistics (training mode, 003 eq. 11): ``d`` is the number of channels
    and ``m`` the number of entries each channel is normalized over (batch size times positions),
    constants of :func:`batch_norm_constants`. With ``affine=True`` a second layer follows,
    ``y = gamma * nu + beta``: bilinear in ``(gamma, nu)`` with ``L_beta = 1``
    (``||gamma * z|| <= ||gamma||_inf ||z||``) and ``l_beta_v = sqrt(m)`` for the offset.

    In evaluation mode with running statistics it is another (affine) map: not in the table.
    """
    if not module.training and module.track_running_stats:
        raise UnsupportedModuleError(
            f"smoothness: {type(module).__name__} in eval mode normalizes by running statistics, which "
            f"the table does not cover; estimate the model in train mode (batch statistics, 003 eq. 11)")
    d = shapes.input[0]
    m = shapes.batch * math.prod(shapes.input[1:])
    pieces: list[Piece] = [batch_norm_constants(d, m, float(module.eps))]
    if module.affine:
        pieces.append(BiAffine(1.0, math.sqrt(m), 0.0, 0.0, "affine batch-norm: L_beta = 1, "
                                                             "l_beta_v = sqrt(m)"))
    return tuple(pieces)


# -- objectives and regularizers (003 App. B.1, Prop. 4.2) ------------------------------------


@dataclass(frozen=True)
class ObjectiveConstants:
    """``l``: the Lipschitz constant of ``f`` on ``psi(C)`` (``l~_f`` of 003 Prop. 4.2, with the
    batch mean) and ``L``: its smoothness ``L_f`` (for a regularizer: ``L_r``)."""

    l: float
    L: float
    source: str = ""


ObjectiveEntry = Callable[[Any, Shapes, float, "float | None"], ObjectiveConstants]
_OBJECTIVES: dict[type, ObjectiveEntry] = {}


def register_objective(*types: type) -> Callable[[ObjectiveEntry], ObjectiveEntry]:
    """Register ``fn(objective, shapes, m_out, target_norm) -> ObjectiveConstants`` for ``types``
    (``shapes.input`` is the chain's output per sample, ``m_out`` the bound ``m_psi`` on it)."""

    def deco(fn: ObjectiveEntry) -> ObjectiveEntry:
        for t in types:
            _OBJECTIVES[t] = fn
        return fn

    return deco


def objective_constants(objective: Any, shapes: Shapes, m_out: float,
                        target_norm: float | None) -> ObjectiveConstants:
    """The constants of an objective or regularizer from its table entry."""
    for cls in type(objective).__mro__:
        fn = _OBJECTIVES.get(cls)
        if fn is not None:
            return fn(objective, shapes, m_out, target_norm)
    names = ", ".join(sorted(t.__name__ for t in _OBJECTIVES))
    raise UnsupportedModuleError(f"smoothness: no constants for objective type {type(objective).__name__}; "
                                 f"supported: {names}. Add one with "
                                 f"@moreaugrad.smoothness.register_objective({type(objective).__name__})")


@register_objective(SquaredLoss)
def squared_loss(loss: SquaredLoss, shapes: Shapes, m_out: float,
                 target_norm: float | None) -> ObjectiveConstants:
    """``f(Y^) = (1/m) sum_i ||y^_i - y_i||^2/2`` (003 App. B.1, with the batch mean of
    ``mg.losses.SquaredLoss``): per sample ``l_sq(C) = rho_C + rho_Y``, ``L_sq = 1``; for the mean
    over ``m`` samples ``grad f = (Y^ - Y)/m``, so ``l_f = (m_psi + rho_Y)/m`` and ``L_f = 1/m``
    (003 footnote 5). ``rho_Y = target_norm`` bounds ``||Y||_F``; by default one-hot labels,
    ``rho_Y = sqrt(m)``."""
    m = shapes.batch
    rho_y = math.sqrt(m) if target_norm is None else float(target_norm)
    return ObjectiveConstants((m_out + rho_y) / m, 1.0 / m, "003 App. B.1: l_sq = rho_C + rho_Y, L_sq = 1")


@register_objective(CrossEntropy)
def cross_entropy(loss: CrossEntropy, shapes: Shapes, m_out: float,
                  target_norm: float | None) -> ObjectiveConstants:
    """Logistic loss ``-y^T y^ + log(sum_j exp(y^_j))`` on logits (003 App. B.1): ``l_log = 2``,
    ``L_log = 2`` per sample; for the batch mean ``l_f = 2/sqrt(m)`` and ``L_f = 2/m``
    (003 footnote 5)."""
    m = shapes.batch
    return ObjectiveConstants(2.0 / math.sqrt(m), 2.0 / m, "003 App. B.1: l_log = 2, L_log = 2")


@register_objective(L2)
def l2(reg: L2, shapes: Shapes, m_out: float, target_norm: float | None) -> ObjectiveConstants:
    """``r(w) = mu ||w||^2/2`` (``mg.losses.L2``): ``L_r = mu`` (003 Prop. 4.2)."""
    return ObjectiveConstants(INF, float(reg.mu), "L_r = mu")
