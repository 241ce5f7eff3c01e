"""Run one scenario of the project's own code on fake CUDA and print what it found as JSON.

    LD_PRELOAD=<fake_cuda.so> python tests/fake_cuda/trace.py WORKDIR [SCENARIO ...]   (default: all)

Started by tests/test_fake_cuda.py, which builds the shim (harness.build_shim). CPU work runs for real;
only what is on "cuda" is fake, so the models are built and loaded as on a GPU machine and only their
move to the device makes them fake. A JSON line a scenario: {"scenario", "ok", "error", "syncs": {site: n},
"reads", ...}: device→host reads by call site (and region: @decode, @minibatch), and the scenario's own facts.
"""

import json
import random
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

from lm_human_preferences.utils import tf_adam  # noqa: E402

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
            # A barrier's tensor is torch's own, made on the device the backend names (CPU for the fake one).
            cpu = [tuple(t.shape) for t in tensors if t.device.type != "cuda" and func is not torch.ops.c10d.barrier.default]
            if self.nccl and cpu:
                raise AssertionError(f"{harness.call_site()}: collective {func} got CPU tensors {cpu} (NCCL refuses them)")
            self.log.device_work = True
            return _run_real(func, args, kwargs) if not fake else func(*args, **kwargs)
        if not fake and not on_cuda:
            return _run_real(func, args, kwargs)
        if func is aten._local_scalar_dense.default:
            site = harness.call_site()
            return self._read(args[0], next((v for k, v in harness.ANSWERS.items() if site.startswith(k)), _answer(args[0])))
        if func in (aten.allclose.default, aten.equal.default):  # a comparison read on the host
            return self._read(args[0], True)
        if func is aten.nonzero.default or func is aten.nonzero_static.default:
            # Scripted: one row in four is nonzero (a best-of-4 batch's group starts).
            x = args[0]
            self._read(x, None)
            return torch.empty((max(1, x.numel() // 4), x.dim()), dtype=torch.long, device=x.device)
        if func is aten._to_copy.default and _device(kwargs.get("device")) == "cpu" and args[0].device.type == "cuda":
            x = args[0]
            self._read(x, None)
            return _host_copy(x.shape, kwargs.get("dtype") or x.dtype)
        self.log.device_work = True
        self.last_op = func
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
            self.log.read(harness.call_site() + harness.region())
        return value


_HOST_VALUES = torch.Generator().manual_seed(0)
_HOST_INTS = random.Random(0)


def _host_copy(shape, dtype: torch.dtype) -> torch.Tensor:
    """A real CPU tensor standing for a copy of device data: varied values (token ids below
    harness.HOST_TOKENS), so that a mock labeler finds best responses, not only ties."""
    with unset_fake_temporarily():
        if dtype.is_floating_point:
            return torch.rand(shape, generator=_HOST_VALUES).to(dtype)
        return torch.randint(0, harness.HOST_TOKENS, shape, generator=_HOST_VALUES).to(dtype)


def _device(device) -> str | None:
    return None if device is None else torch.device(device).type


def _answer(tensor: torch.Tensor):
    """The scripted value of a host read: every check passes (finite, no padding), floats are 1, and
    integers varied (token ids: see _host_copy)."""
    if tensor.dtype == torch.bool:
        return True
    if tensor.dtype.is_floating_point:
        return 1.0
    return _HOST_INTS.randrange(1, harness.HOST_TOKENS)


def _run_real(func, args, kwargs):
    with unset_fake_temporarily():
        return func(*args, **kwargs)


class _StrongMemo(dict):
    """The converter's memo with strong references; a deep copy of a fake tensor (copy.deepcopy of a
    model) reaches the mode through it and must share it, not copy it while it grows."""

    def __deepcopy__(self, memo):
        return self


class _StrongIdKeys(_StrongMemo):
    """The describer's tensor and storage ids, keyed by identity and holding their keys strongly."""

    def __contains__(self, key):
        return super().__contains__(id(key))

    def __getitem__(self, key):
        return super().__getitem__(id(key))[1]

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __setitem__(self, key, value):
        super().__setitem__(id(key), (key, value))


class FakeCuda:
    """torch.cuda's Python queries answered as on `gpus` GPUs of `GPU_NAME` (bf16 native unless `emulated_bf16`)."""

    def __init__(self, gpus: int = 1, emulated_bf16: bool = False):
        self.gpus, self.emulated_bf16 = gpus, emulated_bf16

    def __enter__(self):
        self.saved = [(torch.cuda, name, getattr(torch.cuda, name)) for name in self.answers()]
        self.saved += [(torch, name, getattr(torch, name)) for name in ("tensor", "as_tensor")]
        for name, fn in self.answers().items():
            setattr(torch.cuda, name, fn)
        # torch.tensor(data, device="cuda") builds the tensor on the CPU and copies it inside C++, out of
        # the dispatch modes' reach; the same two steps in Python let FakeTensorMode see the copy.
        for name in ("tensor", "as_tensor"):
            setattr(torch, name, _on_cpu_then_moved(getattr(torch, name)))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)

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


def _on_cpu_then_moved(make):
    def wrapped(data, *args, device=None, **kwargs):
        made = make(data, *args, **kwargs)
        return made if device is None else made.to(device)
    return wrapped


def _our_frames(e: BaseException) -> str:
    """The traceback's frames outside torch (the project's and the trace's), then torch's last two."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/site-packages/torch/" not in f.filename]
    return "".join(traceback.format_list(ours + [f for f in frames[-2:] if f not in ours]))


def run(scenario, workdir: Path, gpus: int = 1, nccl: bool = False, emulated_bf16: bool = False) -> dict:
    """Run `scenario(workdir)` under fake CUDA; what it found."""
    tf_adam.WorkingCopy.sparse_lookup_gradient = False
    harness.HOST_TOKENS, harness.ANSWERS["training/stopping.py"] = 27, 0.0  # as a scenario before may have left them
    log = harness.Log()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Module.to() swaps a fake parameter for its converted copy, which fails while the converter's memos
    # hold weak references to it: these hold strong ones (the trace's tensors are small).
    converter = mode.fake_tensor_converter.meta_converter
    converter.tensor_memo = _StrongMemo()
    converter.describer.lookup_tensor = _StrongIdKeys()
    converter.describer.lookup_storage = _StrongIdKeys()
    result: dict = {"ok": True, "error": None}
    with FakeCuda(gpus, emulated_bf16):
        try:
            if nccl:
                from torch.testing._internal.distributed.fake_pg import FakeStore
                dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
                # Python objects (the seed) travel pickled in a byte tensor that the fake group cannot
                # build; rank 0, the source, keeps its own objects.
                broadcast_object_list = dist.broadcast_object_list
                dist.broadcast_object_list = lambda objects, src=0, group=None, device=None: None
            checks = Checks(log, nccl, mode)
            with mode, checks:
                extra = scenario(workdir, log)
            result.update(extra or {})
        except Exception as e:  # noqa: BLE001 - the trace reports every failure as data
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "op": str(getattr(checks, "last_op", None)),
                      "traceback": _our_frames(e)}
        finally:
            if nccl:
                dist.broadcast_object_list = broadcast_object_list
            if dist.is_initialized():
                dist.destroy_process_group()
    result["syncs"] = dict(log.syncs)
    result["reads"] = dict(log.reads)
    return result


if __name__ == "__main__":
    import scenarios

    root = Path(sys.argv[1])
    for name in sys.argv[2:] or scenarios.ALL:
        scenario, options = scenarios.ALL[name]
        (root / name).mkdir(parents=True, exist_ok=True)
        print("TRACE " + json.dumps(dict(run(scenario, root / name, **options), scenario=name)), flush=True)
