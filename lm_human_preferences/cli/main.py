"""The original's command lines: `launch.py train_reward|train_policy ...` and `sample.py sample ...`."""

import errno
import os
import sys
from pathlib import Path

import torch

from lm_human_preferences import experiments
from lm_human_preferences.cli import options, serve
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.training import run, train_policy
from lm_human_preferences.labeling import collect, label_files, mock_labelers
from lm_human_preferences.language import encodings, hf, trained_models
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils import distributed, storage
from lm_human_preferences.utils.errors import Stopped, UserError

LAUNCH_HELP = """\
usage: launch.py {train_reward,train_policy} EXPERIMENT NAME [--mpi N] [--save_dir D] [--dry_run]
                 [--<dotted.hparam> VALUE ...]

Train a reward model from human labels (train_reward) or fine-tune a policy with PPO
against one (train_policy), with the hyper-parameters of a named experiment.

experiments:  train_reward: %(reward)s
              train_policy: %(policy)s

options:
  --mpi N               data-parallel ranks on this machine (default: one per visible GPU, else 1);
                        under torchrun, mpirun or Slurm the ranks come from the environment
  --save_dir D          root folder for outputs; they go to D/NAME
                        (default /tmp/save/train_reward or /tmp/save/train_policy)
  --dry_run             print the resolved hyper-parameters and exit
  --KEY VALUE, --KEY=VALUE
                        override a hyper-parameter by its dotted key, e.g. --ppo.lr 1e-5;
                        values are parsed by the field's type (on/off/true/false, none, 1e6);
                        an optional group is switched with on/off: --rewards.adaptive_kl on.
                        For train_policy, --task.* also applies to rewards.train_new_model.task.
"""

SAMPLE_HELP = """\
usage: sample.py sample --save_dir D [--savescope policy] [--mpi N] [--temperature T] [--seed S]
                        [--batch_size B] [--nsamples N]

Sample from a policy trained by train_policy. D is its save folder (a path, https:// or
gs:// URL) holding train_policy_hparams.json and SAVESCOPE/. Queries come from the task's
test split. Each sample prints a line of 80 '=', the query, then the untruncated response
(newlines as ⏎), as the original did.

options:
  --savescope S    subfolder (and checkpoint scope) of the policy (default: policy)
  --mpi N          data-parallel ranks (default: one per visible GPU, else 1)
  --temperature T  sampling temperature (default: 1.0, as the original)
  --seed S         random seed (default: random)
  --batch_size B   queries per batch on each rank (default: 4)
  --nsamples N     samples to print in all; 0 samples forever (default: 0)
"""


def resolve(mode: str, experiment: str, name: str, flags: dict[str, str], ranks: int = 1):
    """The experiment's hparams with overrides applied and run.save_dir set, validated for a run
    on `ranks` ranks (or as many as torchrun, mpirun or Slurm started)."""
    hp = experiments.get(mode, experiment)
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
        print(LAUNCH_HELP % dict(reward=", ".join(experiments.TRAIN_REWARD), policy=", ".join(experiments.TRAIN_POLICY)))
        if not args:
            raise UserError("give a mode, an experiment and a run name")
        return
    if len(args) < 3 or any(a.startswith("--") for a in args[:3]):
        raise UserError("usage: launch.py {train_reward,train_policy} EXPERIMENT NAME [--flags] (see --help)")
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


def _sample_rank(save_dir: str, savescope: str, temperature: float, seed: int | None, batch_size: int,
                 nsamples: int) -> None:
    hp_path = storage.join(save_dir, "train_policy_hparams.json")
    hp = train_policy.HParams.from_json(storage.fetch(hp_path).read_text())
    hp.task.policy.temperature = temperature
    device = distributed.device()
    model, encoding_name = trained_models.load_initial(storage.join(save_dir, savescope), device=device)
    encoding = encodings.get(encoding_name)
    policy = Policy(model.eval(), encoding, hp.task)
    seed = distributed.broadcast_object(seed if seed is not None else int(torch.randint(2 ** 31, ()).item()))
    rank, world = distributed.rank(), distributed.world_size()
    generator = run.rank_generator(seed, device)
    queries = lm_tasks.query_batches(hp.task, encoding, batch_size, mode="test", rank=rank, world=world,
                                     device=device)
    printed = 0
    while True:
        batch = next(queries)
        responses = policy.respond(batch, hp.task.response_length, generator, hp.run.chunk_size)["responses"]
        batch, responses = distributed.all_gather_cat(batch), distributed.all_gather_cat(responses)
        for query, response in zip(batch.tolist(), responses.tolist()):
            if nsamples and printed >= nsamples:
                return
            if distributed.is_main():
                print("=" * 80)
                print(encoding.decode(query).replace("\n", "⏎"))
                print(encoding.decode(response).replace("\n", "⏎"), flush=True)
            printed += 1


def sample(args: list[str]) -> None:
    if not args or "--help" in args or "-h" in args:
        print(SAMPLE_HELP)
        return
    if args[0] != "sample":
        raise UserError(f"unknown command {args[0]!r}; usage: sample.py sample --save_dir D (see --help)")
    flags = options.parse(args[1:], booleans=set())
    if "save_dir" not in flags:
        raise UserError("sample needs --save_dir (a train_policy save folder or URL)")
    save_dir = flags.pop("save_dir")
    savescope = flags.pop("savescope", "policy")
    ranks = options.pop_int(flags, "mpi", distributed.default_ranks(), minimum=1, meaning=" (the number of ranks)")
    seed = options.pop_int(flags, "seed", None)
    batch_size = options.pop_int(flags, "batch_size", 4, minimum=1)
    nsamples = options.pop_int(flags, "nsamples", 0, minimum=0, meaning=" (0 samples forever)")
    temperature = options.pop_float(flags, "temperature", 1.0, positive=True)
    if flags:
        raise UserError(f"unknown option --{next(iter(flags))} (see --help)")
    distributed.run(_sample_rank, (save_dir, savescope, temperature, seed, batch_size, nsamples), ranks)


LABEL_HELP = """\
usage: label.py EXPERIMENT --out FILE [--n N] [--labeler NAME] [--noise X] [--policy MODEL] [--seed S]
                [--<task.hparam> VALUE ...]

Sample N queries × 4 responses from a policy and write a label file in the released schema
(a JSON list of {"query", "sample0".."sample3", "best"}), judged by a mock labeler. The
train_reward EXPERIMENT gives the task (dataset, lengths, truncation, initial model) and,
for the mock experiments, the labeler.

options:
  --out FILE       where to write the labels
  --n N            number of labelled queries (default 1000)
  --labeler NAME   sentiment or descriptiveness (default: the experiment's mock labeler)
  --noise X        Boltzmann noise of the labeler's choice; 0 always picks the best (default 0)
  --policy MODEL   the policy that answers: a model name or save folder (default: task.policy.initial_model)
  --seed S         random seed (default 0)

usage: label.py serve EXPERIMENT --out FILE [--flags]
People label instead, on a local web page (label.py serve --help).
"""

EXPORT_HELP = """\
usage: lmhp-export-hf MODEL OUT

Write the GPT-2 trunk of MODEL (a save folder such as <save_dir>/policy or <save_dir>/reward_model,
in our layout or the original's, a path or URL, or a model name) to the folder OUT, which
transformers' GPT2LMHeadModel.from_pretrained(OUT) loads. Scalar heads are not exported.
"""


def export_hf(args: list[str]) -> None:
    if not args or "--help" in args or "-h" in args:
        print(EXPORT_HELP)
        return
    if len(args) != 2:
        raise UserError("usage: lmhp-export-hf MODEL OUT (see --help)")
    model, encoding = trained_models.load_initial(args[0])
    hf.export_folder(model, Path(args[1]), encoding)
    print(f"wrote {args[1]}/config.json and model.safetensors")


def label_command(args: list[str]) -> None:
    if args and args[0] == "serve":
        return serve.serve_command(args[1:])
    if not args or "--help" in args or "-h" in args:
        print(LABEL_HELP)
        return
    if args[0].startswith("--"):
        raise UserError("usage: label.py EXPERIMENT --out FILE [--flags] (see --help)")
    hp = experiments.get("train_reward", args[0])
    flags = options.parse(args[1:], booleans=set())
    if "out" not in flags:
        raise UserError("label needs --out FILE")
    out = Path(flags.pop("out"))
    n = options.pop_int(flags, "n", 1000, minimum=1)
    seed = options.pop_int(flags, "seed", 0)
    source = hp.labels.source if hp.labels.source.startswith(mock_labelers.MOCK_PREFIX) else None
    labeler = flags.pop("labeler", None) or (mock_labelers.parse_source(source)[0] if source else None)
    if labeler is None:
        raise UserError(f"experiment {args[0]!r} has no mock labeler; choose one with --labeler")
    noise = options.pop_float(flags, "noise", 0.0, positive=False)
    policy_name = flags.pop("policy", None) or hp.task.policy.initial_model
    for key, value in flags.items():
        if not key.startswith("task."):
            raise UserError(f"unknown option --{key} (see --help)")
        hp.override_from_str(key, value)
    hp.task.validate("task.")
    if policy_name != hp.task.policy.initial_model:  # the answering policy's context must fit the task too
        hp.task.policy.initial_model = policy_name
        hp.task.validate("task.")
    device = distributed.device()
    model, encoding_name = trained_models.load_initial(policy_name, device=device)
    policy = Policy(model.eval(), encodings.get(encoding_name), hp.task)
    records = collect.collect(policy, hp.task, collect.MockLabeler(labeler, noise, seed), n, seed=seed,
                              chunk_size=hp.run.chunk_size)
    label_files.write(records, out)
    print(f"wrote {len(records)} {labeler} labels to {out}")


def main(command: str, args: list[str] | None = None) -> int:
    """Run a command line; a UserError becomes one line on stderr and exit status 1."""
    args = sys.argv[1:] if args is None else args
    try:
        {"launch": launch, "sample": sample, "export_hf": export_hf, "label": label_command}[command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {_disk_full_message(e)}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _disk_full_message(e: OSError) -> str:
    """One line for a full disk (or quota): the clear message of the UserError this error
    interrupted when there is one (e.g. storage's "disk full while writing X"), else what is full."""
    context = e.__context__
    while context is not None:
        if isinstance(context, UserError) and isinstance(context.__context__, OSError) \
                and context.__context__.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(context)
        context = context.__context__
    what = "disk full" if e.errno == errno.ENOSPC else "disk quota exceeded"
    where = f" while writing {e.filename}" if e.filename else ""
    return (f"{what}{where} ({e.strerror or os.strerror(e.errno)}); free space (or raise the quota) there, "
            "or write elsewhere with --save_dir or LMHP_CACHE_DIR, and run again")


def launch_entry() -> int:
    return main("launch")


def sample_entry() -> int:
    return main("sample")


def export_hf_entry() -> int:
    return main("export_hf")


def label_entry() -> int:
    return main("label")
