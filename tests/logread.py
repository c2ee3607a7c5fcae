"""Reads a node's log back into records, whichever format it was written in."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# TS LEVEL node@site logger: message [study=... instance=...]; a site may hold spaces,
# a logger name never does
TEXT_LINE = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
                       r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                       r"(?P<node>[^@ ]+)@(?P<site>.+?) (?P<logger>\S+): (?P<msg>.*)$")
TAGS = re.compile(r" \[((?:study|instance)=\S+(?: (?:study|instance)=\S+)*)\]$")


def records(text: str) -> list[dict[str, Any]]:
    """One dict per record, with the keys of the JSON format. A JSON line that does not
    parse, or a text line that is neither a record nor a traceback line under one, is
    an AssertionError (except the readiness line on stdout in text)."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("{"):
            doc = json.loads(line)
            assert isinstance(doc, dict), line
            out.append(doc)
            continue
        m = TEXT_LINE.match(line)
        if m is None:
            if line.startswith("    ") and out:  # a traceback under the record above
                out[-1]["exc"] = out[-1].get("exc", "") + line[4:] + "\n"
                continue
            if line.startswith("pacsmesh node ") and " ready on " in line:
                continue
            raise AssertionError(f"not a log line: {line!r}")
        rec: dict[str, Any] = m.groupdict()
        tags = TAGS.search(rec["msg"])
        if tags:
            rec["msg"] = rec["msg"][:tags.start()]
            for tag in tags.group(1).split(" "):
                key, _, value = tag.partition("=")
                rec[key] = value
        out.append(rec)
    return out


def read(path: Path) -> list[dict[str, Any]]:
    return records(path.read_text(errors="replace"))
