"""Adam with TensorFlow 1's epsilon convention, as the original trained with.

TF1's AdamOptimizer updates
    lr_t = lr · sqrt(1 − β2^t) / (1 − β1^t)
    θ ← θ − lr_t · m / (sqrt(v) + ε)
i.e. ε is added to sqrt(v) *before* bias correction; PyTorch's Adam adds it after. The
difference matters in the first steps (PyTorch's first updates are much larger with
ε = 1e-5), so PPO and reward training use this optimizer to reproduce the original.

PyTorch's Adam updates θ ← θ − lr / (1 − β1^t) · m / (sqrt(v) / sqrt(1 − β2^t) + ε'). With
ε' = ε / sqrt(1 − β2^t) that is exactly TF's rule, so this optimizer is torch.optim.Adam
(its fused kernel where the parameters allow it, else foreach) with ε' set before each
step. `param_groups[i]["eps"]` always shows TF's ε; the state is torch.optim.Adam's
(`step`, `exp_avg`, `exp_avg_sq`), so state_dict/load_state_dict round-trip exactly.
"""

import contextlib
import copy
import math
import weakref

import torch
from torch import nn

_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """The fused kernel takes floating-point tensors on CPU, CUDA, MPS and XPU, all on one device type."""
    types = {p.device.type for p in params}
    return (len(types) <= 1 and types <= {"cpu", "cuda", "mps", "xpu"}
            and all(p.dtype in _FUSED_DTYPES and not p.is_sparse for p in params))


class TFAdam(torch.optim.Adam):
    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-5):
        params = list(params)
        flat = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        fused = _fused_supported(flat)
        super().__init__(params, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)
        self._host_steps: dict[torch.Tensor, int] = {}  # parameter -> Adam steps taken (see _steps_taken)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            steps = self._steps_taken(with_grad)
            by_step: dict[int, list[torch.Tensor]] = {}  # parameters on the same step share ε'
            for p in with_grad:
                by_step.setdefault(steps[p] + 1, []).append(p)
            all_params, tf_eps = group["params"], group["eps"]
            try:
                for t, params in by_step.items():
                    group["params"] = params
                    group["eps"] = tf_eps / math.sqrt(1 - group["betas"][1] ** t)
                    self._step_group(group)
                    # The fused kernel writes the parameters without telling autograd; counting the
                    # write keeps version checks (WorkingCopy's refresh, saved-tensor checks) true.
                    torch.autograd.graph.increment_version(params)
            finally:
                group["params"], group["eps"] = all_params, tf_eps
            for p in with_grad:
                self._host_steps[p] = steps[p] + 1
        return loss

    def _steps_taken(self, params: list[torch.Tensor]) -> dict[torch.Tensor, int]:
        """Each parameter's steps so far. ε' depends on them, and Adam keeps them on the device (the
        fused kernel's `step` tensors): they are mirrored on the host, so a step reads nothing back
        from the device; only parameters with state from a load are read, in one sync."""
        unknown = [p for p in params if p not in self._host_steps and self.state.get(p)]
        if unknown:
            device = self.state[unknown[0]]["step"].device
            read = torch.stack([self.state[p]["step"].to(device, torch.float64) for p in unknown]).tolist()
            self._host_steps.update((p, int(n)) for p, n in zip(unknown, read))
        return {p: self._host_steps.get(p, 0) for p in params}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._host_steps.clear()

    def _step_group(self, group: dict) -> None:
        """torch.optim.Adam's step for one group (its public step() iterates self.param_groups).

        On CPU the fused kernel runs on one thread: it is memory-bound, so a second thread adds
        little, while its per-tensor barrier costs a scheduler slice whenever another core is
        busy (GPT-2 124M, 2-core Xeon shared with other jobs: 0.60 s a step on 2 threads, 0.22 s
        on one; the Python loop this replaced: 4.4 s there, 0.25 s on a quiet machine).
        """
        saved = self.param_groups
        threads = torch.get_num_threads()
        one_thread = group["fused"] and group["params"][0].device.type == "cpu" and threads > 1
        self.param_groups = [group]
        try:
            if one_thread:
                torch.set_num_threads(1)
            super().step()
        finally:
            self.param_groups = saved
            if one_thread:
                torch.set_num_threads(threads)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a copy: torch.optim.Adam would otherwise share the saved step and moment tensors."""
        super().load_state_dict(copy.deepcopy(state_dict))

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr


class WorkingCopy:
    """A low-precision copy of a module's Linear layers (and of its output embedding), kept in step
    with the float32 weights the optimizer updates, so that no forward pass casts the weights.

    Under bf16 autocast every forward pass casts each float32 weight to bf16 (a fresh tensor per
    weight per call) and the backward pass casts each bf16 weight gradient back to float32. With
    a working copy the forward runs on bf16 tensors made once, refreshed from the float32 master
    only when an optimizer step (or a load) has changed it (each tensor's version counter says
    so), and a gradient hook adds each bf16 gradient into a float32 buffer kept from step to step,
    which becomes the master's `.grad` — exactly the values autocast's casts give, so the forward
    pass is bit for bit the autocast one. The output embedding's copy (`wte_lowp`) serves the
    tied logits; the token lookup keeps the float32 master and a sparse gradient, added into the
    same buffer (sparing the dense zero-filled vocabulary-sized gradient of every backward pass).
    Adam, its state, `.grad` as the trainers see it, and checkpoints stay float32.
    """

    # The token lookup's gradient sparse (above). Tracing on fake tensors turns it off: sparse
    # gradients have no fake kernels (tests/fake_cuda); the dense gradient has the same values.
    sparse_lookup_gradient = True

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        # (module, attribute, is_buffer) -> (master, working copy, master version at the last refresh)
        self._slots: list[tuple[nn.Module, str, bool, nn.Parameter, torch.Tensor]] = []
        self._versions: list[int] = []
        self._buffers: dict[int, torch.Tensor] = {}  # id(master) -> its float32 gradient buffer
        for module in model.modules():
            if isinstance(module, nn.Linear):
                for name, param in module.named_parameters(recurse=False):
                    if param.requires_grad:
                        self._add(module, name, False, param)
        wte = getattr(model, "wte", None)
        if isinstance(wte, nn.Embedding) and wte.weight.requires_grad and "wte_lowp" in model._buffers:
            self._add(model, "wte_lowp", True, wte.weight)
            wte.sparse = self.sparse_lookup_gradient
            wte.weight.register_post_accumulate_grad_hook(self._densify)
        self.refresh()

    def _add(self, module: nn.Module, name: str, is_buffer: bool, master: nn.Parameter) -> None:
        working = master.detach().to(self.dtype).requires_grad_(True)
        working.register_post_accumulate_grad_hook(lambda w, master=master: self._to_master(master, w))
        self._slots.append((module, name, is_buffer, master, working))
        self._versions.append(-1)

    def _buffer(self, master: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(id(master))
        if buffer is None:
            buffer = self._buffers[id(master)] = torch.empty_like(master, memory_format=torch.contiguous_format)
        return buffer

    @torch.no_grad()
    def _to_master(self, master: nn.Parameter, working: torch.Tensor) -> None:
        """The working copy's gradient, added into the master's float32 gradient."""
        grad = master.grad
        if grad is None:
            master.grad = self._buffer(master).copy_(working.grad)
        elif grad.is_sparse:
            master.grad = self._buffer(master).copy_(working.grad).add_(grad)
        else:
            grad.add_(working.grad)
        working.grad = None

    @torch.no_grad()
    def _densify(self, master: nn.Parameter) -> None:
        """A sparse gradient (the token lookup's, when no dense one came first) as the master's dense buffer."""
        if master.grad is not None and master.grad.is_sparse:
            master.grad = self._buffer(master).zero_().add_(master.grad)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy every master that changed since its last copy (an optimizer step, a load)."""
        for i, (_, _, _, master, working) in enumerate(self._slots):
            if master._version != self._versions[i]:
                working.copy_(master)
                self._versions[i] = master._version

    @contextlib.contextmanager
    def active(self):
        """Within the block the model computes with the working copy (refreshed first)."""
        self.refresh()
        saved = []
        try:
            for module, name, is_buffer, _, working in self._slots:
                table = module._buffers if is_buffer else module._parameters
                saved.append((table, name, table[name]))
                table[name] = working
            yield
        finally:
            for table, name, original in saved:
                table[name] = original


_working_copies: "weakref.WeakKeyDictionary[nn.Module, WorkingCopy]" = weakref.WeakKeyDictionary()


def working_copy(model: nn.Module, dtype: torch.dtype) -> WorkingCopy:
    """The model's working copy in `dtype` (one per model: policies sharing a model share it)."""
    existing = _working_copies.get(model)
    if existing is None or existing.dtype != dtype:
        if existing is not None:
            raise ValueError(f"the model already has a {existing.dtype} working copy")
        existing = _working_copies[model] = WorkingCopy(model, dtype)
    return existing
