"""Print pip constraints that pin every dependency of pyproject.toml (runtime and the given
extras) to its lower bound: ``name>=X`` becomes ``name==X``. ``make test-floor`` installs them to
check that the lower bounds are versions the suite passes on."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def floor_pins(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*", requirement)
        if match is None:
            raise SystemExit(f"not a plain 'name>=version' requirement: {requirement!r}")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        pins[name] = f"{name}=={match.group(2)}"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(floor_pins(Path("pyproject.toml"), sys.argv[1:])))
