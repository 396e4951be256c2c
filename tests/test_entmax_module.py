"""AdaptiveEntmax: the nn.Module with a learnable alpha = 1 + sigmoid(a)."""

from __future__ import annotations

import math

import pytest
import torch

import entmax_cuda
from testing import ATOL, GRAD_RTOL
from entmax_cuda import AdaptiveEntmax


def test_default_alpha_is_one_and_a_half_and_learnable():
    module = AdaptiveEntmax()
    assert module.alpha().shape == (1,)
    torch.testing.assert_close(module.alpha(), torch.tensor([1.5]), rtol=0, atol=1e-7)
    assert [name for name, _ in module.named_parameters()] == ["alpha_logit"]


@pytest.mark.parametrize("alpha_init", [1.05, 1.5, 1.9])
def test_alpha_is_one_plus_sigmoid_of_the_logit(alpha_init):
    module = AdaptiveEntmax(n_heads=4, alpha_init=alpha_init)
    assert module.alpha().shape == (4,)
    torch.testing.assert_close(module.alpha(), torch.full((4,), alpha_init), rtol=0, atol=1e-6)
    with torch.no_grad():
        module.alpha_logit.copy_(torch.tensor([-3.0, 0.0, 1.0, 5.0]))
    torch.testing.assert_close(module.alpha(), 1 + torch.sigmoid(torch.tensor([-3.0, 0.0, 1.0, 5.0])))


def test_single_alpha_module_equals_functional(device):
    module = AdaptiveEntmax(alpha_init=1.3).to(device)
    scores = torch.randn(2, 4, 5, 30, device=device)
    alpha = 1 + torch.sigmoid(torch.tensor(math.log(0.3 / 0.7)))
    expected = entmax_cuda.entmax(scores, alpha.item(), dim=-1)
    torch.testing.assert_close(module(scores), expected, rtol=0, atol=ATOL[torch.float32])


def test_per_head_alpha_applies_each_heads_alpha(device):
    module = AdaptiveEntmax(n_heads=3).to(device)
    with torch.no_grad():
        module.alpha_logit.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    scores = torch.randn(2, 3, 4, 30, device=device)
    p = module(scores)
    for h in range(3):
        expected = entmax_cuda.entmax(scores[:, h], module.alpha()[h].item())
        torch.testing.assert_close(p[:, h], expected, rtol=0, atol=ATOL[torch.float32])


def test_gradients_reach_the_alpha_logits(device):
    module = AdaptiveEntmax(n_heads=3).to(device).double()
    scores = torch.randn(2, 3, 4, 30, dtype=torch.float64, device=device)
    target = torch.randn(2, 3, 4, 30, dtype=torch.float64, device=device)
    (module(scores) * target).sum().backward()
    grad = module.alpha_logit.grad
    assert grad is not None and grad.shape == (3,) and (grad != 0).all()
    # chain rule by hand: d alpha / d logit = sigmoid'(logit)
    alpha = module.alpha().detach().reshape(1, 3, 1, 1).clone().requires_grad_()
    (entmax_cuda.entmax(scores, alpha) * target).sum().backward()
    s = torch.sigmoid(module.alpha_logit.detach())
    torch.testing.assert_close(grad, alpha.grad.reshape(3) * s * (1 - s), rtol=GRAD_RTOL[torch.float64], atol=0)


def test_head_axis_can_be_chosen(device):
    module = AdaptiveEntmax(n_heads=3, head_dim=-2).to(device)
    scores = torch.randn(2, 3, 30, device=device)
    p = module(scores)
    assert p.shape == scores.shape
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, device=device), rtol=0, atol=1e-6)


def test_alpha_override_uses_the_given_per_session_alpha(device):
    # DSAN: one alpha per session, shaped (B, 1, 1), for scores (B, L, L)
    module = AdaptiveEntmax(n_heads=None).to(device)
    scores = torch.randn(3, 7, 7, device=device)
    session_alpha = torch.tensor([1.1, 1.5, 1.9], device=device).reshape(3, 1, 1).requires_grad_()
    p = module(scores, alpha=session_alpha)
    torch.testing.assert_close(p, entmax_cuda.entmax(scores, session_alpha.detach()), rtol=0, atol=0)
    p.square().sum().backward()
    assert session_alpha.grad.shape == (3, 1, 1)
    assert module.alpha_logit.grad is None  # the module's own alpha was not used


def test_alpha_override_accepts_a_float(device):
    module = AdaptiveEntmax(n_heads=2).to(device)
    scores = torch.randn(5, 20, device=device)  # no head axis needed with an explicit alpha
    assert torch.equal(module(scores, alpha=2.0), entmax_cuda.entmax(scores, 2.0))


@pytest.mark.parametrize("kwargs", [{"n_heads": 0}, {"n_heads": -2}, {"alpha_init": 1.0}, {"alpha_init": 2.0},
                                    {"alpha_init": 0.5}, {"n_heads": 2, "head_dim": 1}])
def test_bad_constructor_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        AdaptiveEntmax(**kwargs)


def test_scores_without_the_head_axis_raise_value_error(device):
    module = AdaptiveEntmax(n_heads=4).to(device)
    with pytest.raises(ValueError, match="n_heads"):
        module(torch.randn(2, 3, 5, 30, device=device))  # 3 heads, not 4
    with pytest.raises(ValueError, match="n_heads"):
        module(torch.randn(5, 30, device=device))  # too few dimensions


def test_state_dict_round_trip_restores_alpha_and_outputs(device):
    source = AdaptiveEntmax(n_heads=3).to(device)
    with torch.no_grad():
        source.alpha_logit.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    target = AdaptiveEntmax(n_heads=3).to(device)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.alpha(), source.alpha())
    scores = torch.randn(2, 3, 4, 30, device=device)
    assert torch.equal(target(scores), source(scores))
    with pytest.raises(RuntimeError):
        AdaptiveEntmax(n_heads=2).load_state_dict(source.state_dict())


def test_fixed_alpha_is_held_exactly_in_a_buffer_of_the_state_dict():
    module = AdaptiveEntmax(n_heads=2, alpha_init=1.2, learn_alpha=False)
    assert list(module.parameters()) == []
    assert list(module.state_dict()) == ["alpha_fixed"]
    assert torch.equal(module.alpha(), torch.full((2,), 1.2))


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.5])
def test_a_fixed_alpha_may_be_any_alpha_of_at_least_one(alpha):
    scores = torch.randn(2, 3, 5, 9, dtype=torch.float64)
    module = AdaptiveEntmax(n_heads=3, alpha_init=alpha, learn_alpha=False).double()
    want = torch.softmax(scores, -1) if alpha == 1.0 else entmax_cuda.entmax(scores, alpha, -1)
    torch.testing.assert_close(module(scores), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha_init, learn_alpha", [(1.0, True), (2.0, True), (0.9, False), (float("nan"), False),
                                                     (float("inf"), False)])
def test_alpha_init_outside_the_range_of_its_parametrisation_is_refused(alpha_init, learn_alpha):
    with pytest.raises(ValueError, match="alpha"):
        AdaptiveEntmax(alpha_init=alpha_init, learn_alpha=learn_alpha)


def test_alpha_keeps_its_precision_when_the_module_is_cast_to_half_types():
    learned = AdaptiveEntmax(n_heads=2, alpha_init=1.003)
    fixed = AdaptiveEntmax(n_heads=2, alpha_init=1.003, learn_alpha=False)
    want_learned, want_fixed = learned.alpha(), fixed.alpha()
    for dtype in (torch.bfloat16, torch.float16):
        for module, want in ((learned, want_learned), (fixed, want_fixed)):
            module.to(dtype)
            assert module.alpha().dtype == torch.float32 and torch.equal(module.alpha(), want)
    assert isinstance(learned.alpha_logit, torch.nn.Parameter)
    assert learned.double().alpha().dtype == torch.float64  # widening casts apply


def test_module_moves_with_to_and_keeps_the_dtype_of_scores(device):
    module = AdaptiveEntmax(n_heads=2).to(device)
    scores = torch.randn(1, 2, 3, 10, device=device, dtype=torch.float16)
    p = module(scores)
    assert p.dtype == torch.float16 and p.device.type == device
