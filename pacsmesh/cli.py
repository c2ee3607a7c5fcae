"""The `pacsmesh` command. Client commands talk to a node only through proto/.

Exit status: 0 success, 1 the operation failed or was incomplete, 2 usage.
With --json, stdout carries exactly one JSON document and nothing else.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from pacsmesh.node.health import human_bytes
from pacsmesh.progress import meter, watching
from pacsmesh.proto import node_pb2, node_pb2_grpc

DEFAULT_NODE = "127.0.0.1:7400"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]
WAIT_SAFE_DEFAULT_S = 600.0
LS_LIMIT_DEFAULT = 1000  # the node's default and cap (node/listing.py)
LS_LIMIT_MAX = 10_000
AUDIT_PAGE = 1000  # events per request


class Failed(Exception):
    """The operation failed; the message is the one line the operator sees."""


class Usage(Exception):
    """The command line asks for something impossible (exit 2)."""


def _channel(args: argparse.Namespace) -> grpc.Channel:
    given = [x for x in (args.ca, args.cert, args.key) if x]
    if not given:
        return grpc.insecure_channel(args.node, options=CHANNEL_OPTIONS)
    if len(given) != 3:
        raise Usage("TLS needs all of --ca, --cert and --key (or PACSMESH_CA, "
                    "PACSMESH_CERT and PACSMESH_KEY)")
    from pacsmesh.node.errors import ConfigError
    from pacsmesh.node.tls import channel_credentials, load_files
    try:
        files = load_files(Path(args.ca), Path(args.cert), Path(args.key))
    except ConfigError as exc:
        raise Failed(str(exc).replace("[tls] ", "--")) from exc
    return grpc.secure_channel(args.node, channel_credentials(files), options=CHANNEL_OPTIONS)


def _emit(args: argparse.Namespace, doc: dict[str, Any], human: Callable[[], None]) -> None:
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        human()


_HINTS = {  # what to try, by gRPC status, after the node's own explanation
    grpc.StatusCode.UNAUTHENTICATED: "pass your certificate: --ca/--cert/--key, or "
                                     "PACSMESH_CA, PACSMESH_CERT and PACSMESH_KEY",
    grpc.StatusCode.PERMISSION_DENIED: "ask whoever holds the cluster CA for a certificate "
                                       "with that role (pacsmesh ca issue NAME --role ROLE)",
    grpc.StatusCode.NOT_FOUND: "check the UID; `pacsmesh ls` lists what the cluster holds",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the node did not answer in time: is it overloaded "
                                       "or its disk stalled? `pacsmesh status` and its log",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the node is full or busy: `pacsmesh status` shows "
                                        "its disk and alerts",
    grpc.StatusCode.UNIMPLEMENTED: "the node runs an older pacsmesh without this command: "
                                   "upgrade it",
    grpc.StatusCode.INTERNAL: "a fault on the node: its log says more",
    grpc.StatusCode.UNKNOWN: "a fault on the node: its log says more",
}


def _rpc_error(exc: grpc.RpcError, node: str) -> Failed:
    """One line: what happened, as the node said it, and what to try."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return Failed(f"cannot reach node {node}: {exc.details()} (is it running, is the "
                      "port right, and does TLS match: --ca/--cert/--key for a node with "
                      "[tls], none for a plaintext one?)")
    hint = _HINTS.get(code)
    what = exc.details() or code.name.lower().replace("_", " ")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        what = f"refused by node {node}: {what}"
    return Failed(f"{what} ({code.name}: {hint})" if hint else f"{what} ({code.name})")


# ---- node ---------------------------------------------------------------------


def cmd_node(args: argparse.Namespace) -> int:
    from pacsmesh.node.config import load
    from pacsmesh.node.errors import ConfigError, PacsmeshError

    if args.check_config:
        return _check_config(Path(args.check_config))
    if not args.config:
        print("pacsmesh node: --config FILE is required (or --check-config FILE)",
              file=sys.stderr)
        return 2
    from pacsmesh.node import logsetup

    try:
        cfg = load(Path(args.config))
    except ConfigError as exc:
        print(f"pacsmesh node: bad config: {exc}", file=sys.stderr)
        return 2
    # the daemon names the node on every line once it knows its id (data dir or cert)
    logsetup.set_identity(cfg.node.id, cfg.node.site)
    level = os.environ.get("PACSMESH_LOG", "").lower() or cfg.log.level
    try:
        logsetup.configure(cfg.log.format, level)
    except ValueError as exc:
        print(f"pacsmesh node: $PACSMESH_LOG: {exc}", file=sys.stderr)
        return 2
    from pacsmesh.cluster.member import run_member

    try:
        return run_member(cfg)
    except PacsmeshError as exc:
        print(f"pacsmesh node: {exc}", file=sys.stderr)
        return 1


def _check_config(path: Path) -> int:
    """Validate a config without starting anything: the loader's own checks, and that
    every file it names (TLS certificates, keys, CA, CRL) can be read."""
    from pacsmesh.node.config import load
    from pacsmesh.node.errors import ConfigError

    try:
        cfg = load(path)
    except ConfigError as exc:
        print(f"{path}: bad config: {exc}", file=sys.stderr)
        return 2
    files = [("[tls] ca_cert", cfg.tls.ca_cert), ("[tls] cert", cfg.tls.cert),
             ("[tls] key", cfg.tls.key), ("[tls] crl", cfg.tls.crl)]
    if cfg.dicom.tls_listen:
        files += [("[dicom] tls_cert", cfg.dicom.tls_cert), ("[dicom] tls_key", cfg.dicom.tls_key),
                  ("[dicom] tls_client_ca", cfg.dicom.tls_client_ca)]
    problems = []
    for what, name in files:
        if name:
            try:
                Path(name).read_bytes()
            except OSError as exc:
                problems.append(f"{what} {name}: {exc.strerror or exc}")
    if problems:
        print(f"{path}: " + "; ".join(problems), file=sys.stderr)
        return 2
    dicom = f", DICOM on {cfg.dicom.listen or cfg.dicom.tls_listen}" if (
        cfg.dicom.listen or cfg.dicom.tls_listen) else ""
    print(f"{path}: config OK: node {cfg.node.id or '(id generated at first start)'} at "
          f"{cfg.node.site}, gRPC on {cfg.node.listen}{dicom}; {cfg.cluster.copies} copies "
          f">= {cfg.cluster.min_distance_miles:g} miles apart")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """The gRPC health service (grpc.health.v1), as container healthchecks and load
    balancers ask it: exit 0 when the node answers SERVING, 1 otherwise."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service=args.service)
    with _channel(args) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise Failed(f"node {args.node} reports no health for service "
                             f"{args.service!r} (e.g. pacsmesh.node.NodeApi)") from exc
            raise _rpc_error(exc, args.node) from exc
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    doc = {"node": args.node, "service": args.service, "status": status}
    _emit(args, doc, lambda: print(f"{args.node} {args.service or '(server)'}: {status}"))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# ---- put / get ------------------------------------------------------------------


def cmd_put(args: argparse.Namespace) -> int:
    from pacsmesh.upload import Uploader, expand

    files, problems = expand(args.paths)
    started = time.monotonic()
    sizes = [_size(p) for p in files]
    with _channel(args) as ch:
        try:  # one empty precheck: a refused role fails once, not once per file
            node_pb2_grpc.NodeApiStub(ch).Precheck(node_pb2.PrecheckRequest(), timeout=30)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, args.node) from exc
        with meter(f"put {len(files):,} files", sum(sizes), args.json, unit="bytes") as bar:
            up = Uploader(ch, on_settled=lambda ref: bar.advance(sizes[ref]))
            up.report.rejected.extend(problems)
            try:
                report = up.put(files)
            except grpc.RpcError as exc:
                raise _rpc_error(exc, args.node) from exc
        seconds = time.monotonic() - started
        doc = report.as_json()
        doc["seconds"] = round(seconds, 3)
        ok = not report.rejected
        if args.wait_safe is not None and report.studies:
            safe = _wait_safe(ch, sorted(report.studies), args.wait_safe,
                              say=None if args.json else _say_waiting)
            doc["safe"] = safe
            ok = ok and all(safe.values())
            if not all(safe.values()):
                doc["waiting"] = _why_waiting(node_pb2_grpc.NodeApiStub(ch))

    def human() -> None:
        mb = report.bytes_in / 1e6
        print(f"stored {report.stored}, duplicates {report.duplicates}, "
              f"rejected {len(report.rejected)}; {mb:.1f} MB in, "
              f"{human_bytes(report.bytes_written)} written, {seconds:.2f} s "
              f"({mb / max(seconds, 1e-9):.1f} MB/s)")
        for r in report.rejected:
            print(f"  rejected {r['path']}: {r['reason']}")
        for study, is_safe in doc.get("safe", {}).items():
            print(f"  {study}: {'safe' if is_safe else 'NOT safe yet'}")
        for why in doc.get("waiting", []):
            print(f"  waiting: {why}")

    _emit(args, doc, human)
    return 0 if ok else 1


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # it will be rejected with the reason when it is read


def _wait_safe(ch: grpc.Channel, studies: list[str], timeout_s: float,
               say: Callable[[list[str]], None] | None = None) -> dict[str, bool]:
    """Poll until every study is safe or the time is up; every WHY_EVERY_S, `say`
    why it is still waiting (the nodes' own explanations)."""
    stub = node_pb2_grpc.NodeApiStub(ch)
    started = time.monotonic()
    deadline = started + timeout_s
    said_at = started
    safe = dict.fromkeys(studies, False)
    while True:
        for study in [s for s, ok in safe.items() if not ok]:
            try:
                safe[study] = stub.Locate(node_pb2.LocateRequest(study_uid=study)).safe
            except grpc.RpcError:
                safe[study] = False
        now = time.monotonic()
        if all(safe.values()) or now >= deadline:
            return safe
        if say is not None and now - said_at >= WHY_EVERY_S:
            said_at = now
            say(_why_waiting(stub))
        # each Locate is a call (and an audit record): a put of thousands of studies
        # polls them less often, about 200 a second at most; a few, every 0.1 s
        unsafe = sum(1 for ok in safe.values() if not ok)
        time.sleep(max(WAIT_POLL_MIN_S, unsafe / 200))


WHY_EVERY_S = 5.0
WAIT_POLL_MIN_S = 0.1


def _say_waiting(reasons: list[str]) -> None:
    for why in reasons or ["copying"]:
        print(f"waiting for safe copies: {why}", file=sys.stderr, flush=True)


def _why_waiting(stub: node_pb2_grpc.NodeApiStub) -> list[str]:
    """Why copies are not all there yet, as the cluster sees it: too few sites, and
    per node its backlog, its rate, and what a sender said (e.g. a bulk window)."""
    try:
        st = stub.Status(node_pb2.StatusRequest(), timeout=10)
    except grpc.RpcError as exc:
        return [f"cannot ask the node why: {exc.code().name}"]
    out = []
    alive = [n for n in st.nodes if n.state == "alive"]
    if len(alive) < st.copies:
        out.append(f"only {len(alive)} sites are alive; {st.copies} copies need {st.copies} "
                   f"sites at least {st.min_distance_miles:.0f} miles apart")
    for n in _to_dict(st)["nodes"]:
        if int(n.get("backlog_instances", 0)):
            _ints(n, "backlog_instances", "backlog_bytes")
            from pacsmesh.screens import backlog_cell

            out.append(f"{n['id']}: {backlog_cell(n)}")
    return out


def cmd_get(args: argparse.Namespace) -> int:
    from pacsmesh.node.uids import uid_problem
    from pacsmesh.restore import get_study

    if problem := uid_problem(args.study_uid):
        raise Failed(f"study UID {problem}")
    with _channel(args) as ch:
        try:
            total = None
            if watching(args.json):  # how many to expect, for the bar (one more call)
                total = node_pb2_grpc.NodeApiStub(ch).Locate(
                    node_pb2.LocateRequest(study_uid=args.study_uid), timeout=30).instances
            with meter(f"get {args.study_uid[-24:]}", total, args.json,
                       unit="instances") as bar:
                report = get_study(ch, args.study_uid, Path(args.out),
                                   on_instance=lambda _n: bar.advance())
        except grpc.RpcError as exc:
            raise _rpc_error(exc, args.node) from exc

    def human() -> None:
        mb = report.bytes / 1e6
        print(f"restored {report.instances} instances ({mb:.1f} MB) of {report.study_uid} "
              f"to {report.out_dir}/{report.study_uid} in {report.seconds:.2f} s, each verified")
        for f in report.failed:
            print(f"  FAILED {f['sop_instance_uid']}: {f['reason']}")

    _emit(args, report.as_json(), human)
    return 1 if report.failed or report.instances == 0 else 0


# ---- views ---------------------------------------------------------------------------


def _call(args: argparse.Namespace, fn: Callable[[node_pb2_grpc.NodeApiStub], Any]) -> Any:
    with _channel(args) as ch:
        try:
            return fn(node_pb2_grpc.NodeApiStub(ch))
        except grpc.RpcError as exc:
            raise _rpc_error(exc, args.node) from exc


def _to_dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def _ints(doc: dict[str, Any], *keys: str) -> None:
    """proto3 JSON renders 64-bit integers as strings; operators' scripts want numbers."""
    for k in keys:
        if k in doc:
            doc[k] = int(doc[k])


def _study_dict(st: node_pb2.StudySummary) -> dict[str, Any]:
    """The CONTRACT's fields, built directly: MessageToDict costs ~30 us a study."""
    return {"study_uid": st.study_uid, "patient_id": st.patient_id,
            "study_date": st.study_date, "modalities": list(st.modalities),
            "instances": st.instances, "bytes": st.bytes, "safe_copies": st.safe_copies,
            "expires": st.expires or None}


def _ls_request(args: argparse.Namespace, after: str) -> node_pb2.ListStudiesRequest:
    return node_pb2.ListStudiesRequest(
        local=args.local, limit=args.limit, after=after, patient_id=args.patient,
        since=args.since or "", until=args.until or "", modality=args.modality,
        unsafe=args.unsafe, expired=args.expired)


def cmd_ls(args: argparse.Namespace) -> int:
    if args.since and args.until and args.since > args.until:
        raise Usage(f"--since {args.since} is after --until {args.until}")
    studies: list[dict[str, Any]] = []
    after = args.after or ""
    with _channel(args) as ch:
        stub = node_pb2_grpc.NodeApiStub(ch)
        while True:  # one page, or every page with --all
            try:
                reply = stub.ListStudies(_ls_request(args, after))
            except grpc.RpcError as exc:
                raise _rpc_error(exc, args.node) from exc
            studies.extend(_study_dict(st) for st in reply.studies)
            after = reply.next
            if not (args.all and after):
                break

    def human() -> None:
        from pacsmesh import screens

        if not studies:
            print("no studies" if not after else "no matching studies in this page")
        else:
            screens.show(screens.studies_table(studies, None))
        if after:
            print(f"more: repeat with --after {after} for the next page")

    if args.json:
        sys.stdout.write(_ls_json(studies, after or None))
    else:
        human()
    return 0


def _ls_json(studies: list[dict[str, Any]], next_: str | None) -> str:
    """One study a line: readable, and fast (json's indent= runs in pure Python,
    ~50 us a study)."""
    rows = ",\n".join(f"    {json.dumps(d)}" for d in studies)
    body = f"[\n{rows}\n  ]" if rows else "[]"
    return f'{{\n  "studies": {body},\n  "next": {json.dumps(next_)}\n}}\n'


def cmd_retention(args: argparse.Namespace) -> int:
    request = node_pb2.RetentionRequest(study_uid=args.study_uid)
    return _retention_reply(args, _call(args, lambda s: s.Retention(request)))


def cmd_hold(args: argparse.Namespace) -> int:
    request = node_pb2.HoldRequest(study_uid=args.study_uid, reason=args.reason)
    return _retention_reply(args, _call(args, lambda s: s.Hold(request)))


def cmd_release(args: argparse.Namespace) -> int:
    request = node_pb2.HoldRequest(study_uid=args.study_uid, reason=args.reason)
    return _retention_reply(args, _call(args, lambda s: s.Release(request)))


def cmd_delete(args: argparse.Namespace) -> int:
    request = node_pb2.HoldRequest(study_uid=args.study_uid, reason=args.reason)
    return _retention_reply(args, _call(args, lambda s: s.Delete(request)))


def _retention_reply(args: argparse.Namespace, reply: node_pb2.RetentionReply) -> int:
    doc: dict[str, Any] = {"study_uid": reply.study_uid, "expires": reply.expires or None,
           "rule": reply.rule, "held": reply.held, "state": reply.state,
           "deletable_on": reply.deletable_on or None, "delete_expired": reply.delete_expired,
           "delete_granted": reply.delete_granted, "node": reply.node,
           "holds": [{"id": h.id.hex(), "reason": h.reason, "who": h.who, "node": h.node,
                      "at": _iso_ms(h.at_ms)} for h in reply.holds]}

    def human() -> None:
        print(f"study {doc['study_uid']}: {doc['state']}; expires "
              f"{doc['expires'] or 'never automatically'} ({doc['rule'] or 'no record here'})")
        if doc["deletable_on"]:
            print(f"  deletable from {doc['deletable_on']} "
                  + ("(the policy deletes it then)" if doc["delete_expired"] else
                     "(deleted only if an operator asks: [retention] delete_expired is off)"))
        for h in doc["holds"]:
            print(f"  LEGAL HOLD since {h['at']} by {h['who']} at {h['node']}: {h['reason']}")
        if doc["delete_granted"]:
            print("  an operator asked for its deletion (pacsmesh delete)")

    _emit(args, doc, human)
    return 0


def _iso_ms(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def cmd_locate(args: argparse.Namespace) -> int:
    def ask(stub: node_pb2_grpc.NodeApiStub) -> tuple[Any, Any]:
        located = stub.Locate(node_pb2.LocateRequest(study_uid=args.study_uid))
        # where the holders are, for the distances between them (not in --json's answer)
        return located, None if args.json else stub.Status(node_pb2.StatusRequest())

    reply, status = _call(args, ask)
    doc = _to_dict(reply)
    _ints(doc, "instances", "safe_copies", "required_copies")
    for h in doc["holders"]:
        _ints(h, "instances")

    def human() -> None:
        from pacsmesh import screens

        where = {n.id: (n.lat, n.lon) for n in status.nodes}
        screens.show(screens.locate_screen(doc, where, status.min_distance_miles))

    _emit(args, doc, human)
    return 0


def _status_doc(reply: node_pb2.StatusReply) -> dict[str, Any]:
    doc = _to_dict(reply)
    _ints(doc, "copies", "studies", "instances", "safe_studies", "unsafe_studies",
          "stored_bytes", "chunk_bytes")
    for d in doc.get("last_drill", []):
        _ints(d, "instances", "bytes")
    for n in doc["nodes"]:
        _ints(n, "used_bytes", "free_bytes", "capacity_bytes", "backlog_instances",
              "backlog_bytes")
    for link in doc.get("links", []):
        _ints(link, "sent_bytes", "received_bytes")
    _ints(doc.get("transfer", {}), "sent_fresh_bytes", "sent_repair_bytes",
          "sent_rebalance_bytes")
    return doc


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None:
        return _watch_status(args)
    reply = _call(args, lambda s: s.Status(node_pb2.StatusRequest()))
    doc = _status_doc(reply)

    def human() -> None:
        from pacsmesh import screens  # rich: only when a person reads the answer

        screens.show(screens.status_screen(reply, doc))

    _emit(args, doc, human)
    return 0


def _watch_status(args: argparse.Namespace) -> int:
    """The status screen, refreshed in place every --watch seconds until Ctrl-C. A node
    that stops answering is shown as such, and watched until it answers again."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from pacsmesh import screens

    if args.json:
        raise Usage("--watch refreshes a screen; for scripts, call status --json in a loop")
    out = screens.console()
    with _channel(args) as ch, Live(Text("asking " + args.node), console=out,
                                    auto_refresh=False) as live:
        stub = node_pb2_grpc.NodeApiStub(ch)
        try:
            while True:
                stamp = time.strftime("%H:%M:%S")
                try:
                    reply = stub.Status(node_pb2.StatusRequest(), timeout=10)
                    screen: Any = screens.status_screen(reply, _status_doc(reply))
                except grpc.RpcError as exc:
                    screen = Text(f"HEALTH_UNKNOWN: {_rpc_error(exc, args.node)}",
                                  style="bold red")
                live.update(Group(
                    screen, Text(f"{stamp}, every {args.watch:g} s; Ctrl-C to stop",
                                 style="dim")), refresh=True)
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _follow_pass(args: argparse.Namespace, what: str, reply: Any, ask: Callable[[], Any],
                 done_of: Callable[[Any], tuple[float, float]], unit: str) -> Any:
    """After `--now` at a terminal: a bar for the pass until it ends (Ctrl-C stops
    watching; the pass goes on). `reply`: the answer to `--now`. Returns the last."""
    requested = time.monotonic()
    seen_running = False
    with meter(what, None, args.json, unit=unit) as bar:
        try:
            while True:
                reply = ask()
                if reply.running:
                    seen_running = True
                    done, total = done_of(reply)
                    bar.total(total)
                    bar.set(done)
                ended = 0 <= reply.last_pass_completed_age_s < time.monotonic() - requested
                if not reply.running and (seen_running or ended):
                    return reply
                time.sleep(0.5)
        except KeyboardInterrupt:
            print(f"stopped watching; the {what} pass goes on", file=sys.stderr)
            return reply


def cmd_gc(args: argparse.Namespace) -> int:
    reply = _call(args, lambda s: s.Gc(node_pb2.GcRequest(now=args.now)))
    if args.now and watching(args.json):
        reply = _follow_pass(
            args, "gc", reply, lambda: _call(args, lambda s: s.Gc(node_pb2.GcRequest())),
            lambda r: (r.pass_packs_done, r.pass_packs_total), "packs")
    doc = _to_dict(reply)
    _ints(doc, "reclaimable_bytes", "reclaimed_bytes", "dead_bytes", "loose_chunks",
          "loose_bytes", "pack_bytes", "pass_bytes_moved", "chunks_reclaimed",
          "studies_deleted")

    def human() -> None:
        last = doc["last_pass_completed_age_s"]
        print(f"space on {doc['node']}: {human_bytes(doc['pack_bytes'])} in "
              f"{doc['packs']} packs; {human_bytes(doc['reclaimable_bytes'])} reclaimable "
              f"({human_bytes(doc['dead_bytes'])} dead in packs, "
              f"{human_bytes(doc['loose_bytes'])} in {doc['loose_chunks']} unreferenced "
              f"chunks, freed after {doc['loose_grace_s'] / 3600:g} h)")
        if doc["running"]:
            print(f"  pass running: {doc['pass_packs_done']} of {doc['pass_packs_total']} "
                  f"packs compacted, {human_bytes(doc['pass_bytes_moved'])} moved")
        else:
            print(f"  idle; last pass {'never' if last < 0 else f'{last / 3600:.1f} h ago'}")
        print(f"  freed {human_bytes(doc['reclaimed_bytes'])} since creation "
              f"({doc['packs_compacted']} packs compacted, {doc['chunks_reclaimed']} chunks "
              f"reclaimed); rate <= {doc['rate_mb_s']:g} MB/s, a pass every "
              f"{doc['interval_s'] / 3600:g} h")
        if args.now:
            print("  a pass was requested")

    _emit(args, doc, human)
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    reply = _call(args, lambda s: s.Scrub(node_pb2.ScrubRequest(now=args.now)))
    if args.now and watching(args.json):
        reply = _follow_pass(
            args, "scrub", reply, lambda: _call(args, lambda s: s.Scrub(node_pb2.ScrubRequest())),
            lambda r: (r.pass_chunks, r.total_chunks), "chunks")
    doc = _to_dict(reply)
    _ints(doc, "pass_chunks", "total_chunks", "chunks_verified", "bytes_verified",
          "corrupt_found", "repaired")

    def human() -> None:
        last = doc["last_pass_completed_age_s"]
        print(f"scrubber on {doc['node']}: "
              + (f"pass running, {doc['pass_chunks']} of {doc['total_chunks']} chunks verified"
                 if doc["running"] else "idle")
              + f"; last full pass {'never' if last < 0 else f'{last / 3600:.1f} h ago'}"
              + (" (OVERDUE)" if doc["overdue"] else ""))
        print(f"  verified {doc['chunks_verified']} chunks ({doc['bytes_verified'] / 1e9:.2f} GB)"
              f" since creation; corrupt found {doc['corrupt_found']}, repaired "
              f"{doc['repaired']}; rate <= {doc['rate_mb_s']:g} MB/s, a pass every "
              f"{doc['interval_s'] / 86400:g} days")
        for name in doc["unrepairable"]:
            print(f"  UNREPAIRABLE: {name}")
        if args.now:
            print("  a pass was requested")

    _emit(args, doc, human)
    return 1 if doc["unrepairable"] else 0


def cmd_drill(args: argparse.Namespace) -> int:
    if watching(args.json) and args.count > 1:
        # one study a call, so the bar moves (the node picks each at random)
        found: list[node_pb2.DrillResult] = []
        with meter("drill", args.count, args.json, unit="studies") as bar:
            for _ in range(args.count):
                found += _call(args, lambda s: s.Drill(node_pb2.DrillRequest(count=1))).results
                bar.advance()
    else:
        found = list(_call(args, lambda s: s.Drill(
            node_pb2.DrillRequest(count=args.count))).results)
    results = []
    for r in found:
        d = _to_dict(r)
        _ints(d, "instances", "bytes")
        results.append(d)

    def human() -> None:
        for d in results:
            if d["ok"]:
                print(f"OK    {d['study_uid']} from {d['source_node']} ({d['source_site']}): "
                      f"{d['instances']} instances, {d['bytes'] / 1e6:.1f} MB in "
                      f"{d['seconds']:.2f} s ({d['mb_s']:.0f} MB/s), every byte verified")
            else:
                print(f"FAIL  {d['study_uid'] or '-'}: {d['error']}")

    _emit(args, {"results": results}, human)
    return 0 if results and all(d["ok"] for d in results) else 1


def cmd_audit(args: argparse.Namespace) -> int:
    since = time.time() - args.since if args.since else 0.0
    events: list[dict[str, Any]] = []
    after = ""
    while True:  # pages of at most AUDIT_PAGE events, until --limit
        request = node_pb2.AuditRequest(since_s=since, study_uid=args.study or "",
                                        limit=min(AUDIT_PAGE, args.limit - len(events)),
                                        after=after)
        reply = _call(args, functools.partial(_audit_page, request))
        for e in reply.events:
            events.append({"time": e.time, "who": e.who, "role": e.role, "address": e.address,
                           "action": e.action, "study_uid": e.study_uid,
                           "instances": e.instances, "outcome": e.outcome,
                           "detail": e.detail})
        after = reply.next
        if not after or len(events) >= args.limit:
            break

    def human() -> None:
        for e in events:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
            what = f"{e['study_uid']} ({e['instances']} inst)" if e["study_uid"] else ""
            print(f"{when}  {e['outcome']:<11} {e['action']:<10} {e['who']:<24} "
                  f"{e['address']:<22} {what} {e['detail']}".rstrip())
        if after:
            print(f"(more: raise --limit above {args.limit})")

    _emit(args, {"events": events, "more": bool(after)}, human)
    return 0


def _audit_page(request: node_pb2.AuditRequest, stub: node_pb2_grpc.NodeApiStub
                ) -> node_pb2.AuditReply:
    reply: node_pb2.AuditReply = stub.Audit(request)
    return reply


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    number, unit = text[:-1], text[-1:]
    if unit.isdigit():
        number, unit = text, "s"
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration such as 90s, 30m, 12h, 7d or 2w") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def cmd_completion(args: argparse.Namespace) -> int:
    """Generated from the parser itself (shtab), so it cannot drift from the commands."""
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pacsmesh.demo import run_demo

    code: int = run_demo(args)
    return code


# ---- parser ---------------------------------------------------------------------------


def _date(text: str) -> str:
    from pacsmesh.node.listing import valid_date

    if not valid_date(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYYMMDD")
    return text


def _study_uid(text: str) -> str:
    from pacsmesh.node.uids import uid_problem

    if problem := uid_problem(text):
        raise argparse.ArgumentTypeError(f"study UID {problem}")
    return text


def _page_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of studies >= 1")
    return min(n, LS_LIMIT_MAX)


def _client(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
            help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--node", default=os.environ.get("PACSMESH_NODE", DEFAULT_NODE),
                   help="HOST:PORT of the node to ask (default $PACSMESH_NODE or "
                        f"{DEFAULT_NODE})")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--ca", default=os.environ.get("PACSMESH_CA", ""), metavar="PEM",
                   help="the cluster CA certificate (default $PACSMESH_CA)")
    p.add_argument("--cert", default=os.environ.get("PACSMESH_CERT", ""), metavar="PEM",
                   help="your certificate, from `pacsmesh ca issue` (default $PACSMESH_CERT)")
    p.add_argument("--key", default=os.environ.get("PACSMESH_KEY", ""), metavar="PEM",
                   help="your private key (default $PACSMESH_KEY)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an unexpected error")
    return p


def cmd_ca(args: argparse.Namespace) -> int:
    from pacsmesh.node import pki
    directory = Path(args.dir)
    try:
        if args.ca_command == "init":
            cert = pki.init_ca(directory)
            doc: dict[str, Any] = {"ca_cert": str(cert), "ca_key": str(directory / "ca.key")}
            lines = [f"created the cluster CA: {cert} (key {directory / 'ca.key'}, mode 0600;",
                     "keep the key offline: whoever holds it can admit anyone)"]
        elif args.ca_command == "issue":
            cert, key = pki.issue(directory, args.name, args.role, args.host, args.days,
                                  args.force)
            ident = pki.identity_of_pem(cert.read_bytes())
            assert ident is not None
            doc = {"name": args.name, "role": args.role, "cert": str(cert), "key": str(key),
                   "serial": f"{ident.serial:x}"}
            lines = [f"issued {args.role} certificate {cert} (key {key}), serial "
                     f"{ident.serial:x}"]
        else:
            serial = pki.revoke(directory, args.name)
            doc = {"revoked_serial": f"{serial:x}", "crl": str(pki.crl_path(directory))}
            lines = [f"revoked serial {serial:x}; nodes whose [tls] crl is "
                     f"{pki.crl_path(directory)} refuse it on its next call"]
    except pki.PkiError as exc:
        raise Failed(str(exc)) from exc
    _emit(args, doc, lambda: print("\n".join(lines)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsmesh", description="Peer-to-peer DICOM archive: N verified copies at "
                                     "sites at least D miles apart.",
        epilog="examples: pacsmesh demo\n"
               "          pacsmesh status --node boston.example:7400\n"
               "          pacsmesh COMMAND --help   (each command has an example)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (or PACSMESH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("node", help="run a node in the foreground")
    p.epilog = ("example: pacsmesh node --config /etc/pacsmesh/node.toml\n"
                "         pacsmesh node --check-config /etc/pacsmesh/node.toml")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--check-config", metavar="FILE",
                   help="validate FILE (and the files it names) without starting; exit 2 if bad")
    p.set_defaults(fn=cmd_node)

    p = _client(sub, "health", "exit 0 when the node's gRPC health service says SERVING")
    p.epilog = "example: pacsmesh health --node 127.0.0.1:7400   (a container healthcheck)"
    p.add_argument("--service", default="", metavar="NAME",
                   help="a gRPC service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="give up after this long (default 5)")
    p.set_defaults(fn=cmd_health)

    p = _client(sub, "put", "store DICOM files or folders (recursively)")
    p.epilog = ("example: pacsmesh put /media/cdrom/DICOM --wait-safe\n"
                "         (exit 0 only when every file is stored and, with --wait-safe, "
                "every study safe)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--wait-safe", nargs="?", type=float, const=WAIT_SAFE_DEFAULT_S,
                   default=None, metavar="SECONDS",
                   help="also wait until the copies are safe (default 600 s)")
    p.set_defaults(fn=cmd_put)

    p = _client(sub, "get", "restore a study, byte-identical and verified")
    p.epilog = "example: pacsmesh get 1.2.840.113619.2.55.3 --out /srv/restore"
    p.add_argument("study_uid")
    p.add_argument("--out", required=True, help="folder to restore into")
    p.set_defaults(fn=cmd_get)

    p = _client(sub, "ls", "list studies, a page at a time (in study UID order; with "
                           "--since/--until and no --patient, by study date)")
    p.epilog = ("example: pacsmesh ls --since 20260101 --modality MR\n"
                "         pacsmesh ls --unsafe --all --json   (every study short of copies)")
    p.add_argument("--local", action="store_true", help="only what this node holds, verified")
    p.add_argument("--limit", type=_page_size, default=LS_LIMIT_DEFAULT, metavar="N",
                   help=f"studies per page (default {LS_LIMIT_DEFAULT}, at most "
                        f"{LS_LIMIT_MAX})")
    p.add_argument("--after", type=_study_uid, default=None, metavar="STUDY_UID",
                   help="continue after this study (the previous page's next)")
    p.add_argument("--patient", default="", metavar="ID", help="only this Patient ID")
    p.add_argument("--since", type=_date, default=None, metavar="YYYYMMDD",
                   help="study date on or after")
    p.add_argument("--until", type=_date, default=None, metavar="YYYYMMDD",
                   help="study date on or before")
    p.add_argument("--modality", default="", metavar="M", help="a modality in the study")
    p.add_argument("--unsafe", action="store_true",
                   help="only studies with fewer safe copies than required")
    p.add_argument("--expired", action="store_true",
                   help="only studies past their retention expiry (what could go)")
    p.add_argument("--all", action="store_true",
                   help="follow next to the end: every page in one answer")
    p.set_defaults(fn=cmd_ls)

    p = _client(sub, "retention", "a study's retention: expiry date, the rule that set it, "
                                  "legal holds")
    p.epilog = "example: pacsmesh retention 1.2.840.113619.2.55.3 --json"
    p.add_argument("study_uid", type=_study_uid)
    p.set_defaults(fn=cmd_retention)

    for name, fn, what, example in (
            ("hold", cmd_hold, "place a legal hold: the study is never deleted while held "
                               "(operator role)", "--reason 'litigation 2026-114'"),
            ("release", cmd_release, "end the legal holds on a study (operator role)",
             "--reason 'case closed'"),
            ("delete", cmd_delete, "ask every node to delete a study whose retention expired "
                                   "(operator role; refused, and audited, before)",
             "--reason 'retention expired, board decision 12'")):
        p = _client(sub, name, what)
        p.epilog = f"example: pacsmesh {name} 1.2.840.113619.2.55.3 {example}"
        p.add_argument("study_uid", type=_study_uid)
        p.add_argument("--reason", required=True, metavar="TEXT",
                       help="why: kept in the audit trail and on every node")
        p.set_defaults(fn=fn)

    p = _client(sub, "locate", "where a study's copies are, how far apart, and whether "
                               "it is safe")
    p.epilog = "example: pacsmesh locate 1.2.840.113619.2.55.3"
    p.add_argument("study_uid")
    p.set_defaults(fn=cmd_locate)

    p = _client(sub, "status", "the cluster at a glance: health, sites, studies, alerts")
    p.epilog = "example: pacsmesh status --watch        (refreshes every 2 s; Ctrl-C stops)"
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None,
                   metavar="SECONDS", help="refresh in place every SECONDS (default 2)")
    p.set_defaults(fn=cmd_status)

    p = _client(sub, "scrub", "progress of the scrubber that re-verifies every chunk")
    p.epilog = "example: pacsmesh scrub --now   (at a terminal, follows the pass; Ctrl-C stops " \
               "watching)"
    p.add_argument("--now", action="store_true", help="start a pass now")
    p.set_defaults(fn=cmd_scrub)

    p = _client(sub, "gc", "space reclamation: what can be freed, what was (operator role)")
    p.epilog = "example: pacsmesh gc --now"
    p.add_argument("--now", action="store_true", help="start a pass now")
    p.set_defaults(fn=cmd_gc)

    p = _client(sub, "drill", "restore random studies from other sites and verify every byte")
    p.epilog = "example: pacsmesh drill --count 5   (exit 0 only if every restore verified)"
    p.add_argument("--count", type=int, default=1, help="studies to restore (default 1)")
    p.set_defaults(fn=cmd_drill)

    p = _client(sub, "audit", "who did what: the node's audit trail (operator role)")
    p.epilog = "example: pacsmesh audit --since 24h --study 1.2.840.113619.2.55.3"
    p.add_argument("--since", type=_duration, default=None, metavar="DURATION",
                   help="only events this recent: 90s, 30m, 12h, 7d, 2w")
    p.add_argument("--study", type=_study_uid, default=None, metavar="STUDY_UID",
                   help="only events about this study")
    p.add_argument("--limit", type=int, default=10_000, help="events at most (default 10000)")
    p.set_defaults(fn=cmd_audit)

    p = sub.add_parser("ca", help="the cluster's certificate authority",
                       description="Create the cluster CA, issue and revoke certificates.",
                       epilog="example: pacsmesh ca init --dir pki && pacsmesh ca issue "
                              "alice --role operator --dir pki")
    ca_sub = p.add_subparsers(dest="ca_command", required=True)
    q = ca_sub.add_parser("init", help="create DIR/ca.pem and DIR/ca.key (0600)",
                          epilog="example: pacsmesh ca init --dir /etc/pacsmesh/pki")
    q.add_argument("--dir", required=True)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_ca)
    q = ca_sub.add_parser("issue", help="issue DIR/NAME.pem and DIR/NAME.key",
                          epilog="example: pacsmesh ca issue boston-1 --role node --dir pki "
                                 "--host boston.example --host 10.0.0.5")
    q.add_argument("name", help="a node's id, or a person's or program's name")
    q.add_argument("--role", required=True, choices=["node", "operator", "reader", "modality"])
    q.add_argument("--dir", required=True)
    q.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address the node is reached at (repeat)")
    q.add_argument("--days", type=int, default=825, help="validity (default 825 days)")
    q.add_argument("--force", action="store_true", help="replace an existing NAME.pem")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_ca)
    q = ca_sub.add_parser("revoke", help="add a certificate to DIR/crl.pem",
                          epilog="example: pacsmesh ca revoke boston-1 --dir pki  (then copy "
                                 "crl.pem to every node's [tls] crl path)")
    q.add_argument("name", help="NAME of DIR/NAME.pem, or a hex serial")
    q.add_argument("--dir", required=True)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_ca)

    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print the completion script for bash or zsh.")
    p.epilog = ("example: pacsmesh completion bash > /etc/bash_completion.d/pacsmesh\n"
                "         pacsmesh completion zsh > \"${fpath[1]}/_pacsmesh\"")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(fn=cmd_completion)

    p = sub.add_parser("demo", help="run a local cluster with sample studies")
    p.epilog = "example: pacsmesh demo --keep-running   (then open the status pages it prints)"
    p.add_argument("--dir", default="", help="work folder (default: a new temporary one)")
    p.add_argument("--instances", type=int, default=40, help="instances per sample study")
    p.add_argument("--keep-running", action="store_true",
                   help="keep the cluster up until Ctrl-C after the walkthrough")
    p.set_defaults(fn=cmd_demo)
    _keep_line_breaks(parser)
    return parser


def _keep_line_breaks(parser: argparse.ArgumentParser) -> None:
    """Examples are laid out by hand: every parser prints its epilog as written."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _keep_line_breaks(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("PACSMESH_DEBUG") == "1"
    try:
        code: int = args.fn(args)
        return code
    except Failed as exc:
        print(f"pacsmesh {args.command}: {exc}", file=sys.stderr)
        return 1
    except Usage as exc:
        print(f"pacsmesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:  # a call not wrapped where it is made
        if debug:
            raise
        node = getattr(args, "node", "?")
        print(f"pacsmesh {args.command}: {_rpc_error(exc, node)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or folder of ours: say which, and why
        if debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"pacsmesh {args.command}: cannot use{where}: {exc.strerror or exc} (check "
              "the path, its permissions and the free space)", file=sys.stderr)
        return 1
    except Exception as exc:
        if debug:
            raise
        print(f"pacsmesh {args.command}: unexpected error: {type(exc).__name__}: {exc}\n"
              "  run it again with --debug for the details, and report them with the "
              "command you ran", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
