"""The status page: one self-contained HTML page per node, for an operator at a glance.

What it shows, top to bottom: the health line (node/health.py, the same verdict as
`pacsmesh status`), the alerts with what to do, studies safe and unsafe, a map of the
sites with their states and the D-mile rule between every pair, the members (disk,
days until full, backlog), the links, the last scrub pass and the last drills.

`render` is a pure function of the figures (a StatusReply, a ScrubStatus and the
time), so tests check it without a node. Every value from the reply goes through
`html.escape`: site names and error messages come from peers and must never become
markup. The cost is O(members + alerts): nothing here touches the catalog, and the
lists are capped. Study UIDs are left out (the page names nodes and sites, never a
study); there is no patient data in a StatusReply to begin with.

No script, no external file: inline CSS and an inline SVG, refreshed by a meta tag,
so the page needs no build toolchain and can be served with a strict CSP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from typing import Any

from google.protobuf.message import Message

from pacsmesh.node.health import CRITICAL, OK, WARN, human_age, human_bytes, judge
from pacsmesh.proto import node_pb2

REFRESH_S = 10  # often enough to watch a node die; cheap (one status read per view)
MEMBERS_SHOWN_MAX = 500  # rows in the members table; more are counted, not drawn
ALERTS_SHOWN_MAX = 200
LINKS_SHOWN_MAX = 200
SITES_PAIRED_MAX = 16  # 120 pairs at most on the map; beyond, the pairs are not drawn
NODES_LABELLED_PER_SITE_MAX = 4
PAIRS_LABELLED_MAX_SITES = 3  # past this many sites only rule-breaking pairs are labelled
MAP_W, MAP_H_MAX, MAP_H_MIN = 760, 420, 160  # SVG user units
MAP_MARGIN_X, MAP_MARGIN_Y = 110, 40  # room for the labels around the outermost sites
SITE_LABEL_MAX = 32  # characters of a site name on the map (the tables show it whole)
STATES = ("alive", "suspect", "dead", "left")
_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
_LEVEL_CLASS = {OK: "ok", WARN: "warn", CRITICAL: "crit"}


@dataclass(frozen=True)
class Figures:
    """Everything the page shows, read once per view."""

    status: node_pb2.StatusReply
    scrub: node_pb2.ScrubStatus | None  # None: this node runs no scrubber
    now_s: float  # unix time the figures were read (drill ages, the footer)


def gather(api: Any) -> Figures:
    """Reads the figures from a NodeService: the same calls `status` and `scrub` make."""
    scrub = api.scrub_status() if api.scrubber is not None else None
    return Figures(api._status(), scrub, time.time())


# ---- the page ------------------------------------------------------------------------


def render(fig: Figures) -> str:
    st = fig.status
    health = judge(st)
    me = st.answered_by
    parts = [
        _HEAD.format(refresh=REFRESH_S, title=escape(f"{health.level} · {me}")),
        f'<header id="health" class="health {_LEVEL_CLASS[health.level]}">'
        f"{escape(health.line)}</header>",
        f'<p class="sub">as node <b>{escape(me)}</b> sees the federation: '
        f"{len(st.nodes)} members, every study kept as {st.copies} copies at sites at least "
        f"{_miles(st.min_distance_miles)} apart</p>",
        _alerts(st),
        _studies(st),
        _map(st),
        _members(st),
        _links(st),
        _scrub(fig.scrub),
        _drills(st, fig.now_s),
        f'<footer>generated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(fig.now_s))}'
        f" by {escape(me)}; refreshes every {REFRESH_S} s · "
        '<a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></footer>',
        "</body></html>\n",
    ]
    return "\n".join(parts)


_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>pacsmesh: {title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1100px;
  padding: 0 16px 24px; color: #1b1b1b; background: #fafafa; }}
h2 {{ font-size: 16px; margin: 22px 0 6px; border-bottom: 1px solid #ddd; }}
.health {{ font-size: 20px; font-weight: 600; padding: 12px 16px; margin: 12px 0 4px;
  border-radius: 6px; color: #fff; }}
.health.ok {{ background: #2e7d32; }} .health.warn {{ background: #b26a00; }}
.health.crit {{ background: #b71c1c; }}
.sub, footer {{ color: #555; }} footer {{ margin-top: 24px; font-size: 12px; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: 3px 8px; border-bottom: 1px solid #e4e4e4; }}
td.n, th.n {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
.state {{ font-weight: 600; }}
span.st-alive, td.st-alive {{ color: #2e7d32; }}
span.st-suspect, td.st-suspect {{ color: #b26a00; }}
span.st-dead, td.st-dead {{ color: #b71c1c; }}
span.st-left, td.st-left, span.st-other, td.st-other {{ color: #666; }}
tr.st-dead td {{ background: #fdecea; }} tr.st-suspect td {{ background: #fff4e0; }}
ul.alerts {{ list-style: none; padding: 0; margin: 0; }}
ul.alerts li {{ padding: 6px 10px; margin: 4px 0; border-left: 5px solid #999;
  background: #fff; }}
li.sev-critical {{ border-color: #b71c1c !important; }}
li.sev-warning {{ border-color: #b26a00 !important; }}
li.sev-info {{ border-color: #1565c0 !important; }}
.sev {{ font-weight: 700; margin-right: 6px; }} code {{ font-size: 13px; }}
svg {{ background: #fff; border: 1px solid #ddd; width: 100%; height: auto; }}
svg .pair {{ stroke-width: 2; }} svg .pair.far {{ stroke: #2e7d32; opacity: .55; }}
svg .pair.near {{ stroke: #b71c1c; stroke-dasharray: 6 4; }}
svg text {{ font: 12px system-ui, sans-serif; fill: #1b1b1b; }}
svg text.dist {{ font-size: 11px; fill: #333; paint-order: stroke; stroke: #fff;
  stroke-width: 3px; }}
svg text.dist.near {{ fill: #b71c1c; font-weight: 700; }}
svg circle {{ stroke: #fff; stroke-width: 1.5; }}
svg circle.st-alive {{ fill: #2e7d32; }} svg circle.st-suspect {{ fill: #ef8f00; }}
svg circle.st-dead {{ fill: #b71c1c; }} svg circle.st-left, svg circle.st-other {{ fill: #888; }}
svg tspan.st-dead {{ fill: #b71c1c; font-weight: 700; }}
svg tspan.st-suspect {{ fill: #b26a00; font-weight: 700; }}
.bad {{ color: #b71c1c; font-weight: 600; }} .good {{ color: #2e7d32; }}
</style></head><body>"""


def _state_class(state: str) -> str:
    """A CSS class from a fixed set: a peer's state string never reaches an attribute."""
    return f"st-{state}" if state in STATES else "st-other"


def _miles(m: float) -> str:
    return f"{m:,.0f} mi"


def _n(value: int) -> str:
    return f"{value:,}"


def _rate(bytes_per_s: float) -> str:
    return f"{human_bytes(bytes_per_s)}/s" if bytes_per_s > 0 else "idle"


def _more(shown: int, total: int, what: str) -> str:
    return f'<p class="sub">and {total - shown:,} more {what}</p>' if total > shown else ""


def _alerts(st: node_pb2.StatusReply) -> str:
    ordered = sorted(st.alerts, key=lambda a: _SEVERITY_ORDER.get(a.severity, 3))
    shown = ordered[:ALERTS_SHOWN_MAX]
    if not shown:
        return '<h2>Alerts</h2><p id="alerts" class="good">No alerts: nothing to do.</p>'
    items = "".join(
        f'<li class="sev-{escape(a.severity) if a.severity in _SEVERITY_ORDER else "other"}">'
        f'<span class="sev">{escape(a.severity.upper())}</span>'
        f'<code class="code">{escape(a.code)}</code> '
        f'<span class="msg">{escape(a.message)}</span></li>' for a in shown)
    return (f'<h2>Alerts ({len(ordered)})</h2><ul id="alerts" class="alerts">{items}</ul>'
            + _more(len(shown), len(ordered), "alerts"))


def _studies(st: node_pb2.StatusReply) -> str:
    unsafe = st.unsafe_studies
    line = (f"<b>{_n(st.studies)}</b> studies ({_n(st.instances)} instances; "
            f"{human_bytes(st.chunk_bytes)} in packs on this node): "
            f"<span class=\"good\">{_n(st.safe_studies)} "
            f"safe</span>, ")
    if unsafe:
        line += (f'<span class="bad">{_n(unsafe)} unsafe</span> (short of {st.copies} safe '
                 f"copies), the oldest for <b>{human_age(st.oldest_unsafe_age_s)}</b>")
    else:
        line += "none unsafe"
    out = [f'<h2>Studies</h2><p id="studies">{line}</p>']
    r = st.repair
    if r.unsafe_studies or r.backlog_instances:
        if r.stalled:
            when = '<span class="bad">stalled: nothing moved lately</span>'
        elif r.eta_s >= 0:
            when = f"done in about {human_age(r.eta_s)}"
        else:
            when = "no estimate yet"
        out.append(f'<p id="repair">Re-protecting: {_n(r.backlog_instances)} instances '
                   f"({human_bytes(r.backlog_bytes)}) to copy, at "
                   f"{_rate(r.bytes_per_s)}; {when}</p>")
    return "".join(out)


# ---- the map ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    name: str
    lat: float
    lon: float
    nodes: tuple[node_pb2.NodeStatus, ...]


def _sites(nodes: Iterable[node_pb2.NodeStatus]) -> list[_Site]:
    """Members grouped by site name, placed at the mean of their coordinates."""
    by_name: dict[str, list[node_pb2.NodeStatus]] = {}
    for n in nodes:
        by_name.setdefault(n.site, []).append(n)
    return [_Site(name, sum(n.lat for n in ns) / len(ns), sum(n.lon for n in ns) / len(ns),
                  tuple(ns)) for name, ns in by_name.items()]


def site_pairs(sites: list[_Site], min_distance_miles: float
               ) -> list[tuple[_Site, _Site, float, bool]]:
    """(a, b, miles, meets the D-mile rule) for every pair of distinct sites."""
    # placement's own distance, so the page and placement never disagree; imported
    # here (node never depends on cluster at import time, as node/config.py does)
    from pacsmesh.cluster.placement import great_circle_miles
    out = []
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            miles = great_circle_miles(a.lat, a.lon, b.lat, b.lon)
            out.append((a, b, miles, miles >= min_distance_miles))
    return out


def _projector(sites: list[_Site]) -> tuple[Any, float]:
    """Equirectangular over the sites' bounding box, x shrunk by cos(mid latitude);
    returns the projection and the map's height (as tall as the sites need)."""
    lats = [s.lat for s in sites]
    lons = [s.lon for s in sites]
    lat_max, lon_min = max(lats), min(lons)
    k = max(math.cos(math.radians((min(lats) + lat_max) / 2)), 0.1)
    span_x, span_y = (max(lons) - lon_min) * k, lat_max - min(lats)
    inner_w = MAP_W - 2 * MAP_MARGIN_X
    inner_h_max = MAP_H_MAX - 2 * MAP_MARGIN_Y - 40  # 40: the labels under the lowest
    scale = min(inner_w / span_x if span_x else math.inf,
                inner_h_max / span_y if span_y else math.inf)
    if math.isinf(scale):
        scale = 0.0
    height = max(MAP_H_MIN, span_y * scale + 2 * MAP_MARGIN_Y + 40)
    off_x = MAP_MARGIN_X + (inner_w - span_x * scale) / 2
    off_y = MAP_MARGIN_Y + (height - 2 * MAP_MARGIN_Y - 40 - span_y * scale) / 2

    def project(lat: float, lon: float) -> tuple[float, float]:
        return off_x + (lon - lon_min) * k * scale, off_y + (lat_max - lat) * scale
    return project, height


def _map(st: node_pb2.StatusReply) -> str:
    sites = _sites(st.nodes)
    if not sites:
        return '<h2>Sites</h2><p class="sub">no members known</p>'
    project, height = _projector(sites)
    d = st.min_distance_miles
    paired = len(sites) <= SITES_PAIRED_MAX
    pairs = site_pairs(sites, d) if paired else []
    svg = [f'<svg id="map" viewBox="0 0 {MAP_W} {height:.0f}" role="img" '
           f'aria-label="map of the sites">']
    for a, b, miles, far in pairs:
        (x1, y1), (x2, y2) = project(a.lat, a.lon), project(b.lat, b.lon)
        cls = "far" if far else "near"
        label = _miles(miles) + ("" if far else f" < {_miles(d)}")
        svg.append(f'<line class="pair {cls}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" '
                   f'y2="{y2:.1f}"><title>{escape(a.name)} to {escape(b.name)}: '
                   f"{label}</title></line>")
        # every pair's miles would bury the map past a few sites: there, only the pairs
        # that break the rule say so on it (the table below has them all)
        if not far or len(sites) <= PAIRS_LABELLED_MAX_SITES:
            svg.append(f'<text class="dist {cls}" x="{(x1 + x2) / 2:.1f}" '
                       f'y="{(y1 + y2) / 2:.1f}" text-anchor="middle">{escape(label)}</text>')
    spots = [project(s.lat, s.lon) for s in sites]
    for i, s in enumerate(sites):
        x, y = spots[i]
        # a label goes on the side away from the nearest other site, so two sites close
        # together (Boston and New York) keep their labels apart
        others = [p for j, p in enumerate(spots) if j != i]
        nx, ny = min(others, key=lambda p: (p[0] - x) ** 2 + (p[1] - y) ** 2,
                     default=(x, y + 1))
        svg.append(_site_marker(s, x, y, st.answered_by, above=ny > y, leftward=nx > x))
    svg.append("</svg>")
    legend = (f'<p class="sub">Sites placed by latitude and longitude. A green line joins '
              f"two sites at least D = {_miles(d)} apart (copies there both count); a red "
              "dashed one two sites closer than that (copies there count once). "
              'Dots: <span class="st-alive">alive</span>, <span class="st-suspect">suspect'
              '</span>, <span class="st-dead">dead</span>, <span class="st-left">left</span>'
              "</p>")
    if not paired:
        legend += (f'<p class="sub">{len(sites)} sites: too many to draw every pair (at '
                   f"most {SITES_PAIRED_MAX})</p>")
    return "<h2>Sites and the distance rule</h2>" + "".join(svg) + legend + _pair_table(
        pairs, d)


def _site_marker(s: _Site, x: float, y: float, me: str, above: bool = False,
                 leftward: bool = False) -> str:
    out = []
    count = len(s.nodes)
    for i, n in enumerate(s.nodes):
        # nodes of one site on a small ring around it, so none hides another
        angle = 2 * math.pi * i / count
        r = 0.0 if count == 1 else 9.0
        cx, cy = x + r * math.cos(angle), y + r * math.sin(angle)
        radius = 8 if n.id == me else 6
        out.append(f'<circle class="{_state_class(n.state)}" cx="{cx:.1f}" cy="{cy:.1f}" '
                   f'r="{radius}"><title>{escape(n.id)} ({escape(n.site)}): '
                   f"{escape(n.state)}</title></circle>")
    # labels lean inwards at the map's edges, so none runs off it
    anchor = ("start" if x < MAP_W / 4 else "end" if x > MAP_W * 3 / 4
              else "end" if leftward else "start")
    name = s.name if len(s.name) <= SITE_LABEL_MAX else s.name[:SITE_LABEL_MAX - 1] + "…"
    lines = [f'<tspan x="{x:.1f}" dy="0" font-weight="700">{escape(name)}</tspan>']
    for n in s.nodes[:NODES_LABELLED_PER_SITE_MAX]:
        you = " (this node)" if n.id == me else ""
        lines.append(f'<tspan x="{x:.1f}" dy="14">{escape(n.id)}{you}: </tspan>'
                     f'<tspan class="{_state_class(n.state)}">{escape(n.state)}</tspan>')
    if count > NODES_LABELLED_PER_SITE_MAX:
        lines.append(f'<tspan x="{x:.1f}" dy="14">and {count - NODES_LABELLED_PER_SITE_MAX}'
                     " more</tspan>")
    top = y - 16 - 14 * (len(lines) - 1) if above else y + 24
    out.append(f'<text class="site" x="{x:.1f}" y="{top:.1f}" '
               f'text-anchor="{anchor}">{"".join(lines)}</text>')
    return f'<g class="site" data-site="{escape(s.name)}">{"".join(out)}</g>'


def _pair_table(pairs: list[tuple[_Site, _Site, float, bool]], d: float) -> str:
    if not pairs:
        return ""
    rows = "".join(
        f'<tr class="{"far" if far else "near"}"><td>{escape(a.name)}</td>'
        f"<td>{escape(b.name)}</td><td class=\"n\">{_miles(miles)}</td><td>"
        + (f'<span class="good">meets D ({_miles(d)})</span>' if far else
           f'<span class="bad">closer than D ({_miles(d)}): copies there count once</span>')
        + "</td></tr>" for a, b, miles, far in sorted(pairs, key=lambda p: p[2]))
    return ('<table id="pairs"><tr><th>Site</th><th>Site</th><th class="n">Distance</th>'
            f"<th>D-mile rule</th></tr>{rows}</table>")


# ---- members, links, scrub, drills ---------------------------------------------------------


def _members(st: node_pb2.StatusReply) -> str:
    me = st.answered_by
    shown = list(st.nodes)[:MEMBERS_SHOWN_MAX]
    rows = []
    for n in shown:
        # this node's projection from its disk; a peer's from its gossiped use (-1: unknown
        # yet, or not growing)
        days = st.days_until_full if n.id == me else n.days_until_full
        full = f"{days:,.0f}" if days >= 0 else "not growing" if n.id == me else "—"
        if n.backlog_instances:
            backlog = (f"{_n(n.backlog_instances)} ({human_bytes(n.backlog_bytes)})"
                       + (f", oldest {human_age(n.backlog_oldest_age_s)}"
                          if n.backlog_oldest_age_s else ""))
            if n.waiting:
                drain = escape(n.waiting)
            elif n.drain_s > 0:
                drain = f"{human_age(n.drain_s)} at {_rate(n.receive_bytes_per_s)}"
            else:
                drain = '<span class="bad">not moving</span>'
        else:
            backlog, drain = "none", "—"
        used_pct = (f" ({100 * n.used_bytes / n.capacity_bytes:.0f} %)"
                    if n.capacity_bytes else "")
        cls = _state_class(n.state)
        rows.append(
            f'<tr class="{cls}" data-node="{escape(n.id)}"><td>{escape(n.id)}'
            f'{" <i>(this node)</i>" if n.id == me else ""}</td><td>{escape(n.site)}</td>'
            f'<td class="state {cls}">{escape(n.state)}</td>'
            f'<td class="n">{human_bytes(n.used_bytes)}{used_pct}</td>'
            f'<td class="n">{human_bytes(n.free_bytes)}</td><td class="n">{full}</td>'
            f"<td>{backlog}</td><td>{drain}</td></tr>")
    head = ('<tr><th>Node</th><th>Site</th><th>State</th><th class="n">Used</th>'
            '<th class="n">Free</th><th class="n">Days until full</th><th>Backlog</th>'
            "<th>Drains in</th></tr>")
    return (f'<h2>Members ({len(st.nodes)})</h2><table id="members">{head}{"".join(rows)}'
            "</table>" + _more(len(shown), len(st.nodes), "members"))


def _links(st: node_pb2.StatusReply) -> str:
    shown = list(st.links)[:LINKS_SHOWN_MAX]
    if not shown:
        return "<h2>Links</h2><p class=\"sub\">no chunk traffic with peers yet</p>"
    rows = "".join(
        f"<tr><td>{escape(st.answered_by)} ↔ {escape(link.peer)}</td>"
        f'<td class="n">{human_bytes(link.sent_bytes)}</td>'
        f'<td class="n">{_rate(link.sent_bytes_per_s)}</td>'
        f'<td class="n">{human_bytes(link.received_bytes)}</td>'
        f'<td class="n">{_rate(link.received_bytes_per_s)}</td></tr>' for link in shown)
    return ('<h2>Links</h2><table id="links"><tr><th>Link</th><th class="n">Sent</th>'
            '<th class="n">Sending</th><th class="n">Received</th><th class="n">Receiving'
            f"</th></tr>{rows}</table>" + _more(len(shown), len(st.links), "links"))


def _scrub(sc: node_pb2.ScrubStatus | None) -> str:
    if sc is None:
        return '<h2>Scrub</h2><p id="scrub" class="sub">this node runs no scrubber</p>'
    last = ("never" if sc.last_pass_completed_age_s < 0
            else f"{human_age(sc.last_pass_completed_age_s)} ago")
    overdue = ' <span class="bad">(overdue)</span>' if sc.overdue else ""
    running = (f"; a pass is running: {_n(sc.pass_chunks)} of {_n(sc.total_chunks)} chunks"
               if sc.running else "")
    bad = len(sc.unrepairable)
    damage = (f"{_n(sc.corrupt_found)} corrupt found, {_n(sc.repaired)} repaired, "
              + (f'<span class="bad">{_n(bad)} unrepairable</span>' if bad
                 else "0 unrepairable"))
    return (f'<h2>Scrub</h2><p id="scrub">Last full pass: <b>{last}</b>{overdue}{running}. '
            f"Verified {_n(sc.chunks_verified)} chunks ({human_bytes(sc.bytes_verified)}) "
            f"since this node began; {damage}. At most {sc.rate_mb_s:g} MB/s, a full pass "
            f"every {human_age(sc.interval_s)}.</p>")


def _drills(st: node_pb2.StatusReply, now_s: float) -> str:
    if not st.last_drill:
        return '<h2>Restore drills</h2><p id="drills" class="sub">no drill run yet</p>'
    items = []
    for d in st.last_drill:
        when = f"{human_age(now_s - d.at_s)} ago" if d.at_s else "at an unknown time"
        source = escape(f"{d.source_node} ({d.source_site})" if d.source_node else "-")
        if d.ok:
            outcome = (f'<span class="good">ok</span>: {_n(d.instances)} instances '
                       f"({human_bytes(d.bytes)}) restored from {source} in {d.seconds:.1f} s"
                       f" ({d.mb_s:.1f} MB/s)")
        else:
            outcome = (f'<span class="bad">FAILED</span> from {source}: {escape(d.error)}')
        items.append(f"<li>{when}: {outcome}</li>")
    return f'<h2>Restore drills</h2><ul id="drills">{"".join(items)}</ul>'


# ---- the same figures for scripts --------------------------------------------------------


def as_json(fig: Figures) -> dict[str, Any]:
    """/status.json: what the page shows, numbers as numbers (not protobuf's JSON
    strings for 64-bit integers). Study UIDs left out, as on the page."""
    health = judge(fig.status)
    status = _plain(fig.status)
    for d in status.get("last_drill", []):
        d.pop("study_uid", None)
    scrub = None
    if fig.scrub is not None:
        scrub = _plain(fig.scrub)
        scrub["unrepairable"] = len(fig.scrub.unrepairable)
    return {"health": {"level": health.level, "reasons": health.reasons, "line": health.line},
            "status": status, "scrub": scrub, "generated_at": fig.now_s}


def _plain(msg: Message) -> dict[str, Any]:
    """A message as plain JSON values, every field present (bounded by the message)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        is_message = field.type == field.TYPE_MESSAGE
        # is_repeated since protobuf 5.29 (label is gone in 7); LABEL_REPEATED is 3
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:
            repeated = getattr(field, "label", 0) == 3
        if repeated:
            out[field.name] = [_plain(v) if is_message else v for v in value]
        else:
            out[field.name] = _plain(value) if is_message else value
    return out
