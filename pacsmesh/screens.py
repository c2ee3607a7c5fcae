"""What people read: `status`, `ls` and `locate` as aligned tables (rich), with
sizes, ages and distances in the units an operator says. The JSON documents the
commands build are the input, so the screen can never show a figure `--json`
does not carry.

Colour and box drawing only on a terminal; piped output is plain aligned text,
never wrapped, so `grep` and `awk` keep working on it.
"""

from __future__ import annotations

import itertools
import shutil
import sys
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from pacsmesh.cluster.placement import great_circle_miles
from pacsmesh.node import health
from pacsmesh.proto import node_pb2

LEVEL_STYLE = {health.OK: "bold green", health.WARN: "bold yellow",
               health.CRITICAL: "bold white on red"}
STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "bold red", "left": "dim"}
SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, highlight=False)
    # not a terminal: no colour, and lines as long as they need to be
    return Console(file=stream, highlight=False, width=max(
        shutil.get_terminal_size((250, 24)).columns, 250), no_color=True,
        color_system=None)


def show(renderable: RenderableType) -> None:
    """Print to stdout: styled on a terminal; piped, plain lines without the padding
    rich leaves at their ends."""
    out = console()
    if sys.stdout.isatty():
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    # piped: a header line and rows, nothing for awk to skip
    t = Table(box=box.SIMPLE_HEAD if sys.stdout.isatty() else None, pad_edge=False,
              show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", no_wrap=True)
    return t


def days(d: float) -> str:
    return "-" if d < 0 else f"{d:,.0f} d"


# ---- status -----------------------------------------------------------------------


def status_screen(reply: node_pb2.StatusReply, doc: dict[str, Any]) -> RenderableType:
    """Health line first, then sites, studies and links, then alerts with what to do."""
    verdict = health.judge(reply)
    parts: list[RenderableType] = [Text(verdict.line, style=LEVEL_STYLE[verdict.level])]
    parts.append(Text(f"{len(doc['nodes'])} nodes; {doc['copies']} copies at sites >= "
                      f"{doc['min_distance_miles']:g} miles apart; answered by "
                      f"{doc['answered_by']}"))

    sites = _table("node", "site", "state", "used", "free", "full in", "backlog",
                   right=("used", "free", "full in"))
    for n in doc["nodes"]:
        sites.add_row(n["id"], n["site"], Text(n["state"], style=STATE_STYLE.get(n["state"], "")),
                      health.human_bytes(n["used_bytes"]), health.human_bytes(n["free_bytes"]),
                      days(n.get("days_until_full", -1.0)), backlog_cell(n))
    parts += [Text(), sites]

    line = (f"studies: {doc['studies']:,} ({doc['instances']:,} instances), "
            f"{doc['safe_studies']:,} safe, {doc['unsafe_studies']:,} unsafe")
    if doc["unsafe_studies"]:
        line += f" (oldest {health.human_age(doc['oldest_unsafe_age_s'])})"
    parts.append(Text(line, style="bold red" if doc["unsafe_studies"] else ""))
    repair = doc.get("repair", {})
    if int(repair.get("backlog_instances", 0)) or repair.get("stalled"):
        eta = repair.get("eta_s", -1)
        parts.append(Text(
            f"re-protection: {int(repair.get('backlog_instances', 0)):,} instances to copy"
            + (", STALLED" if repair.get("stalled") else
               f", done in about {health.human_age(eta)}" if eta >= 0 else "")))

    if doc.get("links"):
        links = _table("link", "sent", "rate", "received", "rate ",
                       right=("sent", "rate", "received", "rate "))
        for link in doc["links"]:
            links.add_row(f"{doc['answered_by']} <-> {link['peer']}",
                          health.human_bytes(link["sent_bytes"]),
                          f"{health.human_bytes(link.get('sent_bytes_per_s', 0))}/s",
                          health.human_bytes(link["received_bytes"]),
                          f"{health.human_bytes(link.get('received_bytes_per_s', 0))}/s")
        parts += [Text(), links]
    t = doc.get("transfer", {})
    if t.get("rate_mb_s") or t.get("bulk_rate_mb_s") or t.get("bulk_window"):
        window = t.get("bulk_window") or "always"
        parts.append(Text(
            f"outbound limits: {t.get('rate_mb_s') or 'unlimited'} MB/s, bulk "
            f"{t.get('bulk_rate_mb_s') or 'up to that'} MB/s in window {window} "
            f"({'open' if t.get('bulk_window_open') else 'closed'} now)"))
    for d in doc.get("last_drill", []):
        state = "ok" if d["ok"] else f"FAILED: {d['error']}"
        parts.append(Text(f"last drill: {d['study_uid'] or '-'} from "
                          f"{d['source_site'] or '-'}: {state}",
                          style="" if d["ok"] else "bold red"))
    if doc["alerts"]:
        alerts = _table("severity", "alert", "what to do")
        alerts.columns[2].no_wrap = False
        for a in doc["alerts"]:
            alerts.add_row(Text(a["severity"].upper(), style=SEVERITY_STYLE.get(a["severity"], "")),
                           a["code"], a["message"])
        parts += [Text(), alerts]
    else:
        parts += [Text(), Text("no alerts")]
    return Group(*parts)


def backlog_cell(n: dict[str, Any]) -> str:
    """A member's backlog: how much, how old, when done, or why not."""
    if not int(n.get("backlog_instances", 0)):
        return "-"
    line = (f"{int(n['backlog_instances']):,} inst ({health.human_bytes(int(n['backlog_bytes']))})"
            + (f", oldest {health.human_age(n['backlog_oldest_age_s'])}"
               if n.get("backlog_oldest_age_s") else ""))
    if n.get("waiting"):
        return f"{line}; {n['waiting']}"
    if n.get("drain_s", 0) > 0:
        rate = health.human_bytes(n.get("receive_bytes_per_s", 0))
        return f"{line}; ~{health.human_age(n['drain_s'])} at {rate}/s"
    return f"{line}; not moving"


# ---- ls ---------------------------------------------------------------------------------


def studies_table(studies: list[dict[str, Any]], required: int | None) -> Table:
    t = _table("study", "patient", "date", "mod", "inst", "size", "safe", "expires",
               right=("inst", "size", "safe"))
    for d in studies:
        safe = str(d["safe_copies"])
        style = "" if required is None or d["safe_copies"] >= required else "bold red"
        t.add_row(d["study_uid"], d["patient_id"], _date(d["study_date"]),
                  ",".join(d["modalities"]), f"{d['instances']:,}",
                  health.human_bytes(d["bytes"]), Text(safe, style=style),
                  _date(d["expires"]) if d["expires"] else "never (see retention)")
    return t


def _date(yyyymmdd: str) -> str:
    if len(yyyymmdd) == 8 and yyyymmdd.isdigit():
        return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:]}"
    return yyyymmdd or "-"


# ---- locate -------------------------------------------------------------------------------


def locate_screen(doc: dict[str, Any], where: dict[str, tuple[float, float]],
                  min_miles: float) -> RenderableType:
    """Holders, then the distance between every two holders' sites against the D-mile
    rule: the operator sees why a copy counts or does not."""
    state = "SAFE" if doc["safe"] else "NOT SAFE"
    head = Text(f"{doc['study_uid']}: {doc['instances']:,} instances, {doc['safe_copies']} of "
                f"{doc['required_copies']} safe copies: {state}",
                style="bold green" if doc["safe"] else "bold red")
    holders = _table("node", "site", "instances", "verified", right=("instances", "verified"))
    for h in doc["holders"]:
        age = h.get("verified_age_s", -1)
        holders.add_row(h["node"], h["site"], f"{h['instances']:,}",
                        "-" if age < 0 else f"{health.human_age(age)} ago")
    parts: list[RenderableType] = [head, holders]
    pairs = _table("between", "miles", f">= {min_miles:g}", right=("miles",))
    for a, b in itertools.combinations(doc["holders"], 2):
        if a["node"] not in where or b["node"] not in where:
            continue
        miles = great_circle_miles(*where[a["node"]], *where[b["node"]])
        pairs.add_row(f"{a['site']} - {b['site']}", f"{miles:,.0f}",
                      Text("yes", style="green") if miles >= min_miles
                      else Text("no: one copy for the rule", style="yellow"))
    if pairs.row_count:
        parts.append(pairs)
    return Group(*parts)
