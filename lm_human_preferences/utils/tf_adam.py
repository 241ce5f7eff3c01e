"""Adam with TensorFlow 1's epsilon convention, as the original trained with.

TF1's AdamOptimizer updates
    lr_t = lr · sqrt(1 − β2^t) / (1 − β1^t)
    θ ← θ − lr_t · m / (sqrt(v) + ε)
i.e. ε is added to sqrt(v) *before* bias correction; PyTorch's Adam adds it after. The
difference matters in the first steps (PyTorch's first updates are much larger with
ε = 1e-5), so PPO and reward training use this optimizer to reproduce the original.
"""

import math

import torch


class TFAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-5):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                dtype = torch.promote_types(p.dtype, torch.float32)  # moments at least float32
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, dtype=dtype)
                    state["v"] = torch.zeros_like(p, dtype=dtype)
                state["step"] += 1
                t = state["step"]
                grad = p.grad.to(dtype)
                state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                lr_t = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                update = state["m"] / (state["v"].sqrt() + group["eps"])
                p.add_(update.to(p.dtype), alpha=-lr_t)
        return loss

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr
