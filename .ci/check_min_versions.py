"""Check the minimum-versions environment: pins equal pyproject's floors, and are installed.

Run by .ci/run with .venv-min's python. Every ``>=`` floor of the core
dependencies and of the ``classical``, ``distributed``, ``xarray``, ``geo``, ``vector`` and ``medical`` extras must have a
``name==floor`` line in .ci/min-versions.txt (and no other lines), and the
installed distribution must be exactly that version: otherwise the tests in
that environment would not be testing the declared minimums.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.version import Version  # a dependency of zarr

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("classical", "distributed", "xarray", "geo", "vector", "medical")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    out = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*", req)
        if not m:
            sys.exit(f"pyproject.toml: {req!r} is not of the form name>=floor")
        out[canon(m.group(1))] = m.group(3)
    return out


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[canon(name)] = ver.strip()
    return out


def main() -> int:
    want, pinned = floors(), pins()
    errors = [
        f"{n}: pyproject floor {want.get(n)}, min-versions.txt pin {pinned.get(n)}"
        for n in sorted(set(want) | set(pinned))
        if n not in want or n not in pinned or Version(want[n]) != Version(pinned[n])
    ]
    for name, ver in sorted(pinned.items()):
        try:
            got = version(name)
        except PackageNotFoundError:
            got = None
        if got is None or Version(got) != Version(ver):
            errors.append(f"{name}: pinned {ver}, installed {got}")
    for e in errors:
        print("min-versions:", e, file=sys.stderr)
    if not errors:
        print("min-versions: " + ", ".join(f"{n}=={v}" for n, v in sorted(pinned.items())))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
