"""`launch.py train_reward|train_policy|train_dpo EXPERIMENT NAME [--flags]`: the original's launcher."""

import os

from lm_human_preferences import experiments
from lm_human_preferences.cli import options
from lm_human_preferences.training import train_policy
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import UserError

LAUNCH_HELP = """\
usage: launch.py {train_reward,train_policy,train_dpo} EXPERIMENT NAME [--mpi N] [--save_dir D] [--dry_run]
                 [--<dotted.hparam> VALUE ...]

Train a reward model from human labels (train_reward), fine-tune a policy with PPO
against one (train_policy), or fine-tune it on the labels directly by DPO (train_dpo),
with the hyper-parameters of a named experiment.

experiments:  train_reward: %(reward)s
              train_policy: %(policy)s
              train_dpo:    %(dpo)s

options:
  --mpi N               data-parallel ranks on this machine (default: one per visible GPU, else 1);
                        under torchrun, mpirun or Slurm the ranks come from the environment
  --save_dir D          root folder for outputs; they go to D/NAME
                        (default /tmp/save/MODE, e.g. /tmp/save/train_policy)
  --dry_run             print the resolved hyper-parameters and exit
  --KEY VALUE, --KEY=VALUE
                        override a hyper-parameter by its dotted key, e.g. --ppo.lr 1e-5;
                        values are parsed by the field's type (on/off/true/false, none, 1e6);
                        an optional group is switched with on/off: --rewards.adaptive_kl on.
                        For train_policy, --task.* also applies to rewards.train_new_model.task.
"""


def check_run_name(name: str) -> None:
    """A run name is one folder under the save root: `../x` or `a/b` would write elsewhere."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"run name {name!r} must be a plain folder name (no '/', not '.' or '..'); "
                        "choose where runs go with --save_dir")


def resolve(mode: str, experiment: str, name: str, flags: dict[str, str], ranks: int = 1):
    """The experiment's hparams with overrides applied and run.save_dir set, validated for a run
    on `ranks` ranks (or as many as torchrun, mpirun or Slurm started)."""
    hp = experiments.get(mode, experiment)
    check_run_name(name)
    save_root = flags.pop("save_dir", None) or f"/tmp/save/{mode}"
    for key, value in flags.items():
        hp.override_from_str(key, value)
    if isinstance(hp, train_policy.HParams) and hp.rewards.train_new_model is not None:
        for key, value in flags.items():  # the reward model is trained on the policy's task
            if key.startswith("task."):
                hp.rewards.train_new_model.override_from_str(key, value)
    hp.run.save_dir = os.path.join(save_root, name)
    if isinstance(hp, train_policy.HParams) and hp.rewards.train_new_model is not None:
        hp.rewards.train_new_model.run.save_dir = hp.run.save_dir  # it trains into the same folder
    with distributed.validation_world(ranks):
        hp.validate()
    return hp


def launch(args: list[str]) -> None:
    if not args or "--help" in args or "-h" in args:
        print(LAUNCH_HELP % dict(reward=", ".join(experiments.TRAIN_REWARD), policy=", ".join(experiments.TRAIN_POLICY),
                                 dpo=", ".join(experiments.TRAIN_DPO)))
        if not args:
            raise UserError("give a mode, an experiment and a run name")
        return
    if len(args) < 3 or any(a.startswith("--") for a in args[:3]):
        raise UserError("usage: launch.py {train_reward,train_policy,train_dpo} EXPERIMENT NAME [--flags] (see --help)")
    mode, experiment, name = args[:3]
    flags = options.parse(args[3:], booleans={"dry_run"})
    ranks = options.pop_int(flags, "mpi", distributed.default_ranks(), minimum=1, meaning=" (the number of ranks)")
    dry_run = options.pop_bool(flags, "dry_run")
    hp = resolve(mode, experiment, name, flags, ranks)
    print(f"{mode} {experiment} → {hp.run.save_dir}")
    print(hp.to_json())
    if dry_run:
        return
    distributed.run(experiments.train_function(mode, hp), (hp,), ranks)
