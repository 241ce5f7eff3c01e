"""Every command of the README is valid: the Quick start is what CI runs; each `./launch.py` line
passes `--dry_run`; `label.py export`/`import` run on a label file in the README's shape;
`label.py serve`, `sample.py` and `torchrun` lines are parsed by their own command lines up to
where they would sample or download; the TRL snippet splits a real export by prompt. The module
map names every module, and every relative link of the README and docs/ leads somewhere."""

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.run

from lm_human_preferences.cli import main, sample, serve
from lm_human_preferences.language import encodings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PROGRAMS = ("./launch.py", "./sample.py", "./label.py", "torchrun", "tensorboard")


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"```(\w*)\n(.*?)\n```", text, re.S)


def quick_start_commands() -> list[str]:
    return [body for _, body in blocks(section("Quick start"))]


def install_line() -> str:
    main_job, _ = quick_start_commands()
    return main_job[:main_job.index(" && ./launch.py")]


def shell_blocks() -> list[str]:
    """The README's command blocks other than the Quick start's, the install lines and the map."""
    found = []
    for language, body in blocks(README):
        if language or body in quick_start_commands() or "pip install" in body \
                or body.startswith(("lm_human_preferences/", "@article")):
            continue
        found.append(body)
    return found


def argv_of(block: str) -> list[list[str]]:
    """Each command line of a shell block as the shell would pass it (variables, quotes and
    `$(date ...)` expanded by bash); assignments run, and any other line is an error."""
    script = ["record() { for a in \"$@\"; do printf '%s\\0' \"$a\"; done; printf '\\n\\0'; }"]
    for line in block.splitlines():
        first = line.split()[0]
        if first == "#":
            continue
        if first in PROGRAMS:
            script.append("record " + line)
        elif not re.fullmatch(r"[a-z_]+=(\S+|\S*\$\(date [^)]*\))", line):
            raise AssertionError(f"a README command line that no test checks: {line}")
        else:
            script.append(line)
    out = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, check=True).stdout
    commands, current = [], []
    for item in out.split("\0")[:-1]:
        if item == "\n":
            commands.append(current)
            current = []
        else:
            current.append(item)
    return commands


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    main_job, tests = quick_start_commands()
    assert main_job.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert "./launch.py train_policy" in main_job
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests + " || exit $?" in ci


def test_the_gpu_install_is_the_quick_start_s_and_its_check_runs():
    block = next(body for language, body in blocks(section("Reproducing the paper on GPUs"))
                 if "pip install" in body)
    install, check = block.splitlines()
    assert install == install_line()
    assert check.startswith('python -c "') and check.endswith('"')
    done = subprocess.run([sys.executable, "-c", check[len('python -c "'):-1]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    version, available, count = done.stdout.split()
    assert version.startswith("2.") and available in ("True", "False") and int(count) >= 0


def write_labels(path: Path, n: int) -> None:
    """A best-of-4 label file in the books experiments' shape (64 + 24 GPT-2 tokens), as
    `label.py serve descriptiveness` writes one."""
    encoding = encodings.get("main")

    def padded(text: str, length: int) -> list[int]:
        tokens = encoding.encode(text)[:length]
        return tokens + [encoding.padding_token] * (length - len(tokens))

    words = "the old house stood by a quiet river where tall green trees leaned over dark water".split()
    records = []
    for i in range(n):
        query = " ".join(words[(i + j) % len(words)] for j in range(12)) + f" ({i})"
        record = {"query": padded(query, 64), "best": i % 4}
        for k in range(4):
            record[f"sample{k}"] = padded(f" and {words[(i + 3 * k) % len(words)]} {words[k]} {i}.", 24)
        records.append(record)
    path.write_text(json.dumps(records))


def run_command(argv: list[str], cwd: Path, capsys, seen: dict) -> None:
    """One README command, as far as it can go without training, sampling or the network."""
    program, args = argv[0], argv[1:]
    if program == "./launch.py" and args[0] == "fetch":
        assert "--dry_run" in args, "a README fetch command in the tests must be a dry run (it would download)"
        assert main.main("launch", args) == 0, capsys.readouterr().err
    elif program == "./launch.py":
        dry = args if "--dry_run" in args else [*args, "--dry_run"]
        assert main.main("launch", dry) == 0, capsys.readouterr().err
        seen["save_dir"] = re.search(r"→ (\S+)", capsys.readouterr().out).group(1)
    elif program == "torchrun":
        parsed = torch.distributed.run.get_args_parser().parse_args(args)
        assert parsed.training_script == "launch.py" and int(parsed.nproc_per_node) >= 1
        assert main.main("launch", [*parsed.training_script_args, "--dry_run"]) == 0, capsys.readouterr().err
    elif program == "tensorboard":
        assert args == ["--logdir", seen["save_dir"] + "/tb"]
    elif program == "./sample.py":
        calls = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sample.distributed, "run", lambda fn, fn_args, ranks: calls.append((fn_args, ranks)))
            assert main.main("sample", args) == 0, capsys.readouterr().err
        [(fn_args, ranks)] = calls
        assert fn_args[:2] == (args[args.index("--save_dir") + 1], "policy") and ranks == 1
    elif program == "./label.py" and args[0] == "serve":
        calls = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(serve, "_serve", lambda queue, hp, fill, page, bind, stop: calls.append((queue, fill)))
            assert main.main("label", args) == 0, capsys.readouterr().err
        [(queue, fill)] = calls
        queue.close()
        n = int(args[args.index("--n") + 1])
        assert fill == (None, None, n, 0)
        write_labels(cwd / args[args.index("--out") + 1], n)  # the answers a person would give
    elif program == "./label.py" and args[0] in ("export", "import"):
        source = cwd / args[1]
        if not source.exists() and args[0] == "import":  # pairs from elsewhere: the export's own
            shutil.copyfile(cwd / "mine.jsonl", source)
        assert main.main("label", args) == 0, capsys.readouterr().err
        assert (cwd / args[args.index("--out") + 1]).stat().st_size > 0
    else:
        raise AssertionError(f"no check for {argv}")


def test_every_readme_command_is_valid(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen: dict = {}
    checked = []
    for block in shell_blocks():
        for argv in argv_of(block):
            run_command(argv, tmp_path, capsys, seen)
            checked.append(argv[0] if argv[0] != "./label.py" else f"label.py {argv[1]}")
    assert {"./launch.py", "./sample.py", "torchrun", "tensorboard", "label.py serve", "label.py export",
            "label.py import"} <= set(checked)
    assert checked.count("./launch.py") >= 7  # the seed README's, the long run's, your labels', TRL's
    prose = re.findall(r"`(\./launch\.py [^`]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
    for command in prose:  # commands quoted in the text
        run_command(shlex.split(command), tmp_path, capsys, seen)
    assert prose


def test_the_dpo_snippet_splits_a_real_export_by_prompt(tmp_path, monkeypatch):
    [snippet] = [body for language, body in blocks(README) if language == "python"]
    ast.parse(snippet)
    monkeypatch.chdir(tmp_path)
    write_labels(tmp_path / "mine.json", 300)
    assert main.main("label", ["export", "mine.json", "--experiment", "descriptiveness", "--out", "mine.jsonl"]) == 0
    split = snippet[:snippet.index("from datasets import")]  # the rest needs TRL and GPT-2
    scope: dict = {}
    exec(compile(split, "README.md", "exec"), scope)
    rows, train, test = scope["rows"], scope["train"], scope["test"]
    assert len(rows) == 900 and len(train) + len(test) == len(rows) and 0 < len(test) < len(train)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    by_prompt: dict[str, set[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], set()).add(r["chosen"])
    assert all(len(chosen) == 1 for chosen in by_prompt.values())  # why the split is by prompt


def map_sections() -> dict[str, str]:
    """The module map's text per folder of the package ("" for its top level)."""
    block = next(body for _, body in blocks(README) if body.startswith("lm_human_preferences/"))
    sections: dict[str, str] = {}
    parents: dict[int, str] = {0: ""}
    current = None
    for line in block.splitlines()[1:]:
        match = re.match(r"^( +)(\S+)\s*(.*)$", line)
        if match is None:
            current = None
            continue
        indent, name, rest = len(match.group(1)), match.group(2), match.group(3)
        if indent in (2, 4) and (name.endswith("/") or name.endswith(".py")):
            parent = parents.get(indent - 2, "")
            current = parent + name if name.endswith("/") else parent
            if name.endswith("/"):
                parents[indent] = current
            sections[current] = sections.get(current, "") + " " + (name if name.endswith(".py") else "") + " " + rest
        elif current is not None and indent > 4:
            sections[current] += " " + line
    return sections


def test_the_module_map_names_every_module():
    sections = map_sections()
    package = ROOT / "lm_human_preferences"
    missing = []
    for path in sorted(package.rglob("*.py")):
        folder = path.parent.relative_to(package).as_posix() + "/"
        folder = "" if folder == "./" else folder
        home = max((s for s in sections if folder.startswith(s)), key=len)
        word = path.name if home == "" else path.stem
        if path.stem != "__init__" and not re.search(rf"(?<![\w.]){re.escape(word)}(?!\w)", sections[home]):
            missing.append(f"{path.relative_to(ROOT)} (under {home or 'lm_human_preferences/'})")
    assert not missing, f"the README's Layout does not name: {missing}"
    for folder in sections:
        assert (package / folder).is_dir(), f"the README's Layout names {folder}, which does not exist"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", ["README.md", *sorted(p.relative_to(ROOT).as_posix()
                                                            for p in (ROOT / "docs").glob("*.md")), "CHANGELOG.md"])
def test_relative_links_lead_somewhere(document):
    path = ROOT / document
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{document}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{document}: link to {target}: no such heading"
