"""Reading the Dockerfile, .dockerignore and docker-compose.yml the way Docker would,
for tests/test_deploy.py and tests/test_wheel.py (there is no Docker engine here).

Only what those files use is supported: JSON-form CMD/ENTRYPOINT/HEALTHCHECK, plain
COPY lines, and .dockerignore patterns that are paths, globs or ``**/`` prefixes.
Anything else is an error, so a change to those files that this reader would
misunderstand fails loudly instead of passing unchecked.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def exec_form(self, keyword: str) -> list[str]:
        """The last KEYWORD in JSON (exec) form; shell form is refused: it needs a shell
        in the image and hides the argv from this check."""
        rest = self.all(keyword)[-1]
        argv = json.loads(rest)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
        return argv


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of a Dockerfile, with continuation lines joined and comments dropped."""
    stages: list[Stage] = []
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a Dockerfile line continues past the end of the file"
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


def copy_sources(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from=)."""
    out = []
    for rest in stage.all("COPY"):
        words = rest.split()
        if any(w.startswith("--from") for w in words):
            continue
        assert not any(w.startswith("--") for w in words), f"COPY option not understood: {rest}"
        assert len(words) >= 2, rest
        out.append((words[:-1], words[-1]))
    return out


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), f"exceptions are not understood here: {line}"
        patterns.append(line.strip("/"))
    return patterns


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps the context path ``rel`` (or a folder above it) out."""
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(fnmatch.fnmatchcase(part, tail) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def copy_build_context(stage: Stage, dest: Path) -> list[Path]:
    """Copies what the stage's COPY lines take from the context, minus .dockerignore,
    into ``dest`` laid out as in the stage's WORKDIR. Symlinks stay symlinks, as
    Docker's COPY keeps them."""
    patterns = dockerignore_patterns()
    copied: list[Path] = []
    for sources, target in copy_sources(stage):
        for src in sources:
            assert not ignored(src, patterns), f"COPY {src}: .dockerignore excludes it"
            origin = ROOT / src
            to = dest / (Path(src).name if target.endswith("/") or target in (".", "./")
                         else target)
            if origin.is_dir() and not origin.is_symlink():
                for dirpath, dirnames, filenames in os.walk(origin):
                    rel_dir = Path(dirpath).relative_to(ROOT)
                    dirnames[:] = [d for d in dirnames
                                   if not ignored(str(rel_dir / d), patterns)]
                    for name in [*filenames, *(d for d in dirnames
                                               if (Path(dirpath) / d).is_symlink())]:
                        rel = rel_dir / name
                        if ignored(str(rel), patterns):
                            continue
                        out = to / Path(dirpath).relative_to(origin) / name
                        out.parent.mkdir(parents=True, exist_ok=True)
                        if (ROOT / rel).is_symlink():
                            out.symlink_to(os.readlink(ROOT / rel))
                        else:
                            shutil.copy2(ROOT / rel, out)
                        copied.append(out)
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, to)
                copied.append(to)
    return copied


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved
    return doc


@dataclass(frozen=True)
class Port:
    host_ip: str
    host: int
    container: int


def parse_port(spec: str) -> Port:
    """Compose's short syntax [IP:]HOST:CONTAINER (tcp); anything else is refused."""
    parts = str(spec).split(":")
    assert len(parts) in (2, 3) and "/" not in parts[-1], f"port not understood: {spec!r}"
    ip = parts[0] if len(parts) == 3 else ""
    return Port(ip, int(parts[-2]), int(parts[-1]))


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def named(self) -> bool:
        """A named volume, not a bind mount of a host path."""
        return not self.source.startswith((".", "/", "~"))


def parse_volume(spec: str) -> Mount:
    parts = spec.split(":")
    assert len(parts) in (2, 3), f"volume not understood: {spec!r}"
    mode = parts[2] if len(parts) == 3 else "rw"
    assert mode in ("ro", "rw"), spec
    return Mount(parts[0], parts[1], mode == "ro")
