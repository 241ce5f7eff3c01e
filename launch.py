#!/usr/bin/env python3
"""Train a reward model or a policy: ./launch.py {train_reward,train_policy} EXPERIMENT NAME [--flags]."""

import sys

from lm_human_preferences.cli.main import launch_entry

if __name__ == "__main__":
    sys.exit(launch_entry())
