"""A config's method: an oracle rule from ``mg.rules`` and how its directions are used.

``optimizer = "step"`` is the paper's own update, ``Oracle.step`` (GD and MorGD with step ``lr`` or
``alpha``; MorSGD and AL-MSGD on mini-batches); ``"sgd"`` and ``"adam"`` feed ``Oracle.backward``'s
directions to ``torch.optim`` (004 Sec. 5; 001 Sec. 3).
"""

from __future__ import annotations

from typing import Any

import torch

import moreaugrad as mg

RULES = ("backprop", "moreau", "proxprop", "penalty_backprop", "augmented_lagrangian", "target_prop",
         "regularized_target_prop", "fenchel", "contrastive_backprop")
# Not presets of mg.rules but oracles of mg.second_order (003 Sec. 3); the same Oracle runs them.
SECOND_ORDER = ("gauss_newton", "newton")
OPTIMIZERS = ("step", "sgd", "adam")
SCHEDULES = {"paper": mg.rules.Paper, "geometric": mg.rules.Geometric, "lagrangian": mg.rules.Lagrangian}
KEYS = {"rule", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "betas", "label", "enabled",
        "gamma", "alpha", "beta", "kappa", "rho", "schedule", "tau", "tau_theta", "cg", "step", "spacing",
        "tau_max", "batch_mean", "method", "tol", "strict", "per_output", "beta_gamma", "solver"}
GN_METHODS = ("dp", "dual", "cg")
# The generic inner solvers a method may name (``solver = "paper"``): 000 App. E.2.1's two
# quasi-Newton steps, or L-BFGS run to its tolerance (the target rules' default).
SOLVERS = {"paper": lambda: mg.solvers.QuasiNewton(tol=None, max_iter=2),
           "lbfgs": lambda: mg.solvers.LBFGS(tol=1e-8, max_iter=100)}
WITH_SOLVER = ("moreau", "augmented_lagrangian", "target_prop", "regularized_target_prop")
SPACINGS = ("constant", "adaptive")


def _method(spec: dict[str, Any]) -> Any:
    """``cg = k`` (``mg.lstsq.CG(k)``) or ``"exact"``; ``per_output = true`` runs one CG per output
    unit or channel (``CG(k, per_output=True)``, as the reference ProxProp code does for Linear)."""
    cg = spec.get("cg", 3)
    per_output = spec.get("per_output", False)
    if not isinstance(per_output, bool):
        raise ValueError(f"method proxprop: per_output must be true or false, got {per_output!r}")
    if cg == "exact":
        if per_output:
            raise ValueError("method proxprop: per_output needs cg = k (an exact solve needs no split)")
        return mg.lstsq.Exact()
    return mg.lstsq.CG(int(cg), per_output=True) if per_output else mg.lstsq.CG(int(cg))


def _solver(spec: dict[str, Any]) -> Any:
    """The generic inner solver a spec names (``solver = "paper" | "lbfgs"``), or None for the
    rule's default; only rules with generic subproblems take one."""
    name = spec.get("solver")
    if name is None:
        return None
    if spec["rule"] not in WITH_SOLVER:
        raise ValueError(f"method {spec.get('label', spec['rule'])!r}: solver applies to the rules "
                         f"{WITH_SOLVER}, not {spec['rule']!r}")
    if name not in SOLVERS:
        raise ValueError(f"method {spec.get('label', spec['rule'])!r}: solver must be one of "
                         f"{sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name]()


def _spacing(spec: dict[str, Any]) -> Any:
    """``tau`` (a number), or ``spacing = "adaptive"`` with ``tau`` and ``tau_max`` (002 Fig. 1)."""
    kind = spec.get("spacing", "constant")
    if kind not in SPACINGS:
        raise ValueError(f"method {spec['rule']}: spacing must be one of {SPACINGS}, got {kind!r}")
    if kind == "adaptive":
        return mg.rules.AdaptiveSpacing(spec.get("tau", 0.1), spec.get("tau_max", 100.0))
    return spec.get("tau", 1.0)


def rule(spec: dict[str, Any]) -> Any:
    """The ``mg.rules`` preset a method spec names, with its parameters.

    ``augmented_lagrangian`` takes ``gamma`` or ``rho`` with ``gamma = rho * alpha`` (000 App. F.2
    couples the state step to the weight step this way), and ``beta`` or ``beta_gamma`` with
    ``beta = beta_gamma / gamma``: with ``kappa`` small the k-th layer from the top gets a direction
    scaled by about ``(beta gamma)^(2k)``, so a grid on ``beta_gamma`` near 1 covers the useful part of
    F.2's ``beta`` grid at a fraction of its cost. ``proxprop`` and ``penalty_backprop`` take
    ``tau = lr`` when ``tau`` is absent (004 Prop. 1: penalty back-propagation is gradient descent with
    step ``tau``). ``moreau`` and the target rules take ``solver = "paper"`` (000 App. E.2.1's two
    quasi-Newton steps, Moreau's default) or ``"lbfgs"`` (L-BFGS to ``1e-8``, the target rules'
    default) for their generic subproblems, e.g. AL-MSGD with layers as stages (000 Table 2).
    """
    name = spec["rule"]
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ValueError(f"method {spec.get('label', name)!r}: unknown keys {unknown}; "
                         f"known: {sorted(KEYS)}")
    solver = _solver(spec)
    if name == "backprop":
        return mg.rules.backprop(step=spec.get("lr", 1.0))
    if name == "moreau":
        sched = spec.get("schedule", "paper")
        if sched not in SCHEDULES:
            raise ValueError(f"method moreau: schedule must be one of {sorted(SCHEDULES)}, got {sched!r}")
        return mg.rules.moreau(schedule=SCHEDULES[sched](spec.get("gamma", 0.5), spec.get("alpha", 2.0)),
                               solver=solver)
    if name == "proxprop":
        tau = spec.get("tau", spec.get("lr", 1.0))
        return mg.rules.proxprop(spec.get("tau_theta", 1.0), tau, _method(spec))
    if name == "penalty_backprop":
        return mg.rules.penalty_backprop(spec.get("tau", spec.get("lr", 1.0)))
    if name == "fenchel":
        return mg.rules.fenchel(_spacing(spec), batch_mean=spec.get("batch_mean", True),
                                step=spec.get("lr", 1.0))
    if name == "contrastive_backprop":
        return mg.rules.contrastive_backprop(_spacing(spec), batch_mean=spec.get("batch_mean", True),
                                             step=spec.get("lr", 1.0))
    if name == "augmented_lagrangian":
        alpha = spec.get("alpha", 1.0)
        gamma = spec["rho"] * alpha if "rho" in spec else spec.get("gamma", 1.0)
        if "beta" in spec and "beta_gamma" in spec:
            raise ValueError("method augmented_lagrangian: give beta or beta_gamma, not both")
        beta = spec["beta_gamma"] / gamma if "beta_gamma" in spec else spec.get("beta", 1.0)
        return mg.rules.augmented_lagrangian(spec.get("kappa", 1e-5), beta, gamma, alpha, solver=solver)
    if name in SECOND_ORDER:
        return _second_order(name, spec)
    if name == "target_prop":
        return mg.rules.target_prop(spec.get("kappa", 1.0), solver=solver)
    if name == "regularized_target_prop":
        return mg.rules.regularized_target_prop(spec.get("kappa", 1.0), spec.get("gamma", 1.0),
                                                spec.get("alpha", 1.0), solver=solver)
    raise ValueError(f"method: rule must be one of {RULES + SECOND_ORDER}, got {name!r}")


def _second_order(name: str, spec: dict[str, Any]) -> Any:
    """``gauss_newton`` (``method = "dp" | "dual" | "cg"``, ``cg`` steps, ``tol``) or ``newton``, with
    step ``gamma`` and ``strict``: 003 Sec. 3 through ``mg.second_order``."""
    gamma, strict = spec.get("gamma", 1.0), spec.get("strict", False)
    if name == "newton":
        return mg.second_order.newton(gamma, strict=strict)
    kind = spec.get("method", "dp")
    if kind not in GN_METHODS:
        raise ValueError(f"method gauss_newton: method must be one of {GN_METHODS}, got {kind!r}")
    method = {"dp": mg.second_order.DP, "dual": lambda: mg.second_order.DualCG(spec.get("tol", 1e-12)),
              "cg": lambda: mg.second_order.CG(int(spec.get("cg", 10)), spec.get("tol", 0.0))}[kind]()
    return mg.second_order.gauss_newton(gamma, method=method, strict=strict)


def optimizer(spec: dict[str, Any], params: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim`` optimizer of a method, or None for ``"step"`` (``Oracle.step``)."""
    name = spec.get("optimizer", "step")
    if name not in OPTIMIZERS:
        raise ValueError(f"method: optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "step":
        return None
    lr = spec.get("lr")
    if lr is None:
        raise ValueError(f"method {spec.get('label', spec['rule'])!r}: optimizer {name!r} needs lr")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.get("momentum", 0.0),
                               nesterov=spec.get("nesterov", False),
                               weight_decay=spec.get("weight_decay", 0.0))
    return torch.optim.Adam(params, lr=lr, betas=tuple(spec.get("betas", (0.9, 0.999))),
                            weight_decay=spec.get("weight_decay", 0.0))
