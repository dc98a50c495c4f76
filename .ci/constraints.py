"""Print constraints.txt for this environment: every distribution skyreels-batch[test] needs, at its installed
version. Run it after the suite passed on new versions: `python .ci/constraints.py > constraints.txt`."""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# The versions the test suite last passed with (the dependency closure of .[test]); the README's install lines
# use it (pip install -c constraints.txt ...), so a fresh install gets what was tested. Regenerate after a
# passing suite on new versions: python .ci/constraints.py > constraints.txt"""


def closure(name: str, extras: tuple[str, ...], found: dict[str, str], visited: set) -> None:
    """Add `name` (with `extras`) and what it requires, installed, to `found` (name -> version)."""
    if (canonicalize_name(name), extras) in visited:
        return
    visited.add((canonicalize_name(name), extras))
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return
    found[canonicalize_name(name)] = distribution.version.split("+")[0]  # torch 2.13.0+cpu: fits the CUDA build
    for text in distribution.requires or []:
        requirement = Requirement(text)
        wanted = requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras))
        if wanted:
            closure(requirement.name, tuple(sorted(requirement.extras)), found, visited)


if __name__ == "__main__":
    found: dict[str, str] = {}
    closure("skyreels-batch", ("test",), found, set())
    found.pop("skyreels-batch")
    print(HEADER)
    print("\n".join(f"{name}=={version}" for name, version in sorted(found.items())))
