"""benchmarks/gpu.sh at toy sizes on the CPU: it runs and writes its table."""

import subprocess
import sys

import jax
from helpers import REPO, subprocess_env


def test_gpu_script_writes_a_table_naming_the_device(tmp_path):
    out = tmp_path / "gpu.md"
    env = subprocess_env(PYTHON=sys.executable)
    # The MLP section in both dtypes: the whole script (row building, timing, the
    # dtype loop, the table, the device name) at a fraction of the full run's compiles.
    cmd = [
        "bash",
        str(REPO / "benchmarks" / "gpu.sh"),
        "--tiny",
        "--only",
        "mlp",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text.startswith(f"# Benchmarks on {jax.devices('cpu')[0].device_kind} (cpu)")
    rows = [line for line in text.splitlines() if line.startswith("| mlp |")]
    assert len(rows) == 6  # three networks x (float32, bfloat16)
    for dtype in ("float32", "bfloat16"):
        mine = [r for r in rows if f"| {dtype} |" in r]
        assert len(mine) == 3
        for r in mine:
            cells = [c.strip() for c in r.strip("|").split("|")]
            compile_s, step_ms, per_s = cells[5:8]
            assert "failed" not in r and float(step_ms) > 0 and float(compile_s) > 0, r
            assert float(per_s.replace(",", "")) > 0
