"""The lock (requirements/constraints.txt) against pyproject.toml, and the lock-diff script."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"


def _lock_diff():
    spec = importlib.util.spec_from_file_location("lock_diff", ROOT / "scripts" / "lock_diff.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _direct_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for items in project["optional-dependencies"].values():
        reqs += [r for r in items if not r.startswith("stabilitylab")]
    return [Requirement(r) for r in reqs]


def test_lock_pins_cpu_torch_without_a_local_label_and_no_cuda_packages():
    pins = _lock_diff().parse_pins(LOCK.read_text().splitlines())
    assert pins["torch"] == "2.13.0" and re.search(r"^torch==2\.13\.0$", LOCK.read_text(), re.M)
    assert not [n for n in pins if n.startswith(("nvidia-", "triton", "cuda"))]
    assert "torchvision" not in pins and "seaborn" not in pins  # mup's, never installed (--no-deps)


def test_every_direct_dependency_is_locked_and_its_lower_bound_is_the_locked_version():
    pins = _lock_diff().parse_pins(LOCK.read_text().splitlines())
    for req in _direct_requirements():
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name]), f"locked {name}=={pins[name]} is outside {req}"
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert lower, f"{req} has no lower bound"
        assert Version(lower[0]) == Version(pins[name]), (
            f"{req}: the lower bound should be the oldest tested version, the locked {pins[name]}")


def test_lock_diff_ignores_local_labels_and_torch_build_extras_and_names_the_rest():
    ld = _lock_diff()
    locked = ld.parse_pins(["# comment", "torch==2.13.0", "    # via x", "Jinja2==3.1.6", "-e file:."])
    installed = ld.parse_pins(["torch==2.13.0+cu128", "jinja2==3.1.7", "nvidia-cublas==12.9", "extra-pkg==1.0",
                               "pip==26.0", "stabilitylab==0.1.0"])
    assert locked == {"torch": "2.13.0", "jinja2": "3.1.6"}
    assert ld.diff_pins(locked, installed, build_only={"nvidia-cublas"}) == [
        "extra-pkg: locked -, installed 1.0", "jinja2: locked 3.1.6, installed 3.1.7"]
    assert ld.diff_pins(locked, {"torch": "2.13.0", "jinja2": "3.1.6"}) == []
