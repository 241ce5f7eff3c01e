#!/usr/bin/env python3
"""Sample from a trained policy: ./sample.py sample --save_dir D --savescope policy [--flags]."""

import sys

from lm_human_preferences.cli.main import sample_entry

if __name__ == "__main__":
    sys.exit(sample_entry())
