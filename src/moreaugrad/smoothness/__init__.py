"""Smoothness and Lipschitz estimates of networks, measured lower bounds and safe step sizes (003).

    est = mg.smoothness.estimate(model, (3, 224, 224), radius=1.0, input_norm=1.0, batch=128)
    print(est)                                   # per-module m, l, L and the totals
    est.lipschitz, est.smoothness, est.infinite_at
    est = mg.smoothness.estimate(model, (64,), batch=128, input_norm=x.norm().item(), around=model,
                                 loss=mg.losses.CrossEntropy())
    est.step                                     # 1/L_F for gradient descent (003 Thm. 4.1)
    mg.rules.moreau(schedule=mg.rules.Safe.from_estimate(est))   # 000 Prop. 2.3
    mg.smoothness.measure(model, x, radius=1.0)  # lower bounds attained by the network

The table of layer constants (003 App. B) is a registry keyed by module type: add a layer with
:func:`register`, an objective with :func:`register_objective`.
"""

from .estimate import Estimate, Row, StageConstants, close_layer, estimate, generic_chain, leaves
from .measure import Measurement, measure
from .safe import Safe
from .table import (
    BiAffine,
    Map,
    ObjectiveConstants,
    Shapes,
    UnsupportedModuleError,
    batch_norm_constants,
    lookup,
    objective_constants,
    register,
    register_objective,
    supported,
)
from .vgg import batch_norm_comparison, vgg16

__all__ = [
    "BiAffine", "Estimate", "Map", "Measurement", "ObjectiveConstants", "Row", "Safe", "Shapes",
    "StageConstants", "UnsupportedModuleError", "batch_norm_comparison", "batch_norm_constants",
    "close_layer", "estimate", "generic_chain", "leaves", "lookup", "measure", "objective_constants",
    "register", "register_objective", "supported", "vgg16",
]
