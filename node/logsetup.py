"""The node's log: one line per record, readable text or one JSON object.

Every line names this node and its site (a filter on the handler adds them, so
records from libraries carry them too) and, where the call site passed one, the
study or instance concerned: ``LOGGER.info("...", extra={"study": uid})``.

Text (the default)::

    2026-12-01T11:30:02.123Z INFO boston-1@Boston cluster.gossip: member seattle-1
        (Seattle): alive -> dead
    2026-12-01T11:30:09.551Z DEBUG boston-1@Boston cluster.safetybook: study became
        unsafe: 0 safe copies of 3 [study=1.2.3]

(each one line, wrapped here)

JSON (``[log] format = "json"``), one object per line, even for messages with
newlines; an exception is the string field ``exc``::

    {"ts": "2026-12-01T11:30:02.123Z", "level": "INFO", "node": "boston-1", "site": "Boston",
     "logger": "cluster.gossip", "msg": "member seattle-1 (Seattle): alive -> dead"}

Patient data never goes into a log line: no patient names, IDs or birth dates, no
dataset, query identifier or file name (a file name may be a patient's name), and
no pydicom message that may quote a value. Log UIDs, counts, AE titles and
addresses. pynetdicom logs whole PDUs and datasets at DEBUG, so its loggers (and
pydicom's) stay at WARNING whatever the level; the DICOM libraries' Python warnings,
which quote values, are logged by category and origin only.

At archive scale a line per study would drown the log: state changes that touch
studies (unsafe, safe, repaired, trimmed) are counted in a `Tally` and said at
most once per SUMMARY_INTERVAL_S, with the per-study line at DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
# A state change touching many studies is said at most this often (per kind): an
# operator sees it within seconds, and a million studies make a line, not a million.
SUMMARY_INTERVAL_S = 10.0
# Loggers of libraries that log patient data below WARNING: pynetdicom dumps PDUs and
# datasets (names, IDs, birth dates) at DEBUG and INFO.
QUIET_LOGGERS = ("pynetdicom", "pydicom")
# Loggers that say nothing useful at DEBUG, often (grpc: a line per call).
CHATTY_LOGGERS = ("grpc._cython", "asyncio")
_PREFIX = "pacsmesh."
_FIELDS = ("study", "instance")  # extra={...} keys put on the line


@dataclass
class _Identity:
    node: str = "-"
    site: str = "-"
    fmt: str = "text"


_IDENTITY = _Identity()


def set_identity(node_id: str, site: str) -> None:
    """Who this process is, on every line from now on (the node id is only certain
    once the daemon has read its data dir or certificate)."""
    _IDENTITY.node = node_id or "-"
    _IDENTITY.site = site or "-"


class IdentityFilter(logging.Filter):
    """Puts the node id and site on every record the handler sees, libraries' too."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = _IDENTITY.node
        record.site = _IDENTITY.site
        return True


def _timestamp(created: float) -> str:
    t = datetime.fromtimestamp(created, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{t.microsecond // 1000:03d}Z"


def _logger_name(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _one_line(text: str) -> str:
    """Control characters escaped: a value from a peer cannot forge a line of its own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as exc:  # a bad format string must not lose the record
        return f"{record.msg!r} (unformattable: {type(exc).__name__})"


class TextFormatter(logging.Formatter):
    """`TS LEVEL node@site logger: message [study=... instance=...]`, an exception's
    traceback on the indented lines after it."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_timestamp(record.created)} {record.levelname} "
                f"{getattr(record, 'node', '-')}@{getattr(record, 'site', '-')} "
                f"{_logger_name(record.name)}: {_one_line(_message(record))}")
        tags = [f"{k}={_one_line(str(v))}" for k in _FIELDS if (v := getattr(record, k, None))]
        if tags:
            line += " [" + " ".join(tags) + "]"
        exc = _exception(self, record)
        if exc:
            line += "\n" + "\n".join("    " + x for x in exc.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json.dumps escapes newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created), "level": record.levelname,
            "node": getattr(record, "node", "-"), "site": getattr(record, "site", "-"),
            "logger": _logger_name(record.name), "msg": _message(record)}
        for k in _FIELDS:
            if v := getattr(record, k, None):
                doc[k] = str(v)
        exc = _exception(self, record)
        if exc:
            doc["exc"] = exc
        # ASCII: U+2028 and friends would split the line for some readers
        return json.dumps(doc, ensure_ascii=True, default=str)


def _exception(fmt: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        parts.append(fmt.formatException(record.exc_info))
    if record.stack_info:
        parts.append(fmt.formatStack(record.stack_info))
    return "\n".join(parts)


def _warning_line(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    """Python warnings as log records; the DICOM libraries' without their text, which
    may quote the offending value (a name, an ID, a birth date)."""
    where = filename.rsplit("/site-packages/", 1)[-1]
    log = logging.getLogger("py.warnings")
    if any(lib in where for lib in ("pydicom", "pynetdicom")):
        log.warning("%s at %s:%d (text withheld: it may quote patient data)",
                    category.__name__, where, lineno)
    else:
        log.warning("%s at %s:%d: %s", category.__name__, where, lineno, message)


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc_info: tuple[type[BaseException], BaseException, types.TracebackType | None] | None = (
        (args.exc_type, args.exc_value, args.exc_traceback)
        if args.exc_value is not None else None)
    logging.getLogger("pacsmesh").error("thread %s failed", name, exc_info=exc_info)


def stdout_line(text: str) -> str:
    """A line for stdout (the readiness line) in the log's format: a log shipper that
    reads both streams must find one JSON object per line there too."""
    if _IDENTITY.fmt != "json":
        return text
    record = logging.LogRecord("pacsmesh.node.daemon", logging.INFO, "", 0, text, None, None)
    IdentityFilter().filter(record)
    return JsonFormatter().format(record)


def configure(fmt: str = "text", level: str = "info", stream: IO[str] | None = None) -> None:
    """The root logger of a node process, once (again replaces what the last call set)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    _IDENTITY.fmt = fmt
    root = logging.getLogger()
    for old in list(root.handlers):  # ours or basicConfig's, from before the config was read
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(IdentityFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))
    warnings.showwarning = _warning_line
    threading.excepthook = _thread_excepthook


# ---- state changes over many studies, said once per interval -------------------------------


@dataclass
class Tallied:
    """What a Tally counted since it last spoke."""

    count: int
    first: str  # the first study (or other key) counted, as an example
    items: int = 0  # a second count (e.g. instances of the studies counted)
    by: dict[str, int] = field(default_factory=dict)  # e.g. bytes by source node

    def sources(self, unit: str = "") -> str:
        return ", ".join(f"{k} ({_amount(v, unit)})" for k, v in sorted(
            self.by.items(), key=lambda kv: -kv[1]))


def n_studies(n: int) -> str:
    """'1 study', '1,204 studies'."""
    return f"{n:,} study" if n == 1 else f"{n:,} studies"


def _amount(v: int, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 1e6:.1f} MB"
    return f"{v:,}{' ' + unit if unit else ''}"


class Tally:
    """Counts one kind of event (from any thread) for a line at most once per interval:
    the first at once, the next ones each summing what an interval brought."""

    def __init__(self, interval_s: float = SUMMARY_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._count = self._items = 0
        self._first = ""
        self._by: dict[str, int] = {}
        self._said_at: float | None = None

    def add(self, first: str = "", count: int = 1, items: int = 0) -> None:
        with self._lock:
            if not self._first:
                self._first = first
            self._count += count
            self._items += items

    def add_by(self, key: str, amount: int) -> None:
        with self._lock:
            self._by[key] = self._by.get(key, 0) + amount

    def take(self, now: float) -> Tallied | None:
        """What was counted, if there is some and it is time to say it; then reset."""
        with self._lock:
            if not self._count:
                self._by = {}  # what came with events not counted here: forgotten
                return None
            if self._said_at is not None and now - self._said_at < self.interval_s:
                return None
            got = Tallied(self._count, self._first, self._items, self._by)
            self._count = self._items = 0
            self._first, self._by, self._said_at = "", {}, now
            return got
