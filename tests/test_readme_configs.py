"""Every TOML configuration example in the README parses with the node's own
config loader, so the documentation cannot drift from the code (a key placed after
`[dicom.destinations]` once became a destination and failed to load)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from pacsmesh.node import config

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    """Indented blocks of the README whose first line is a TOML section header."""
    blocks: list[str] = []
    current: list[str] = []
    for line in [*README.read_text().splitlines(), ""]:
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
            continue
        if current:
            text = "\n".join(current).strip()
            if re.match(r"\[[a-z_.]+\]", text):
                blocks.append(text)
        current = []
    return blocks


def test_the_readme_has_config_examples() -> None:
    assert any("[node]" in block for block in examples())


@pytest.mark.parametrize("block", examples(), ids=lambda b: b.splitlines()[0])
def test_every_readme_config_example_parses(block: str) -> None:
    raw = tomllib.loads(block)
    cfg = config.parse(raw, Path("/tmp/pacsmesh-readme/node.toml"))
    if "dicom" in raw:  # keys meant for [dicom] must not have landed in a subtable
        assert set(raw["dicom"].get("destinations", {})) <= {"VIEWER"}, raw["dicom"]
        assert cfg.dicom.max_associations == raw["dicom"].get(
            "max_associations", cfg.dicom.max_associations)
