"""moreaugrad: first-order oracles beyond back-propagation for chains of computations in PyTorch.

    import moreaugrad as mg
    chain = mg.Chain(model)                          # an nn.Sequential, one stage per child
    oracle = mg.Oracle(chain, mg.losses.CrossEntropy(), mg.rules.backprop())
    opt.zero_grad(); oracle.backward(x, y); opt.step()
"""

from . import control, data, distributed, kernels, losses, lstsq, rules, second_order, smoothness, solvers
from .chain import Chain, Stage
from .oracle import DivergenceWarning, NonFiniteError, Oracle, OracleResult, UnderflowError
from .types import Dual, InexactSolveWarning, SolveInfo, Target

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "Dual",
    "InexactSolveWarning",
    "NonFiniteError",
    "DivergenceWarning",
    "UnderflowError",
    "Oracle",
    "OracleResult",
    "SolveInfo",
    "Stage",
    "Target",
    "control",
    "data",
    "distributed",
    "kernels",
    "losses",
    "lstsq",
    "rules",
    "second_order",
    "smoothness",
    "solvers",
]
