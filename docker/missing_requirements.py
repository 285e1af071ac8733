"""Print the entries of a hashed lock file whose distributions are not installed here.

The Docker image starts from apache/airflow, which already holds Airflow, its providers and
their pinned dependencies (installed with the image's constraints). Installing the whole
runtime lock over it would up- or downgrade packages those providers were built against;
installing only what is missing keeps the image's versions and still verifies every added
file by its hash (``pip install --require-hashes --no-deps``; ``pip check`` afterwards).

    python missing_requirements.py requirements-runtime.lock > missing.lock
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(lock_text: str) -> list[tuple[str, str]]:
    """(normalized name, entry text with its hash lines) for each pinned requirement."""
    out: list[tuple[str, list[str]]] = []
    for line in lock_text.splitlines():
        match = _NAME.match(line)
        if match:
            out.append((normalize(match.group(1)), [line]))
        elif out and line.startswith((" ", "\t")):
            out[-1][1].append(line)
    return [(name, "\n".join(lines)) for name, lines in out]


def installed() -> set[str]:
    return {normalize(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}


def missing(lock_text: str, present: Iterable[str]) -> str:
    have = set(present)
    return "".join(text + "\n" for name, text in entries(lock_text) if name not in have)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(missing(Path(argv[1]).read_text(), installed()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
