"""The README's Quick start and .ci/run must agree: CI installs and tests exactly as documented."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    section = readme[start:readme.index("\n## ", start + 1)]
    return re.findall(r"```\n(.+?)\n```", section)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    main_job, tests = quick_start_commands()
    assert main_job.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert "./launch.py train_policy" in main_job
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests + " || exit $?" in ci
