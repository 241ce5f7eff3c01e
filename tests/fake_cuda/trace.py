"""Run one scenario of the project's own code on fake CUDA and print what it found as JSON.

    LD_PRELOAD=<fake_cuda.so> python tests/fake_cuda/trace.py SCENARIO WORKDIR

Started by tests/test_fake_cuda.py, which builds the shim (harness.build_shim). CPU work runs for real;
only what is on "cuda" is fake, so the models are built and loaded as on a GPU machine and only their
move to the device makes them fake. The JSON line: {"ok", "error", "syncs": {site: n}, "reads", ...}.
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

aten = torch.ops.aten
GPU_NAME = "NVIDIA H100 80GB HBM3"


class Checks(TorchDispatchMode):
    """Above FakeTensorMode: real CPU work, scripted host reads, generator and collective checks."""

    def __init__(self, log: harness.Log, nccl: bool, fake_mode: FakeTensorMode):
        super().__init__()
        self.log, self.nccl, self.fake_mode = log, nccl, fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_cuda = any(t.device.type == "cuda" for t in tensors) or _device(kwargs.get("device")) == "cuda"
        fake = any(isinstance(t, FakeTensor) for t in tensors)
        generator = kwargs.get("generator")
        if generator is not None:
            wanted = "cuda" if on_cuda else "cpu"
            if generator.device.type != wanted:
                raise AssertionError(f"{harness.call_site()}: {func} on {wanted} was given a generator on "
                                     f"{generator.device.type} (a GPU refuses it)")
        if func.namespace == "c10d":
            cpu = [tuple(t.shape) for t in tensors if t.device.type != "cuda"]
            if self.nccl and cpu:
                raise AssertionError(f"{harness.call_site()}: collective {func} got CPU tensors {cpu} (NCCL refuses them)")
            self.log.device_work = True
            return _run_real(func, args, kwargs, tensors) if not fake else func(*args, **kwargs)
        if not fake and not on_cuda:
            return _run_real(func, args, kwargs, tensors)
        if func is aten._local_scalar_dense.default:
            return self._read(args[0], _answer(args[0]))
        if func is aten.nonzero.default or func is aten.nonzero_static.default:
            # Scripted: one row in four is nonzero (a best-of-4 batch's group starts).
            x = args[0]
            self._read(x, None)
            return torch.empty((max(1, x.numel() // 4), x.dim()), dtype=torch.long, device=x.device)
        if func is aten._to_copy.default and _device(kwargs.get("device")) == "cpu" and args[0].device.type == "cuda":
            x = args[0]
            self._read(x, None)
            with unset_fake_temporarily():
                return torch.zeros(x.shape, dtype=kwargs.get("dtype") or x.dtype)
        self.log.device_work = True
        # Real CPU tensors meeting fake ones become fake here (FakeTensorMode would run ops on small
        # ones for real, as constants, and a real op cannot reach "cuda").
        args, kwargs = tree_map(self._fake, (args, kwargs))
        return func(*args, **kwargs)

    def _fake(self, x):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return self.fake_mode.from_tensor(x)
        return x

    def _read(self, tensor: torch.Tensor, value):
        if tensor.device.type == "cuda":
            self.log.read(harness.call_site())
        return value


def _device(device) -> str | None:
    return None if device is None else torch.device(device).type


def _answer(tensor: torch.Tensor):
    """The scripted value of a host read: every check passes (finite, no padding), numbers are 1."""
    if tensor.dtype == torch.bool:
        return True
    return 1 if not tensor.dtype.is_floating_point else 1.0


def _run_real(func, args, kwargs, tensors):
    with unset_fake_temporarily():
        return func(*args, **kwargs)


class FakeCuda:
    """torch.cuda's Python queries answered as on `gpus` GPUs of `GPU_NAME` (bf16 native unless `emulated_bf16`)."""

    def __init__(self, gpus: int = 1, emulated_bf16: bool = False):
        self.gpus, self.emulated_bf16 = gpus, emulated_bf16

    def __enter__(self):
        cuda = torch.cuda
        self.saved = {name: getattr(cuda, name) for name in self.answers()}
        for name, fn in self.answers().items():
            setattr(cuda, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.cuda, name, fn)

    def answers(self) -> dict:
        emulated = self.emulated_bf16
        return {
            "is_available": lambda: True,
            "device_count": lambda: self.gpus,
            "current_device": lambda: 0,
            "set_device": lambda device: None,
            "synchronize": lambda device=None: None,
            "get_device_name": lambda device=None: "Tesla V100-SXM2-16GB" if emulated else GPU_NAME,
            "get_device_capability": lambda device=None: (7, 0) if emulated else (9, 0),
            "is_bf16_supported": lambda including_emulation=True: including_emulation or not emulated,
            "max_memory_allocated": lambda device=None: 0,
            "reset_peak_memory_stats": lambda device=None: None,
        }


def run(scenario, workdir: Path, gpus: int = 1, nccl: bool = False, emulated_bf16: bool = False) -> dict:
    """Run `scenario(workdir)` under fake CUDA; what it found."""
    log = harness.Log()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Module.to() swaps a fake parameter for its converted copy, which fails while the converter's memo
    # holds a weak reference to it: a plain dict holds strong ones (the trace's tensors are small).
    mode.fake_tensor_converter.meta_converter.tensor_memo = {}
    result: dict = {"ok": True, "error": None}
    with FakeCuda(gpus, emulated_bf16):
        try:
            if nccl:
                from torch.testing._internal.distributed.fake_pg import FakeStore
                dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
            with mode, Checks(log, nccl, mode):
                extra = scenario(workdir, log)
            result.update(extra or {})
        except Exception as e:  # noqa: BLE001 - the trace reports every failure as data
            result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": "".join(traceback.format_tb(e.__traceback__, limit=-14))}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    result["syncs"] = dict(log.syncs)
    result["reads"] = dict(log.reads)
    return result


if __name__ == "__main__":
    import scenarios

    name, workdir = sys.argv[1], Path(sys.argv[2])
    scenario, options = scenarios.ALL[name]
    print("TRACE " + json.dumps(run(scenario, workdir, **options)))
