"""The wheel is the package: it holds every module, the py.typed marker and the stubs,
and a node runs from it installed in a fresh virtualenv, far from this source tree.

The wheel is built from exactly what the Dockerfile's build stage copies (minus
.dockerignore), so this is also the check that the image's wheel is complete.
Third-party dependencies are not reinstalled (that would take minutes): the fresh
venv reaches them through a .pth line naming the project venv's site-packages. That
line adds one directory to sys.path and nothing else: the editable install's finder
in that directory is only ever activated by its own .pth, which is not processed
there. The test proves where pacsmesh was imported from instead of assuming it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

from tests.clusterproc import make_study
from tests.deployfiles import ROOT, copy_build_context, dockerfile_stages
from tests.nodeproc import free_port, write_config

PACKAGES = ("node", "cluster", "proto")  # at the root, installed as pacsmesh.<name>
START_TIMEOUT_S = 30.0

PROBE = """
import importlib, json, sys
mods = ["pacsmesh", "pacsmesh.cli", "pacsmesh.node", "pacsmesh.node.daemon",
        "pacsmesh.node.dicom", "pacsmesh.node.dicom.server", "pacsmesh.cluster",
        "pacsmesh.cluster.member", "pacsmesh.proto", "pacsmesh.proto.node_pb2", "grpc"]
files = {m: importlib.import_module(m).__file__ for m in mods}
print(json.dumps({"files": files, "path": sys.path, "prefix": sys.prefix,
                  "meta_path": [type(f).__module__ for f in sys.meta_path],
                  "editable": sorted(m for m in sys.modules if "editable" in m)}))
"""


def _build_wheel(tmp: Path) -> Path:
    build_stage = dockerfile_stages()[0]
    ctx = tmp / "context"
    copy_build_context(build_stage, ctx)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--wheel-dir", str(dist), str(ctx)],
                   check=True, capture_output=True, cwd=tmp, timeout=120)
    (wheel,) = dist.glob("pacsmesh-*.whl")
    return wheel


def _expected_files() -> set[str]:
    """Every module and stub the tree has, by its name in the wheel."""
    want = {"pacsmesh/py.typed"}
    roots = [(ROOT / "pacsmesh", "pacsmesh")] + [(ROOT / p, f"pacsmesh/{p}") for p in PACKAGES]
    for folder, prefix in roots:
        for dirpath, dirnames, filenames in os.walk(folder):  # not into the symlinks
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = Path(dirpath).relative_to(folder)
            want |= {f"{prefix}/{(rel / f).as_posix()}" for f in filenames
                     if f.endswith((".py", ".pyi", ".proto", "py.typed"))}
    return want


def _fresh_venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A venv with only the wheel installed (not editable), third-party deps by .pth."""
    venv = tmp / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, cwd=tmp, timeout=120)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "project_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return venv, site


def _within(path: str, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(folder.resolve())


def test_wheel_holds_every_module_and_a_node_runs_from_it_in_a_fresh_venv(
        tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt")))
    missing = _expected_files() - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    dist_info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    strays = sorted(n for n in names - dist_info if not n.startswith("pacsmesh/")
                    or "__pycache__" in n or n.endswith(".pyc"))
    assert not strays, f"the wheel carries more than the package: {strays}"
    assert b"pacsmesh = pacsmesh.cli:main" in entry_points

    venv, site = _fresh_venv(tmp_path, wheel)
    run = tmp_path / "run"  # cwd far from the source tree, and no PYTHONPATH
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)

    probe = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], cwd=run, env=env,
                           capture_output=True, text=True, check=True, timeout=60)
    seen = json.loads(probe.stdout)
    files = seen["files"]
    for module, file in files.items():
        if module.startswith("pacsmesh"):
            assert _within(file, site), f"{module} not from the fresh venv: {file}"
            assert not _within(file, ROOT), f"{module} imported from the source tree: {file}"
    assert _within(files["grpc"], Path(sysconfig.get_paths()["purelib"]))  # deps: the .pth
    assert not seen["editable"], seen["editable"]
    assert not any("editable" in m for m in seen["meta_path"]), seen["meta_path"]
    assert Path(seen["prefix"]).resolve() == venv.resolve()

    pacsmesh = str(venv / "bin" / "pacsmesh")  # the console script the wheel installed
    assert Path(pacsmesh).read_text().splitlines()[0] == f"#!{venv / 'bin' / 'python'}"
    port = free_port()
    address = f"127.0.0.1:{port}"
    config = write_config(run / "node.toml", {
        "node": {"id": "wheel-1", "site": "Boston", "lat": 42.3601, "lon": -71.0589,
                 "data_dir": "data", "listen": address}})
    log = open(run / "node.log", "wb")  # noqa: SIM115 - the child owns it
    node = subprocess.Popen([pacsmesh, "node", "--config", str(config)], cwd=run, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def installed(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([pacsmesh, *args, "--node", address], cwd=run, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (health := installed("health", "--json")).returncode != 0:
            assert node.poll() is None, (run / "node.log").read_text()
            assert time.monotonic() < deadline, (health.stderr, (run / "node.log").read_text())
            time.sleep(0.2)
        assert json.loads(health.stdout)["status"] == "SERVING"

        study = make_study(tmp_path / "studies", index=1, instances=2)
        put = installed("put", str(study.folder), "--json")
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout)["stored"] == 2
        got = installed("get", study.uid, "--out", str(run / "restored"), "--json")
        assert got.returncode == 0, got.stderr
        study.check_restored(run / "restored")
        assert (run / "data").is_dir()  # the config's relative data_dir, beside the config
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            code = node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            raise
    assert code == 0, (run / "node.log").read_text()
