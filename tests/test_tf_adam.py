import numpy as np
import torch

from lm_human_preferences.utils.tf_adam import TFAdam


def tf1_adam_reference(theta, grads, lrs, beta1=0.9, beta2=0.999, eps=1e-5):
    """TF1 AdamOptimizer's update rule (training_ops.ApplyAdam), written out in numpy."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        lr_t = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        theta = theta - lr_t * m / (np.sqrt(v) + eps)
    return theta


def test_tf_adam_matches_tf1_rule_over_several_steps():
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) * scale for scale in (1e-4, 1e-3, 1.0, 1e-6, 0.1, 2.0)]
    lrs = [1e-2 * (1 - i / 6) for i in range(6)]  # linearly annealed, as in training
    p = torch.nn.Parameter(torch.tensor(theta0))
    opt = TFAdam([p], lr=lrs[0])
    for g, lr in zip(grads, lrs):
        opt.set_lr(lr)
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), tf1_adam_reference(theta0, grads, lrs), rtol=1e-10, atol=1e-12)


def test_first_step_differs_from_pytorch_adam_with_small_gradients():
    """With tiny gradients, TF's convention takes a much smaller first step than torch.optim.Adam."""
    g = torch.full((5,), 1e-6, dtype=torch.float64)
    a = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    tf_opt, pt_opt = TFAdam([a], lr=1.0), torch.optim.Adam([b], lr=1.0, eps=1e-5)
    a.grad, b.grad = g.clone(), g.clone()
    tf_opt.step()
    pt_opt.step()
    # step 1: m = 0.1·g, sqrt(v) = sqrt(0.001)·g, lr_t = sqrt(0.001)/0.1, so TF moves
    # sqrt(0.001)·g / (sqrt(0.001)·g + ε) ≈ 0.00315 while PyTorch moves g / (g + ε) ≈ 0.0909
    tf_expected = np.sqrt(0.001) * 1e-6 / (np.sqrt(0.001) * 1e-6 + 1e-5)
    np.testing.assert_allclose(-a.detach().numpy(), tf_expected, rtol=1e-9)
    np.testing.assert_allclose(-b.detach().numpy(), 1e-6 / (1e-6 + 1e-5), rtol=1e-9)


def test_tf_adam_state_dict_round_trips_exactly():
    """A resumed optimizer continues exactly as the uninterrupted one."""
    torch.manual_seed(0)
    grads = [[torch.randn(3, 4), torch.randn(5)] for _ in range(4)]
    a = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = TFAdam(a, lr=1e-2)
    for g in grads[:2]:
        for p, gi in zip(a, g):
            p.grad = gi.clone()
        opt_a.step()
    saved = opt_a.state_dict()
    with torch.no_grad():
        for p, q in zip(b, a):
            q_copy = q.detach().clone()
            p.copy_(q_copy)
    opt_b = TFAdam(b, lr=5.0, eps=1.0)  # the loaded state replaces lr and eps
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["eps"] == 1e-5 and opt_b.param_groups[0]["lr"] == 1e-2
    for g in grads[2:]:
        for opt, params in ((opt_a, a), (opt_b, b)):
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert opt_a.param_groups[0]["eps"] == 1e-5  # TF's ε is what the group shows after a step


def test_tf_adam_parameters_on_different_steps_follow_the_rule_each():
    """A parameter that joins late (no gradient in the first steps) gets its own bias correction."""
    rng = np.random.default_rng(1)
    theta = [rng.normal(size=(4,)), rng.normal(size=(2,))]
    grads0 = [rng.normal(size=(4,)) for _ in range(3)]
    grads1 = [rng.normal(size=(2,)) for _ in range(2)]
    p0, p1 = (torch.nn.Parameter(torch.tensor(t)) for t in theta)
    opt = TFAdam([p0, p1], lr=1e-2)
    for step in range(3):
        p0.grad = torch.tensor(grads0[step])
        p1.grad = torch.tensor(grads1[step - 1]) if step >= 1 else None
        opt.step()
    np.testing.assert_allclose(p0.detach().numpy(), tf1_adam_reference(theta[0], grads0, [1e-2] * 3), rtol=1e-10)
    np.testing.assert_allclose(p1.detach().numpy(), tf1_adam_reference(theta[1], grads1, [1e-2] * 2), rtol=1e-10)
