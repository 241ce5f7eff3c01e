"""Every command line's entry point: a UserError becomes one line on stderr and exit status 1."""

import errno
import os
import sys

from lm_human_preferences.cli import export, fetch, label, launch, sample
from lm_human_preferences.utils.errors import Stopped, UserError
from lm_human_preferences.utils.storage import Offline

COMMANDS = {"launch": launch.launch, "sample": sample.sample, "export_hf": export.export_hf,
            "label": label.label_command, "fetch": fetch.fetch_command}


def main(command: str, args: list[str] | None = None) -> int:
    """Run a command line; a UserError becomes one line on stderr and exit status 1."""
    args = sys.argv[1:] if args is None else args
    try:
        COMMANDS[command](args)
    except Offline as e:
        e.fetch_target = _experiment(command, args) or e.fetch_target
        print(f"error: {e}", file=sys.stderr)
        return 1
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


def _experiment(command: str, args: list[str]) -> str | None:
    """The experiment a command line names (what `fetch` should get for it), if it names one."""
    if command == "launch" and len(args) > 1 and args[0] in ("train_reward", "train_policy"):
        return args[1]
    if command == "label" and args and not args[0].startswith("-"):
        if args[0] in ("export", "import"):
            return next((value for flag, value in zip(args, args[1:]) if flag == "--experiment"), None)
        return args[1] if args[0] == "serve" and len(args) > 1 else args[0]
    return None


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


def fetch_entry() -> int:
    return main("fetch")
