"""Test-wide settings: float64 is on for every test (tests needing float32 say so), and
`tests/` is importable, so that test files share `from helpers import ...` under any
pytest import mode."""

import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
