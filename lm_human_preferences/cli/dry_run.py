"""`launch.py ... --dry_run`: the run as it would start here — its ranks and their devices, each
rank's share of every batch, the precision `run.precision` resolves to, the estimated peak memory
a rank and duration (training/estimate.py), and what it would do with its save folder."""

import os
from pathlib import Path

import torch

from lm_human_preferences.labeling import label_types
from lm_human_preferences.language import trained_models
from lm_human_preferences.training import estimate, runs, train_policy, train_reward
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import UserError

LISTED_DEVICES = 4  # ranks whose device is named one by one; more are summarized
FULL = 0.9  # an estimate above this share of a device's memory is flagged


def _devices(count: int) -> tuple[str, torch.device]:
    """(the ranks and their devices in words, rank 0's device)."""
    launched = distributed.external_launcher()
    if launched:
        name, rank, world, local = launched
        device = distributed.rank_device(local)
        return f"{world}, started by {name}; this process is rank {rank} (local rank {local}) on {device}", device
    devices = [distributed.rank_device(i) for i in range(count)]
    if devices[0].type == "cpu":
        how = f"one process, {torch.get_num_threads()} torch threads" if count == 1 else \
            f"{count} processes on {os.cpu_count()} cores"
        return f"{count} on the cpu ({how}; no GPU visible)", devices[0]
    shown = ", ".join(f"rank {i} → {d}" for i, d in enumerate(devices[:LISTED_DEVICES]))
    more = f", …, rank {count - 1} → {devices[-1]}" if count > LISTED_DEVICES else ""
    return f"{count} ({shown}{more}; {torch.cuda.get_device_name(devices[0])})", devices[0]


def _precision(device: torch.device, precision: str, n_params: int | None) -> tuple[torch.dtype, str]:
    """The dtype `precision` resolves to on `device`, and why."""
    dtype = distributed.compute_dtype(device, precision, n_params)
    if precision != "auto":
        why = "as asked"
    elif device.type == "cuda":
        why = "the GPU supports bf16" if dtype == torch.bfloat16 else "the GPU has no bf16"
    elif not distributed.cpu_has_native_bf16():
        why = "this CPU has no native bf16"
    else:
        why = "native bf16 on this CPU" + (", model at least" if dtype == torch.bfloat16 else ", model under") + \
              f" {distributed.CPU_BF16_MIN_PARAMS / 1e6:g}M parameters"
    name = str(dtype).removeprefix("torch.")
    return dtype, f"run.precision {precision} → {name} on {device.type} ({why})"


def _reward_batches(hp: train_reward.HParams, count: int, key: str) -> str:
    responses = len(label_types.get(hp.labels.type).response_keys)
    per_rank = hp.batch_size // count
    return (f"{hp.labels.num_train} labels × {hp.epochs} epoch(s) in batches of {hp.batch_size} = {per_rank} a rank "
            f"({per_rank * responses} sequences, {hp.labels.type}), {hp.total_steps} steps; rollout batch "
            f"{hp.rollout_batch_size} = {hp.rollout_batch_size // count} a rank (sampling for {key}normalize_samples)")


def _ppo_batches(hp: train_policy.HParams, count: int) -> str:
    per_rank = hp.ppo.batch_size // count
    minibatch = per_rank // hp.ppo.nminibatches
    micro = min(hp.run.chunk_size or minibatch, minibatch)
    return (f"batch {hp.ppo.batch_size} = {per_rank} a rank, minibatch {minibatch} a rank (ppo.nminibatches "
            f"{hp.ppo.nminibatches}), micro-batches of {micro} rows (run.chunk_size {hp.run.chunk_size}); "
            f"{hp.total_updates} updates of {hp.ppo.noptepochs} epochs")


def _memory(mode: str, hp, shape: estimate.Shape, count: int, dtype: torch.dtype,
            device: torch.device) -> list[str]:
    cpu = device.type == "cpu"
    phases = []
    reward_hp = hp if mode == "train_reward" else hp.rewards.train_new_model
    if reward_hp is not None:
        responses = len(label_types.get(reward_hp.labels.type).response_keys)
        phases.append(estimate.reward_memory(reward_hp, shape, count, dtype, cpu, responses,
                                             policies_loaded=mode == "train_policy"))
    if mode == "train_policy":
        phases.append(estimate.ppo_memory(hp, shape, count, dtype, cpu))
    peak = max(phases, key=lambda m: m.total)
    size, gib = estimate.format_bytes, estimate.GIB
    line = (f"≈ {size(peak.total)} of tensors a rank at its peak, in {peak.phase}: {size(peak.models)} of models "
            f"and optimizer state, {size(peak.activations)} of activations for {peak.rows} sequences a pass (an "
            "estimate from the model's shape and the batch: training/estimate.py; the runtime's own memory comes "
            "on top)")
    lines = [line]
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if peak.total > FULL * total:
            lines.append(f"warning: that is more than {FULL:.0%} of the {total / gib:.0f} GiB of {device}; lower "
                         "run.chunk_size or set run.gradient_checkpointing on")
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if peak.total * count > FULL * total:
            lines.append(f"warning: {count} ranks × that is more than {FULL:.0%} of this machine's {total / gib:.0f} "
                         "GiB; lower run.chunk_size, set run.gradient_checkpointing on, or use fewer ranks")
    return lines


def _time(mode: str, hp, shape: estimate.Shape, count: int, dtype: torch.dtype, device: torch.device) -> str:
    reward_hp = hp if mode == "train_reward" else hp.rewards.train_new_model
    flops = 0.0
    if reward_hp is not None:
        flops += estimate.reward_flops(reward_hp, shape, len(label_types.get(reward_hp.labels.type).response_keys))
    if mode == "train_policy":
        flops += hp.total_updates * hp.ppo.batch_size * estimate.ppo_flops(hp, shape)
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    rate = estimate.flop_rate(name, dtype, torch.get_num_threads())
    if rate is None:
        return (f"no estimate for {name} (known: {', '.join(estimate.PEAK_TFLOPS)} in their dtypes, and CPUs); "
                f"{flops / 1e15:.1f} PFLOP in all")
    ranks = 1 if device.type == "cpu" else count  # ranks on a CPU share its cores
    seconds = estimate.duration(flops, rate[0], ranks)
    return f"≈ {estimate.format_seconds(seconds)} — an estimate: {flops / 1e15:.2f} PFLOP at {rate[1]}"


def _save_folder(mode: str, hp, count: int) -> str:
    """What the run would do with its save folder; a UserError where the run would refuse it."""
    folder = Path(hp.run.save_dir)
    saved = runs.saved_run(folder, mode) if folder.is_dir() else None
    if saved is None:
        return f"{folder}: a new run"
    if saved.in_use:
        raise UserError(f"{folder} is in use by another run; wait for it to end, or give this run another name "
                        "or --save_dir")
    differ = runs.differences(hp, saved)
    if differ and not hp.run.overwrite:
        raise UserError(f"{folder} holds a run with other hparams ({', '.join(differ[:4])}); give this run another "
                        "name, or rerun with --run.overwrite on to replace it")
    if hp.run.overwrite:
        return f"{folder}: --run.overwrite on replaces the run there ({saved.progress()})"
    if saved.finished:
        raise UserError(f"{folder} holds a {mode} run that finished; give this run another name, or rerun with "
                        "--run.overwrite on to train again")
    if saved.world is not None and saved.world != count:
        raise UserError(f"{folder} was saved by {saved.world} ranks and cannot resume on {count}; "
                        f"rerun with --mpi {saved.world}")
    return f"{folder}: resumes the run there ({saved.progress()})"


def plan(mode: str, hp, count: int, valid: list[int]) -> list[str]:
    """The dry run's lines after the hparams (raises a UserError for a check the run would fail)."""
    ranks, device = _devices(count)
    model_hp = trained_models.local_hparams(hp.task.policy.initial_model)
    shape = estimate.shape(model_hp) if model_hp is not None else None
    dtype, precision = _precision(device, hp.run.precision, shape.params if shape else None)
    lines = [f"ranks:       {ranks}", f"precision:   {precision}"]
    if mode == "train_reward":
        lines.append(f"reward model: {_reward_batches(hp, count, '')}")
    elif mode == "train_dpo":
        lines.append(f"DPO:         {hp.labels.num_train} labels × {hp.epochs} epoch(s) in batches of {hp.batch_size} "
                     f"= {hp.batch_size // count} a rank ({hp.labels.type}, loss {hp.loss}), {hp.total_steps} steps")
    else:
        if hp.rewards.train_new_model is not None:
            reward = _reward_batches(hp.rewards.train_new_model, count, "rewards.train_new_model.")
            lines.append(f"reward model: {reward}")
        lines.append(f"PPO:         {_ppo_batches(hp, count)}")
    if mode == "train_dpo":
        lines.append("memory, time: not estimated for train_dpo (training/estimate.py models the reward model and PPO)")
    elif shape is None:
        lines.append(f"memory, time: not estimated: the shape of {hp.task.policy.initial_model} is known only once it "
                     "is downloaded")
    else:
        lines += [f"memory:      {line}" for line in _memory(mode, hp, shape, count, dtype, device)]
        lines.append(f"time:        {_time(mode, hp, shape, count, dtype, device)}")
    if hp.run.save_dir:
        lines.append(f"save folder: {_save_folder(mode, hp, count)}")
    lines.append(f"checks:      passed on {count} rank{'s' if count > 1 else ''} (valid rank counts: "
                 f"{', '.join(map(str, valid))})")
    return lines
