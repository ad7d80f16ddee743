"""Objectives and regularisers on hand-computed values (000 App. D.1, D.6, E.1.2).

* ``SquaredLoss``: ``(1/B) sum_i ||z_i - y_i||^2 / 2``; integer labels are one-hot encoded;
* ``CrossEntropy``: ``(1/B) sum_i logsumexp(z_i) - z_{i, y_i}``;
* their gradients through the ``grad`` objective rule: ``(z - y)/B`` and ``(softmax(z) - onehot(y))/B``;
* ``L2(mu)``: value ``mu/2 ||w||^2``, gradient ``mu w``, prox ``v / (1 + step mu)``.
"""

from __future__ import annotations

import math

import pytest
import torch

import moreaugrad as mg
from helpers import DTYPE, assert_rel_close


def test_squared_loss_value():
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=DTYPE)
    # Squared errors 1 + 0 + 4 + 9 = 14, halved, over a batch of 2.
    loss = mg.losses.SquaredLoss()(z, y)
    assert loss.dtype == DTYPE and loss.shape == ()
    assert loss.item() == 3.5


def test_squared_loss_integer_labels_are_one_hot():
    z = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=DTYPE)
    labels = torch.tensor([1, 0])
    # ((1)^2 + (1)^2 + 0) + ((-0.5)^2 + 1 + 9) = 2 + 10.25, halved, over 2.
    assert mg.losses.SquaredLoss()(z, labels).item() == pytest.approx(12.25 / 4, rel=1e-15)
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=DTYPE)
    assert mg.losses.SquaredLoss()(z, labels).item() == mg.losses.SquaredLoss()(z, one_hot).item()


def test_cross_entropy_value():
    z = torch.tensor([[0.0, 0.0], [1.0, 3.0]], dtype=DTYPE)
    y = torch.tensor([1, 0])
    # log 2 for the uniform row; logsumexp(1, 3) - 1 = 2 + log(1 + e^-2) for the second.
    expected = (math.log(2.0) + 2.0 + math.log1p(math.exp(-2.0))) / 2
    loss = mg.losses.CrossEntropy()(z, y)
    assert loss.dtype == DTYPE
    assert loss.item() == pytest.approx(expected, rel=1e-14)


def test_squared_loss_gradient_through_objective_rule():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    loss, signal, info = mg.rules.Grad().objective(mg.losses.SquaredLoss(), z, y)
    assert info is None
    assert isinstance(signal, mg.Dual)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(0.5 * ((z - y) ** 2).sum().item() / 4, rel=1e-14)
    assert_rel_close(signal.value, (z - y) / 4, 1e-14)
    # The caller's output is not turned into a variable.
    assert not z.requires_grad and z.grad is None


def test_cross_entropy_gradient_through_objective_rule():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 4, generator=gen, dtype=DTYPE)
    y = torch.tensor([0, 3, 1, 2, 3])
    _, signal, _ = mg.rules.Grad().objective(mg.losses.CrossEntropy(), z, y)
    onehot = torch.zeros(5, 4, dtype=DTYPE)
    onehot[torch.arange(5), y] = 1.0
    assert_rel_close(signal.value, (torch.softmax(z, dim=1) - onehot) / 5, 1e-13)


def test_l2_value_grad_prox():
    reg = mg.losses.L2(0.5)
    w = torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=DTYPE)
    assert reg(w).item() == 0.5 * 0.5 * 14.0
    assert torch.equal(reg.grad(w), 0.5 * w)
    v = torch.tensor([3.0, -1.5], dtype=DTYPE)
    u = reg.prox(v, 2.0)
    assert torch.equal(u, v / 2.0)
    # u is the argmin of r(u) + ||u - v||^2 / (2 step): its gradient vanishes there.
    assert_rel_close(reg.grad(u) + (u - v) / 2.0, torch.zeros_like(u), 0.0)


def test_l2_accepts_int_mu():
    assert mg.losses.L2(2).mu == 2
    assert mg.losses.L2(2)(torch.ones(3, dtype=DTYPE)).item() == 3.0
