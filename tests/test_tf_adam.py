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
