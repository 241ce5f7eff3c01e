"""A full disk under TensorBoard's event writer: one error line, not the writer thread's traceback first."""

import subprocess
import sys

# in a process of its own: pytest would catch the thread's report itself
SCRIPT = """
import errno, os, sys
from tensorboard.summary.writer import record_writer
from lm_human_preferences.cli import main as cli
from lm_human_preferences.utils import distributed

def no_space(self, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(sys.argv[1], "x", "events"))

record_writer.RecordWriter.write = no_space  # what TensorBoard's writer thread writes with
distributed.default_ranks = lambda: 1
sys.exit(cli.main("launch", ["train_reward", "test", "x", "--save_dir", sys.argv[1]]))
"""


def test_full_disk_in_the_event_writer_thread_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "save")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: disk full while writing") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
