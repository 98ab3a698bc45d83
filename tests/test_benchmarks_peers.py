"""benchmarks/peers.py --quick on the CPU: the eqprop_jax side runs at toy size, a peer
whose repository is absent is skipped with a note, and a peer line is parsed into the
table (a stand-in harness printing the harnesses' output format; no torch needed)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_EPS = 100.0


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x%"))


def test_peers_quick_table(tmp_path):
    harnesses = tmp_path / "harnesses"
    harnesses.mkdir()
    # Same output format as ../shared/peers/laborieux_step.py; it checks its arguments.
    (harnesses / "laborieux_step.py").write_text(
        "import sys\n"
        "assert sys.argv[2:] == ['mlp', '1'], sys.argv\n"
        f"print('peer laborieux-mlp T=30/10 batch=50 threads=2 examples_per_s={PEER_EPS}')\n"
    )
    peers = tmp_path / "peers"
    (peers / "laborieux").mkdir(parents=True)  # rain is absent: its row is skipped
    out = tmp_path / "peers.md"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "peers.py"),
        "--quick",
        "--rows",
        "p-mlp",
        "dhn-1h",
        "--torch-python",
        sys.executable,
        "--peers",
        str(peers),
        "--harnesses",
        str(harnesses),
        "--out",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "torch threads: 2" in text and "load average" in text and "GFLOP/s" in text
    header = next(ln for ln in text.splitlines() if ln.startswith("| configuration"))
    cols = _cells(header)
    rows = {
        _cells(ln)[0]: dict(zip(cols, _cells(ln), strict=True))
        for ln in text.splitlines()
        if ln.startswith("| ") and not ln.startswith(("| configuration", "|---"))
    }
    assert len(rows) == 2
    mlp = next(v for k, v in rows.items() if k.startswith("Laborieux et al. 2021 P-MLP"))
    dhn = next(v for k, v in rows.items() if k.startswith("rain DHN-1h"))

    jax_eps = _num(mlp["eqprop_jax examples/s"])
    assert jax_eps > 0 and _num(mlp["eqprop_jax compile s"]) > 0
    assert _num(mlp["peer examples/s"]) == PEER_EPS
    # The table's ratio is the two rounded rates' quotient, to its 2 decimals.
    ratio = _num(mlp["eqprop_jax / peer"])
    assert abs(ratio - jax_eps / PEER_EPS) <= 0.01 + 1e-3 * ratio
    # A fraction of the matmul rate comes from eqprop_jax's work model; at toy size it
    # does not describe the peer's network, so the peer's cell is left empty.
    assert 0 < _num(mlp["eqprop_jax % of matmul rate"]) < 100
    assert mlp["peer % of matmul rate"] == "—" and "toy size" in mlp["note"]

    assert dhn["peer examples/s"] == "—" and dhn["eqprop_jax / peer"] == "—"
    assert "skipped: absent" in dhn["note"] and str(peers / "rain") in dhn["note"]
    assert _num(dhn["eqprop_jax examples/s"]) > 0
    assert "toy size" in dhn["note"]
