"""`launch.py train_reward|train_policy|train_dpo EXPERIMENT NAME [--flags]`: the original's launcher."""

import os
import shlex
import sys
import time
from pathlib import Path

from lm_human_preferences import experiments
from lm_human_preferences.cli import dry_run as dry_run_plan, fetch, options, ranks
from lm_human_preferences.training import runs, train_policy
from lm_human_preferences.utils import distributed, save_folders
from lm_human_preferences.utils.errors import UserError

LAUNCH_HELP = """\
usage: launch.py {train_reward,train_policy,train_dpo} EXPERIMENT {NAME | --resume latest} [--mpi N] [--save_dir D]
                 [--dry_run] [--<dotted.hparam> VALUE ...]
       launch.py fetch EXPERIMENT|MODEL|URL ... [--from DIR] [--dry_run]   (launch.py fetch --help)

Train a reward model from human labels (train_reward), fine-tune a policy with PPO
against one (train_policy), or fine-tune it on the labels directly by DPO (train_dpo),
with the hyper-parameters of a named experiment.

experiments:  train_reward: %(reward)s
              train_policy: %(policy)s
              train_dpo:    %(dpo)s

options:
  --mpi N               data-parallel ranks on this machine; N must split the hparams' batches (the
                        error names the counts that do). Default: one per visible GPU (else 1), or
                        the largest count below that fits, with a note; under torchrun, mpirun or
                        Slurm the ranks come from the environment
  --save_dir D          root folder for outputs; they go to D/NAME
                        (default /tmp/save/MODE, e.g. /tmp/save/train_policy)
  --resume latest       instead of NAME: continue the newest unfinished run of this experiment under
                        the save root that these flags would resume (its ranks too, unless --mpi)
  --dry_run             print the resolved hyper-parameters, then the ranks and their devices, each
                        rank's batches, the precision, estimated memory and time, what happens to the
                        save folder; run every check the run makes before it starts, and exit
  --KEY VALUE, --KEY=VALUE
                        override a hyper-parameter by its dotted key, e.g. --ppo.lr 1e-5;
                        values are parsed by the field's type (on/off/true/false, none, 1e6);
                        an optional group is switched with on/off: --rewards.adaptive_kl on.
                        For train_policy, --task.* also applies to rewards.train_new_model.task.
"""


USAGE = "usage: launch.py {train_reward,train_policy,train_dpo} EXPERIMENT {NAME | --resume latest} [--flags] (see --help)"


def check_run_name(name: str) -> None:
    """A run name is one folder under the save root: `../x` or `a/b` would write elsewhere."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"run name {name!r} must be a plain folder name (no '/', not '.' or '..'); "
                        "choose where runs go with --save_dir")


def default_save_root(mode: str) -> str:
    return f"/tmp/save/{mode}"


def resolve(mode: str, experiment: str, name: str, flags: dict[str, str], ranks: int = 1):
    """The experiment's hparams with overrides applied and run.save_dir set, validated for a run
    on `ranks` ranks (or as many as torchrun, mpirun or Slurm started)."""
    hp = overridden(mode, experiment, name, flags)
    with distributed.validation_world(ranks):
        hp.validate()
    return hp


def overridden(mode: str, experiment: str, name: str, flags: dict[str, str]):
    """The experiment's hparams with overrides applied and run.save_dir set, not validated yet."""
    hp = experiments.get(mode, experiment)
    check_run_name(name)
    save_root = flags.pop("save_dir", None) or default_save_root(mode)
    hp.override_from_flags(flags)
    if isinstance(hp, train_policy.HParams) and hp.rewards.train_new_model is not None:
        for key, value in flags.items():  # the reward model is trained on the policy's task
            if key.startswith("task."):
                hp.rewards.train_new_model.override_from_str(key, value)
    hp.run.save_dir = os.path.join(save_root, name)
    if isinstance(hp, train_policy.HParams) and hp.rewards.train_new_model is not None:
        hp.rewards.train_new_model.run.save_dir = hp.run.save_dir  # it trains into the same folder
    return hp


def resume_command(mode: str, experiment: str, name: str, args: list[str], ranks: int) -> str:
    """The command that resumes this run: the same arguments, with its name and rank count spelled out."""
    program = Path(sys.argv[0]).name if Path(sys.argv[0]).name == "lmhp-launch" else "./launch.py"
    rest, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--mpi", "--resume"):
            skip = True
        elif not arg.startswith(("--mpi=", "--resume=")) and arg != "--dry_run":
            rest.append(arg)
    launched = distributed.external_launcher()
    command = shlex.join([program, mode, experiment, name, *rest, *([] if launched else ["--mpi", str(ranks)])])
    return command + (f" (under {launched[0]}, on every node)" if launched else "")


def resume_latest(mode: str, experiment: str, value: str, flags: dict[str, str]) -> tuple[str, int | None]:
    """`--resume latest`: the name of the run to continue (runs.newest_unfinished) and the ranks that saved it."""
    if value != "latest":
        raise UserError(f"--resume takes 'latest', got {value!r}; to resume a run by name, rerun its "
                        "command (launch.py MODE EXPERIMENT NAME ...)")
    save_root = Path(flags.get("save_dir") or default_save_root(mode))
    found = runs.newest_unfinished(save_root, mode, experiment, resolve(mode, experiment, "latest", dict(flags)))
    print(f"--resume latest: {found.folder} ({found.progress()}; last written "
          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(found.written))})")
    return found.folder.name, found.world


def launch(args: list[str]) -> None:
    if args and args[0] == "fetch":
        return fetch.fetch_command(args[1:])
    if not args or "--help" in args or "-h" in args:
        print(LAUNCH_HELP % dict(reward=", ".join(experiments.TRAIN_REWARD), policy=", ".join(experiments.TRAIN_POLICY),
                                 dpo=", ".join(experiments.TRAIN_DPO)))
        if not args:
            raise UserError("give a mode, an experiment and a run name")
        return
    named = len(args) >= 3 and not args[2].startswith("--")
    if len(args) < 2 or any(a.startswith("--") for a in args[:2]):
        raise UserError(USAGE)
    mode, experiment = args[:2]
    options_given = args[3:] if named else args[2:]
    flags = options.parse(options_given, booleans={"dry_run"})
    asked = options.pop_int(flags, "mpi", None, minimum=1, meaning=" (the number of ranks)")
    dry_run = options.pop_bool(flags, "dry_run")
    resume_from = flags.pop("resume", None)
    saved_world = None
    if resume_from is not None:
        if named:
            raise UserError(f"give a run name ({args[2]}) or --resume latest, not both")
        name, saved_world = resume_latest(mode, experiment, resume_from, flags)
    elif named:
        name = args[2]
    else:
        raise UserError(USAGE)
    hp = overridden(mode, experiment, name, flags)
    chosen = ranks.choose(hp, asked, saved_world)
    logs = Path(hp.run.save_dir) / save_folders.TENSORBOARD
    command = resume_command(mode, experiment, name, options_given, chosen.count)
    print(f"{mode} {experiment} → {hp.run.save_dir} · resume: {command} · logs: tensorboard --logdir {logs}")
    if chosen.note:
        print(chosen.note)
    print(hp.to_json())
    if dry_run:
        print("\n".join(dry_run_plan.plan(mode, hp, chosen.count, ranks.valid_counts(hp))))
        return
    distributed.run(experiments.train_function(mode), (hp,), chosen.count)
