from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsmesh.sample import StudySpec, write_study
from tests.nodeproc import NodeProc


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    """A running node process on loopback with its own data dir."""
    n = NodeProc(tmp_path / "node").start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-instance synthetic CT study (512x512x16 bit), made once per session."""
    out = tmp_path_factory.mktemp("study")
    write_study(out, StudySpec(instances=30, study_index=7, seed=3))
    return out


# dcmtk's tools live here; a venv's bin/ (pynetdicom installs apps named storescu,
# getscu, findscu, movescu, echoscu) must never stand in for them
SYSTEM_PATH = "/usr/bin:/usr/local/bin:/bin"


def require_tool(name: str) -> str:
    """The system (dcmtk) tool `name`, or skip the test with the reason."""
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package dcmtk; .ci/run installs it)")
    return path
