"""`launch.py` with a fault injected at a chosen step (test_faults.py runs it in a subprocess).

    FAULT=kill:3:policy python tests/fault_run.py launch.py-args...

FAULT is `<kind>:<step>:<phase>`: kind `kill` (SIGKILL), `term` (SIGTERM) or `stop` (SIGSTOP);
phase `reward` (reward-model batches), `policy` (PPO updates) or `dpo` (DPO batches); step counts from 0. The fault
hits rank 0 (`stop`: the last rank) as that step starts. The patch is applied at import, so
ranks spawned by --mpi (which import this file again) carry it too.
"""

import os
import signal
import sys

from lm_human_preferences.cli import main as cli
from lm_human_preferences.training import train_dpo, train_policy, train_reward
from lm_human_preferences.utils import distributed

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}
PATCHES = {"reward": (train_reward.RewardModelTrainer, "accumulate_gradients", lambda t: t.step),
           "policy": (train_policy.PPOTrainer, "step", lambda t: t.update),
           "dpo": (train_dpo.DPOTrainer, "accumulate_gradients", lambda t: t.step)}


def inject(kind: str, step: int, phase: str) -> None:
    cls, method, counter = PATCHES[phase]
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        target = distributed.world_size() - 1 if kind == "stop" else 0
        if counter(self) == step and distributed.rank() == target and not getattr(self, "_faulted", False):
            self._faulted = True
            os.kill(os.getpid(), SIGNALS[kind])
        return original(self, *args, **kwargs)

    setattr(cls, method, wrapped)


if os.environ.get("FAULT"):
    kind, step, phase = os.environ["FAULT"].split(":")
    inject(kind, int(step), phase)

if __name__ == "__main__":
    sys.exit(cli.main("launch", sys.argv[1:]))
