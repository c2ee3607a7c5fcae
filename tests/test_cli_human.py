"""The CLI as a person meets it: an example in every --help, shell completion that
works in bash and zsh, one actionable line (never a traceback) when something
fails, progress and `status --watch` on a real terminal (a pty), and nothing extra
on stdout when it is not one."""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pacsmesh import cli as cli_mod
from pacsmesh.sample import StudySpec, write_study
from tests.nodeproc import PYTHON, NodeProc, cli, cli_json

CLIENT_COMMANDS = {  # every command that talks to a node, with arguments that parse
    "health": [], "put": ["/nonexistent"], "get": ["1.2.3", "--out", "/tmp/x"], "ls": [],
    "retention": ["1.2.3"], "hold": ["1.2.3", "--reason", "r"],
    "release": ["1.2.3", "--reason", "r"], "delete": ["1.2.3", "--reason", "r"],
    "locate": ["1.2.3"], "status": [], "scrub": [], "gc": [], "drill": [], "audit": []}


def _parsers(parser: argparse.ArgumentParser, prefix: str = "pacsmesh"
             ) -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.append((f"{prefix} {name}", child))
                out += _parsers(child, f"{prefix} {name}")
    return out


def test_every_help_has_an_example() -> None:
    parser = cli_mod.build_parser()
    commands = _parsers(parser)
    assert len(commands) >= 20
    assert set(CLIENT_COMMANDS) <= {c.split()[1] for c, _ in commands}
    for name, p in [("pacsmesh", parser), *commands]:
        text = p.format_help()
        assert re.search(r"^examples?: pacsmesh ", text, re.M), f"{name} --help:\n{text}"


def test_unreachable_node_is_one_line_for_every_command(
        capsys: pytest.CaptureFixture[str]) -> None:
    for name, rest in CLIENT_COMMANDS.items():
        code = cli_mod.main([name, *rest, "--node", "127.0.0.1:1"])
        out, err = capsys.readouterr()
        assert code == 1, (name, code, out, err)
        assert out == "" and err.count("\n") == 1, (name, out, err)
        assert err.startswith(f"pacsmesh {name}: cannot reach node 127.0.0.1:1"), err
        assert "is it running, is the port right" in err and "Traceback" not in err


def test_unexpected_error_says_what_and_hides_the_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("the flux capacitor")

    monkeypatch.setattr(cli_mod, "cmd_status", broken)
    assert cli_mod.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pacsmesh status: unexpected error: RuntimeError: the flux "), err
    assert "--debug" in err and "Traceback" not in err
    for argv in (["--debug", "status"], ["status", "--debug"]):
        with pytest.raises(RuntimeError, match="flux"):
            cli_mod.main(argv)


def test_local_file_errors_name_the_path(node: NodeProc, tmp_path: Path) -> None:
    write_study(tmp_path / "s", StudySpec(instances=2, rows=32, columns=32, study_index=3))
    uid = cli_json("put", str(tmp_path / "s"), node=node.address)["studies"][0]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = cli("get", uid, "--out", str(blocker / "out"), node=node.address)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"pacsmesh get: cannot use {blocker / 'out'}"), res.stderr
    res = cli("get", "1.2.3.4", "--out", str(tmp_path), node=node.address)
    assert "(NOT_FOUND: check the UID; `pacsmesh ls` lists" in res.stderr, res.stderr


def test_bash_completion(tmp_path: Path) -> None:
    script = tmp_path / "pacsmesh.bash"
    script.write_text(cli("completion", "bash", check=True).stdout)

    def complete(line: str) -> set[str]:
        words = line.split(" ")
        res = subprocess.run(["bash", "-c", f"""
            source {script}
            COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}
            COMP_LINE="{line}"; COMP_POINT={len(line)}
            _shtab_pacsmesh pacsmesh "{words[-1]}" "{words[-2]}"
            printf '%s\\n' "${{COMPREPLY[@]}}" """], capture_output=True, text=True,
            check=True)
        return set(res.stdout.split())

    assert {"status", "scrub"} <= complete("pacsmesh s") <= {"status", "scrub"}
    assert "--unsafe" in complete("pacsmesh ls --un")
    assert complete("pacsmesh completion ") == {"bash", "zsh"}
    assert {"node", "operator", "reader", "modality"} == complete("pacsmesh ca issue x --role ")


def test_zsh_completion(tmp_path: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (./dev test installs it as root)")
    folder = tmp_path / "fpath"
    folder.mkdir()
    (folder / "_pacsmesh").write_text(cli("completion", "zsh", check=True).stdout)
    subprocess.run([zsh, "-n", str(folder / "_pacsmesh")], check=True)
    # installed on fpath, compinit binds it to the command; sourced, it
    # defines the completion functions
    res = subprocess.run([zsh, "-f", "-c", f"fpath=({folder} $fpath); autoload -U compinit; "
                          "compinit -u -D; print -r -- $_comps[pacsmesh]; "
                          f"source {folder / '_pacsmesh'}; print -r -- $_comps[pacsmesh]; "
                          "functions _shtab_pacsmesh_commands"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "_pacsmesh", res.stdout
    assert re.search(r"status:'the cluster at a glance", res.stdout), res.stdout


def _on_pty(args: list[str], until: str, timeout_s: float = 60,
            interrupt_after: str | None = None) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal, as in a person's shell."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    proc = subprocess.Popen([PYTHON, "-m", "pacsmesh.cli", *args], stdin=slave,
                            stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout_s
    interrupted = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break  # the child closed the terminal
                if not chunk:
                    break
                out += chunk
            text = plain(out.decode(errors="replace"))
            if interrupt_after and not interrupted and re.search(interrupt_after, text):
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert re.search(until, plain(text)), text
    return code, text


def plain(screen: str) -> str:
    """What the eye reads: the terminal's control sequences taken out."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)


def test_progress_on_a_terminal_only(node: NodeProc, tmp_path: Path) -> None:
    write_study(tmp_path / "s", StudySpec(instances=120, rows=128, columns=128,
                                          study_index=4))
    code, screen = _on_pty(["put", str(tmp_path / "s"), "--node", node.address],
                           until=r"stored 120")
    assert code == 0, screen
    # rich's bar: the task, the bytes done of all, a rate and the time left
    assert re.search(r"put 120 files .*/\d+\.\d MB .*B/s eta", plain(screen)), screen
    uid = cli_json("ls", node=node.address)["studies"][0]["study_uid"]
    code, screen = _on_pty(["get", uid, "--out", str(tmp_path / "o"), "--node",
                            node.address], until=r"restored 120 instances")
    assert code == 0 and re.search(r"get .*\d+/120 .*instances/s", plain(screen)), screen
    # piped: exactly what scripts saw before, no bar
    res = cli("put", str(tmp_path / "s"), node=node.address)
    assert res.stdout.startswith("stored 0, duplicates 120") and res.stderr == "", res


def test_status_watch_refreshes_in_place(node: NodeProc) -> None:
    code, screen = _on_pty(["status", "--watch", "0.3", "--node", node.address],
                           until=r"HEALTH_", interrupt_after=r"(Ctrl-C to stop[\s\S]*){3}")
    assert code == 0, screen
    assert plain(screen).count("HEALTH_") >= 3, screen  # redrawn...
    assert "\x1b[1A" in screen or "\x1b[A" in screen, repr(screen[-500:])  # ...in place
    res = cli("status", "--watch", "--json", node=node.address)
    assert res.returncode == 2 and "--watch" in res.stderr
