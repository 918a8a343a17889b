"""Compare what a virtual environment has installed with the lock (requirements/constraints.txt).

Usage: ``python scripts/lock_diff.py [--strict] [--python .venv/bin/python] [--lock FILE]``.
Names are compared after PEP 503 normalisation and versions without their local label, so the lock's
``torch==2.13.0`` matches an installed ``2.13.0+cpu`` (or ``+cu128``). The editable project itself and
pip are not compared, and neither are packages that only the installed torch build requires and the
lock does not name (a CUDA build's ``nvidia-*`` and ``triton``, when ``make TORCH=...`` picks one).
Prints one line per difference; with ``--strict`` a version that differs from its pin exits 1
(``make install`` uses it), without it the script only reports (``make test-latest`` uses it to show
upstream drift).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Set as AbstractSet
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
_IGNORED = {"pip", "stabilitylab"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: list[str]) -> dict[str, str]:
    """Return ``{normalised name: version without local label}`` for every ``name==version`` line.

    Args:
        lines: lines of a lock file or of ``pip freeze --all`` output; comments, options and editable
            lines are skipped.

    Returns:
        The pins, keyed by PEP 503 normalised name.
    """
    pins = {}
    for line in lines:
        match = _PIN.match(line.strip())
        if match and _normalise(match.group(1)) not in _IGNORED:
            pins[_normalise(match.group(1))] = match.group(2).split("+", 1)[0]
    return pins


def diff_pins(locked: dict[str, str], installed: dict[str, str], build_only: AbstractSet[str] = frozenset()) -> list[str]:
    """Describe every package whose installed version differs from the lock, sorted by name.

    Args:
        locked: pins from the lock file.
        installed: pins from the environment.
        build_only: normalised names to skip when the lock does not name them (torch build extras).

    Returns:
        Lines such as ``"torch: locked 2.13.0, installed 2.14.0"`` (``-`` for absent); empty when they
        agree.
    """
    lines = []
    for name in sorted(set(locked) | (set(installed) - set(build_only))):
        want, have = locked.get(name, "-"), installed.get(name, "-")
        if want != have:
            lines.append(f"{name}: locked {want}, installed {have}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the differences between an environment and the lock; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the environment")
    parser.add_argument("--lock", default="requirements/constraints.txt", type=Path)
    parser.add_argument("--strict", action="store_true", help="exit 1 when an installed version differs from its pin")
    args = parser.parse_args(argv)
    freeze = subprocess.run(
        [args.python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    torch_info = subprocess.run(
        [args.python, "-m", "pip", "show", "torch"], capture_output=True, text=True
    ).stdout.splitlines()
    requires = next((line.split(":", 1)[1] for line in torch_info if line.startswith("Requires:")), "")
    build_only = {_normalise(name) for name in requires.split(",") if name.strip()}
    differences = diff_pins(parse_pins(args.lock.read_text().splitlines()), parse_pins(freeze), build_only)
    for line in differences:
        print(line)
    if not differences:
        print(f"{args.python}: every installed package matches {args.lock}")
    # Strict mode fails on a version that differs from its pin; a locked package left out (a smaller
    # EXTRAS) or an extra package the user installed is reported but allowed.
    conflicts = [line for line in differences if "locked -" not in line and "installed -" not in line]
    return 1 if conflicts and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
