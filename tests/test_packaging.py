"""Packaging: the core dependencies are bounded below only (GPU images ship newer jax)."""

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_core_dependencies_have_no_upper_bound():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d for d in deps}
    for name in ("jax", "jaxlib", "equinox", "optax"):
        assert name in names, f"{name} missing from the dependencies"
        assert ">=" in names[name], names[name]
        assert "<" not in names[name].replace("<=", "") and "<=" not in names[name], names[name]


def test_installed_versions_satisfy_the_lower_bounds():
    from importlib.metadata import version

    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for dep in deps:
        name, bound = re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep).groups()
        have = tuple(int(p) for p in re.findall(r"\d+", version(name))[:3])
        want = tuple(int(p) for p in bound.split("."))
        assert have[: len(want)] >= want, (name, version(name), bound)
