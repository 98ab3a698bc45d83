"""Test-wide settings: float64 is on for every test (tests needing float32 say so), and
`tests/` is importable, so that test files share `from helpers import ...` under any
pytest import mode."""

import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every cached executable after each test file. The suite compiles thousands
    of programs in one process; each keeps its JIT code mapped, and the full suite
    segfaulted inside an XLA compile at ~95% (never in any file alone) once it grew
    past this session's additions, a process-wide resource running out."""
    yield
    jax.clear_caches()
    gc.collect()
