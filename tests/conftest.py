"""Test-wide settings: float64 is on for every test (tests needing float32 say so), and
`tests/` is importable, so that test files share `from helpers import ...` under any
pytest import mode."""

import os
import sys
from pathlib import Path

# The suite is compile-bound: thousands of small programs, each run a few times. LLVM's
# optimisation of XLA:CPU's generated code buys those programs nothing and costs ~40% of
# the suite's CPU time (measured on tests/test_fixed_point_batching.py and
# tests/test_conv_field.py: 144 s -> 87 s). Level 0 changes how fast the code runs, not
# what it computes: XLA's HLO passes (fusion, layout, algebraic simplification) run as
# before. Set before jax reads XLA_FLAGS; subprocesses get it from helpers.subprocess_env.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

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
