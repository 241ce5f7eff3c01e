"""Data-parallel ranks through torch.distributed (replacing the original's MPI/Horovod).

Every helper works unchanged in a single process (world size 1) where torch.distributed
is not initialized. Rank 0 owns downloads, printing, TensorBoard and checkpoints.
"""

import contextlib
import datetime
import errno
import functools
import json
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lm_human_preferences.utils.errors import Stopped, UserError

# Environment variables of launchers that start every rank themselves: (rank, world size, local rank).
_LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
}
# Seconds the other ranks get to exit on their own once one has stopped on SIGINT/SIGTERM: they
# all stop at the same update, and rank 0 must not be killed before it says where the run stopped.
STOP_GRACE = 30.0
STOP_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return _validation_world or 1


_validation_world: int | None = None  # set by validation_world() while hyper-parameters are checked


@contextlib.contextmanager
def validation_world(ranks: int, exact: bool = False):
    """Within the block, world_size() reports the world size the run will have, so that
    hyper-parameters are validated in the parent process before any rank is started: the
    launcher's (torchrun, mpirun, Slurm) when one started this process, else `ranks` (--mpi);
    `ranks` in any case when `exact` (to find which rank counts would do).
    Inside an initialized process group world_size() stays the real one.
    """
    global _validation_world
    launched = None if exact else external_launcher()
    previous, _validation_world = _validation_world, launched[2] if launched else ranks
    try:
        yield
    finally:
        _validation_world = previous


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its own GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


PRECISIONS = ("auto", "fp32", "bf16")

# `auto` on a CPU: bf16 only for models of at least this many parameters, and only on CPUs with
# native bf16 arithmetic (AVX512-BF16 or AMX). Measured on a 2-core Xeon with AMX, forward +
# backward of 8×88 tokens: GPT-2 124M 2.75 s float32 vs 1.04 s bf16, but the 0.8M demo model
# was 13× slower in bf16 (a bf16 cast costs more than its small matrix products save). Between
# them (bench/precision_crossover.py, fp32 time / bf16 time, on that machine shared with other
# jobs): 1.7M 0.69, 7M 0.76, 16M 0.86, 30M 0.92, 51M 1.00, 124M 1.05 with 2 threads; 0.97, 1.13,
# 1.30, 1.43, 1.74, 1.85 with one. From 50M on bf16 was never slower.
CPU_BF16_MIN_PARAMS = 50_000_000


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16).

    Without them (e.g. AVX2-only CPUs) oneDNN emulates bf16 and autocast is slower than float32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
        if flags is not None:
            return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    # No /proc/cpuinfo (not Linux): oneDNN's own check, plus an AVX-512 or better vector unit.
    return (torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def cuda_has_native_bf16() -> bool:
    """Whether this GPU computes bf16 natively (Ampere and later). torch's own check by default also
    counts GPUs that emulate it (V100, T4), where bf16 is slower than float32."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def compute_dtype(device: torch.device, precision: str = "auto", n_params: int | None = None) -> torch.dtype:
    """The dtype of matrix products under `precision` (auto / fp32 / bf16; see CPU_BF16_MIN_PARAMS).

    `auto` picks bf16 autocast where it is faster: CUDA GPUs with bf16 support, and CPUs with
    native bf16 for models of at least CPU_BF16_MIN_PARAMS parameters (`n_params`).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        if cuda_has_native_bf16():
            return torch.bfloat16
        if precision == "bf16":
            raise UserError(f"precision bf16 was asked for, but {torch.cuda.get_device_name(device)} has no native bf16 "
                            "(emulated, it is slower than float32); use precision auto or fp32")
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16() and (n_params or 0) >= CPU_BF16_MIN_PARAMS:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to `dtype` for one forward call (a no-op for float32).

    Keep its scope to single forward calls: autocast caches the cast weights until the context
    exits, so a context spanning optimizer steps would compute with stale weights. With dtype
    None: bf16 on CUDA GPUs that support it, full precision elsewhere.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and cuda_has_native_bf16() else torch.float32
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def main_first(fn: Callable):
    """fn() on rank 0 first, then on the other ranks (e.g. so only rank 0 downloads); returns its result."""
    if is_main():
        result = fn()
    barrier()
    if not is_main():
        result = fn()
    return result


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input is left unchanged)."""
    tensor = tensor.clone()
    if is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / world_size()


def mean_stats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar stats averaged over ranks, in one collective."""
    names = list(stats)
    values = all_reduce_mean(torch.stack([stats[n].detach().float() for n in names]))
    return dict(zip(names, values.tolist()))


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along the first axis, in rank order."""
    if not is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if not is_initialized():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, with one flat all-reduce."""
    if not is_initialized() or world_size() == 1:
        return
    for p in params:  # a parameter unused on this rank still takes part, with a zero gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_replicas_equal(module: torch.nn.Module) -> None:
    """Fail loudly if data-parallel ranks hold different weights (they must stay identical)."""
    if not is_initialized():
        return
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()])
    gathered = all_gather_cat(checksum[None])
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-6, atol=1e-6):
        raise RuntimeError("data-parallel ranks hold different weights; gradients were not averaged identically")


def default_ranks() -> int:
    """One rank per visible GPU, else 1."""
    return max(1, torch.cuda.device_count())


def check_local_ranks(ranks: int) -> None:
    """Ranks spawned on this machine get a GPU each, where there are GPUs."""
    if torch.cuda.is_available() and ranks > torch.cuda.device_count():
        raise UserError(f"--mpi {ranks} asks for more ranks than the {torch.cuda.device_count()} visible GPUs")


def rank_device(local_rank: int) -> torch.device:
    """The device of the rank of this machine numbered `local_rank` (as `_init` sets it)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def external_launcher() -> tuple[str, int, int, int] | None:
    """(launcher, rank, world, local rank) when torchrun, mpirun or Slurm started this process.

    A Slurm job step of one task is treated as not launched (e.g. `srun python launch.py ...`
    with --mpi N spawns the ranks itself).
    """
    for name, (rank_var, world_var, local_var) in _LAUNCHERS.items():
        if rank_var in os.environ and world_var in os.environ:
            world = int(os.environ[world_var])
            if name == "slurm" and world == 1:
                return None
            return name, int(os.environ[rank_var]), world, int(os.environ.get(local_var, 0))
    return None


def _seconds(variable: str, default: str) -> float:
    text = os.environ.get(variable, default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{variable} must be a positive number of seconds, got {text!r}")
    return value


def rank_timeout() -> float:
    """Seconds a rank may go silent (stopped, or stuck before a collective) before every rank is stopped."""
    return _seconds("LMHP_RANK_TIMEOUT", "1800")


def start_timeout() -> float:
    """Seconds the ranks wait for each other at the start (LMHP_START_TIMEOUT, default 300).

    Shorter than LMHP_RANK_TIMEOUT: at the start every rank has just been started and none works
    alone, so a rank (or node) missing there is noticed in minutes, not after half an hour. Later
    the ranks wait up to LMHP_RANK_TIMEOUT for rank 0, which downloads models, collects mock
    labels and writes checkpoints alone.
    """
    return _seconds("LMHP_START_TIMEOUT", "300")


def process_group_options(local_rank: int) -> dict:
    """init_process_group's backend and device: NCCL bound to this rank's GPU (so that NCCL knows its
    device from the start, instead of guessing at the first collective), else gloo on the CPU."""
    if torch.cuda.is_available():
        return dict(backend="nccl", device_id=rank_device(local_rank))
    return dict(backend="gloo")


def _init(rank: int, world: int, local_rank: int, init_method: str) -> None:
    """Join the process group; every rank must be there within start_timeout(). Then the group's
    collectives get rank_timeout(), through torch's `_set_pg_timeout` (the one way to change a
    group's timeout; torchtitan uses it too): init_process_group's timeout governs both the
    rendezvous and every later collective."""
    options = process_group_options(local_rank)
    if "device_id" in options:
        torch.cuda.set_device(options["device_id"])
    timeout = start_timeout()
    try:
        dist.init_process_group(init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout), **options)
        dist.barrier()  # NCCL connects the ranks at their first collective: this one
    except RuntimeError as e:
        raise UserError(f"rank {rank} of {world}: the other ranks did not all join within LMHP_START_TIMEOUT "
                        f"({timeout:g} s; {_first_line(e)}); start every rank (on every node, with the same "
                        "MASTER_ADDR and MASTER_PORT), or raise LMHP_START_TIMEOUT") from None
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=rank_timeout()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lost_rank(e: RuntimeError) -> bool:
    """Whether a collective failed because another rank is gone or silent (torch.distributed's
    errors, or the transport's: a closed or reset connection, a timeout)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        hint in text for hint in ("Connection closed by peer", "Connection reset by peer", "Timed out", "gloo", "NCCL"))


def _first_line(e: BaseException) -> str:
    """The error's first sentence (gloo's and NCCL's go on with generic advice)."""
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0][:300] if lines else type(e).__name__


def _run_rank(index: int, fn: Callable, args: tuple, world: int, init_method: str, failures: str) -> None:
    """Entry point of a spawned rank. A failure is reported in `failures`/<index> (when it happened,
    and the traceback of an unexpected error; a UserError prints its one line here) before the rank
    exits 1: the other ranks, blocked in a collective, fail only after that, so the launcher can
    name the rank that failed first."""
    try:
        _init(index, world, index, init_method)
        fn(*args)
    except Stopped as e:
        dist.destroy_process_group()
        if index == 0:
            print(f"{e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # a second signal: stopped at once, from the last checkpoint
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        trace = None
        if isinstance(e, UserError):
            print(f"error (rank {index}): {e}", file=sys.stderr, flush=True)
        elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error (rank {index}): disk full while writing {e.filename or 'a file'} ({e.strerror}); free "
                  "space and run again", file=sys.stderr, flush=True)
        else:
            trace = traceback.format_exc()
        _report_failure(os.path.join(failures, str(index)), trace)
        sys.exit(1)
    dist.destroy_process_group()


def _report_failure(path: str, trace: str | None) -> None:
    """Write when this rank failed (and the traceback of an unexpected error) for the launcher."""
    with open(path + ".tmp", "w") as f:
        json.dump({"time_ns": time.time_ns(), "trace": trace}, f)
    os.replace(path + ".tmp", path)


def run(fn: Callable, args: tuple, ranks: int) -> None:
    """Run fn(*args) on `ranks` data-parallel ranks of this machine.

    Under torchrun, mpirun or Slurm (rank and world size in the environment), this process is
    one rank and nothing is spawned. Otherwise `ranks` processes are started; when one fails,
    the others are stopped and a UserError names the rank that failed first.
    """
    launched = external_launcher()
    if launched is not None:
        name, rank, world, local_rank = launched
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError(f"started by {name} as rank {rank} of {world}, but MASTER_ADDR/MASTER_PORT are not set; "
                            "export them (the address and a free port of rank 0's host)")
        _init(rank, world, local_rank, "env://")
        try:
            fn(*args)
        except RuntimeError as e:
            if not _lost_rank(e):
                raise
            raise UserError(f"rank {rank} of {world} lost contact with another rank ({_first_line(e)}): a rank's "
                            f"process or node died, or was stopped or stuck for LMHP_RANK_TIMEOUT ({rank_timeout():g} s); "
                            "this rank stopped too. Rerun the same command on every node to resume from the last "
                            "checkpoint") from e
        finally:
            dist.destroy_process_group()
        return
    if ranks == 1:
        fn(*args)
        return
    check_local_ranks(ranks)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="lmhp-ranks-") as failures:
        context = mp.start_processes(_run_rank, args=(fn, args, ranks, init_method, failures), nprocs=ranks,
                                     join=False, start_method="spawn")
        pids = [p.pid for p in context.processes]
        # The ranks stop after their current update on SIGINT/SIGTERM (a repeat within 2 s counts once).
        previous = {s: signal.signal(s, lambda signum, _: [_signal(pid, signum) for pid in pids])
                    for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            failed = _supervise(context.processes, rank_timeout())
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if failed is not None:
            raise _failure(context.processes, failed, failures)


def _supervise(processes: list, timeout: float) -> int | None:
    """Wait for the spawned ranks; None when all succeeded, else the index of the first that failed
    (the others are then stopped). Ranks that stop on SIGINT/SIGTERM all stop at the same update,
    so the others get STOP_GRACE seconds to exit on their own: rank 0 reports where the run stopped."""
    stopped_since: dict[int, float] = {}
    while any(p.exitcode is None for p in processes):
        multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout=1)
        failed = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
        if failed:
            _stop_all(processes, STOP_GRACE if processes[failed[0]].exitcode in STOP_CODES else 0.0)
            return failed[0]
        _check_stopped_ranks(processes, stopped_since, timeout)
    return None


def _stop_all(processes: list, grace: float) -> None:
    """Give the ranks `grace` seconds to exit, then SIGTERM, then (30 s later) SIGKILL the rest."""
    _join_all(processes, grace)
    for p in processes:
        if p.is_alive():
            p.terminate()
    _join_all(processes, 30.0)
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


def _join_all(processes: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))


def _failure(processes: list, first_seen: int, failures: str) -> BaseException:
    """What the launcher raises once rank `first_seen` was seen to fail: Stopped when it stopped on
    a signal, else a UserError naming the rank whose failure report is the earliest."""
    reports = {}
    for name in os.listdir(failures):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError), open(os.path.join(failures, name)) as f:
                reports[int(name)] = json.load(f)
    index = min(reports, key=lambda i: reports[i]["time_ns"]) if reports else first_seen
    code = processes[index].exitcode
    if code in STOP_CODES:
        return Stopped(code - 128, "stopped; rerun the same command to resume")
    trace = reports.get(index, {}).get("trace")
    if trace:
        print(trace, file=sys.stderr)
        return UserError(f"rank {index} failed with the error above; the other ranks were stopped")
    return UserError(f"rank {index} failed (exit code {code}); the other ranks were stopped")


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _check_stopped_ranks(processes: list, stopped_since: dict[int, float], timeout: float) -> None:
    """Stop every rank when one has been stopped (SIGSTOP, a debugger) for longer than `timeout` seconds."""
    now = time.monotonic()
    for index, process in enumerate(processes):
        try:
            with open(f"/proc/{process.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # not Linux, or the process is gone: the next wait reports it
        if state not in ("T", "t"):
            stopped_since.pop(index, None)
            continue
        since = stopped_since.setdefault(index, now)
        if now - since > timeout:
            for other in processes:
                other.kill()
            raise UserError(f"rank {index} (pid {process.pid}) stopped responding for {now - since:.0f} s "
                            "(LMHP_RANK_TIMEOUT); every rank was stopped")
