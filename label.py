#!/usr/bin/env python3
"""Write a label file judged by a mock labeler: ./label.py EXPERIMENT --out FILE [--flags]."""

import sys

from lm_human_preferences.cli.main import label_entry

if __name__ == "__main__":
    sys.exit(label_entry())
