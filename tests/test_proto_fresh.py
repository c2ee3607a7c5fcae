"""The committed generated modules must be what proto/generate.sh makes now."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    pytest.importorskip("mypy_protobuf")
    work = tmp_path / "pacsmesh" / "proto"
    work.mkdir(parents=True)
    for proto in (ROOT / "proto").glob("*.proto"):
        shutil.copy(proto, work / proto.name)
    protoc_gen_mypy = Path(sys.executable).parent / "protoc-gen-mypy"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(tmp_path),
           f"--python_out={tmp_path}", f"--mypy_out={tmp_path}", f"--grpc_python_out={tmp_path}",
           f"--mypy_grpc_out={tmp_path}", *sorted(str(p) for p in work.glob("*.proto"))]
    env_path = f"{protoc_gen_mypy.parent}:{__import__('os').environ.get('PATH', '')}"
    subprocess.run(cmd, check=True, cwd=tmp_path, env={"PATH": env_path})
    generated = sorted(p.name for p in work.iterdir() if p.suffix in (".py", ".pyi"))
    assert generated, "protoc generated nothing"
    stale = [name for name in generated
             if not filecmp.cmp(work / name, ROOT / "proto" / name, shallow=False)]
    assert not stale, f"regenerate with proto/generate.sh: {stale} differ from the .proto files"
