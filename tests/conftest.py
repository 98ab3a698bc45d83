"""Test-wide settings: float64 is on for every test (tests needing float32 say so)."""

import jax

jax.config.update("jax_enable_x64", True)
