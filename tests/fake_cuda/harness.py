"""Fake CUDA on torch's CPU build: run the project's own code on `cuda` tensors without a GPU.

FakeTensorMode (torch._subclasses.fake_tensor) gives tensors shapes, dtypes and devices but no data,
and raises FakeTensorDeviceMismatchError when an op meets a cuda and a cpu tensor, as a GPU would. Three
more pieces make a whole training step run that way:

- `shim.cpp`, a do-nothing CUDA device guard, CUDA hooks and CUDA generator, built once per torch
  version (`build_shim`) and loaded with LD_PRELOAD before torch is imported (torch caches its CUDA
  hooks the first time it asks for them), so that tensors can be moved to "cuda", backward runs and
  `torch.Generator("cuda")` exists with a real CUDA generator's 16-byte state;
- `torch.cuda`'s Python queries answered as on one GPU (`FakeCuda`);
- `Checks`, a dispatch mode above FakeTensorMode that answers every device→host read (`.item()`,
  `bool(t)`, `.tolist()`, `nonzero`, a copy to the CPU) with a scripted value, logs it by the call
  site in the package, and fails on what a GPU would refuse that FakeTensorMode lets through: a
  generator on another device than the op's, and a collective given a CPU tensor under NCCL.
"""

import hashlib
import os
import subprocess
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SHIM = Path(__file__).with_name("shim.cpp")
PACKAGE = "lm_human_preferences"


# Host reads answered otherwise than with 1 (True for a check), by call site: no rank asked to stop (the
# signal number; a scenario that stops a run sets it).
ANSWERS = {"training/stopping.py": 0.0}
# Token ids a copy of device data to the host holds: below every vocabulary here (the `test` model's 27)
# unless a scenario on a larger model says otherwise.
HOST_TOKENS = 27


class ShimUnavailable(Exception):
    """The shim cannot be built for the installed torch (no g++, no headers, an incompatible API)."""


def shim_path() -> Path:
    """Where the shim for the installed torch and this shim.cpp is kept (built once, then reused)."""
    import torch

    key = hashlib.sha256(SHIM.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get("LMHP_FAKE_CUDA_DIR", Path.home() / ".cache" / "lmhp-fake-cuda"))
    return root / f"torch-{torch.__version__}-{key}" / "fake_cuda.so"


def build_shim() -> Path:
    """Compile shim.cpp against the installed torch's headers (once per torch version); its path."""
    import torch
    from torch.utils import cpp_extension

    target = shim_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lib = Path(torch.__file__).parent / "lib"
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    command = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", str(SHIM), "-o", str(partial),
               *(f"-I{p}" for p in cpp_extension.include_paths()), f"-L{lib}", "-lc10", "-ltorch_cpu",
               f"-Wl,-rpath,{lib}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ShimUnavailable(f"cannot run g++ ({e})") from None
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ShimUnavailable(f"g++ failed for torch {torch.__version__}: {done.stderr.strip().splitlines()[-1:]}")
    partial.replace(target)
    return target


def call_site() -> str:
    """The innermost frame of the package (else of the caller) that led here: `path:line (function)`."""
    frames = traceback.extract_stack()[:-2]
    ours = [f for f in frames if f"/{PACKAGE}/" in f.filename] or frames
    frame = ours[-1]
    path = frame.filename.split(f"/{PACKAGE}/")[-1] if f"/{PACKAGE}/" in frame.filename else Path(frame.filename).name
    return f"{path}:{frame.lineno} ({frame.name})"


def region() -> str:
    """`@decode` inside sampling's decode loop (language/sample.py, from its `for step` line on),
    `@minibatch` inside a PPO minibatch (train_policy.PPOTrainer.train_minibatch), else ''."""
    frames = traceback.extract_stack()
    for f in frames:
        if f.filename.endswith("language/sample.py") and f.name == "sample" and f.lineno >= _decode_loop_line():
            return "@decode"
    if any(f.filename.endswith("training/train_policy.py") and f.name == "train_minibatch" for f in frames):
        return "@minibatch"
    return ""


def _decode_loop_line() -> int:
    import inspect

    from lm_human_preferences.language import sample

    lines, first = inspect.getsourcelines(sample.sample)
    return first + next(i for i, line in enumerate(lines) if line.strip().startswith("for step in range("))


@dataclass
class Log:
    """Device→host reads, by call site. A *sync* is a read after device work: reads that follow one
    another with no device op between them (`.tolist()` reads every element) wait only once."""
    reads: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    device_work: bool = True

    def read(self, site: str) -> None:
        self.reads[site] += 1
        if self.device_work:
            self.syncs[site] += 1
        self.device_work = False

    def total(self) -> int:
        return sum(self.syncs.values())
