"""bench/gpu_check.py on the CPU with the tiny model: the checks that apply here pass, the GPU-only
ones say why they were skipped, and a broken path is reported as a failure without hiding the rest."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
SMALL = ["--model", "test", "--batch_size", "16", "--updates", "2", "--chunk_size", "8"]


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))


def test_gpu_check_passes_on_cpu():
    done = _gpu_check(*SMALL)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for check in ("bf16", "mask_free", "kv_cache", "gloo", "ppo"):
        assert f"[pass] {check} (" in out, out
    assert "[skipped] nccl" in out and "no CUDA" in out
    assert "episodes/s per rank" in out and "sampling" in out and "MFU: no peak known for a CPU" in out
    assert out.strip().splitlines()[-1].startswith("gpu_check: pass (")


def test_a_failing_check_does_not_hide_the_others(tmp_path):
    """A mask-free path that drops causality (attends to later tokens) must fail its check alone."""
    broken = tmp_path / "broken.py"
    broken.write_text(f"""
import runpy, sys
import torch.nn.functional as F
real = F.scaled_dot_product_attention
def acausal(q, k, v, attn_mask=None, is_causal=False, **kw):
    return real(q, k, v, attn_mask=attn_mask, **kw)  # is_causal ignored
F.scaled_dot_product_attention = acausal
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
sys.path.insert(0, {str(SCRIPT.parent)!r})
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
""")
    done = subprocess.run([sys.executable, str(broken), *SMALL, "--skip", "gloo", "ppo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "[FAIL] mask_free (" in out and "[pass] kv_cache (" in out and "[pass] bf16 (" in out, out
    assert "gpu_check: FAIL (2 passed, 1 failed: mask_free, 3 skipped: nccl, gloo, ppo)" in out


def test_skip_names_are_checked():
    done = _gpu_check("--model", "test", "--skip", "nccll")
    assert done.returncode == 2 and "invalid choice: 'nccll'" in done.stderr
