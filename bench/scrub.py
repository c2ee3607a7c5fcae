"""Scrub throughput, unthrottled and rate-limited, beside the raw hashing and
decompression speed measured in the same run on the same kind of data.

    python -m bench.scrub [--instances 600] [--passes 3] [--rates 20,5] [--record]

One real `pacsmesh node` process (copies = 1) holds a synthetic CT study of
`--instances` 512x512 16-bit instances (~0.52 MB each, so 600 is ~315 MB), put
through the real CLI. Every figure comes from the node's own scrub status (the
Scrub RPC, i.e. what `pacsmesh scrub --json` prints), polled while a pass
requested with `--now` runs:

- a pass's time is from the pass start to its completion as the node reports them
  (pass_started_age_s while running, last_pass_completed_age_s after), so polling
  latency does not count;
- "verified" MB/s is the bytes_verified delta over that time: plain bytes, hashed;
- "read" MB/s is what the pass read from the packs (record headers and the stored,
  zstd-compressed bytes; after one clean put that is every pack byte): the figure
  `scrub.rate_mb_s` limits.

Unthrottled means rate_mb_s = 1e6; the node is then restarted with each of
`--rates` (the config is read at start). The raw figures are measured in this
process, one thread, best of three, on the study's own files (up to 64 MiB of
them): blake3 and zstd-1 decompression of the chunks exactly as the node cuts and
compresses them (header chunk, then 1 MiB pieces of the pixel data), and, for
reference, bench.limits' figures on one buffer. Hash and decompression in series
are the bound for the scrubber, which verifies on one thread. The packs were just
written, so reads come from the page cache.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import grpc
import zstandard

from bench.common import OUT_DIR, append_results, machine_line, mb_s
from bench.limits import TRIALS, blake3_mb_s, zstd_decompress_mb_s
from pacsmesh.node.chunking import chunk_spans
from pacsmesh.node.dicom_layout import scan
from pacsmesh.proto import node_pb2, node_pb2_grpc
from pacsmesh.sample import StudySpec, study_uid, write_study
from tests.nodeproc import NodeProc, cli_json

UNTHROTTLED_MB_S = 1e6
INTERVAL_S = 100.0  # the scrubber polls for `--now` every interval/100 s (1 s here)
POLL_S = 0.1
RPC_TIMEOUT_S = 10.0
RATE_TOLERANCE = 0.10
RAW_SAMPLE_BYTES = 64 << 20
RAW_TARGET_S = 0.5


def stored_chunks(paths: list[Path], limit_bytes: int) -> list[tuple[bytes, bytes]]:
    """(plain, zstd-1 frame) of each chunk of the first files, cut as the node cuts them."""
    cctx = zstandard.ZstdCompressor(level=1)
    out: list[tuple[bytes, bytes]] = []
    total = 0
    for path in paths:
        data = path.read_bytes()
        with open(path, "rb") as f:
            header_len = scan(f, len(data)).header_len
        for offset, length in chunk_spans(len(data), header_len):
            plain = data[offset : offset + length]
            out.append((plain, cctx.compress(plain)))
        total += len(data)
        if total >= limit_bytes:
            break
    return out


def _best_mb_s(op: Callable[[], None], nbytes: int) -> float:
    op()
    t0 = time.perf_counter()
    op()
    repeats = max(1, int(RAW_TARGET_S / max(time.perf_counter() - t0, 1e-9)))
    best = 0.0
    for _ in range(TRIALS):
        t0 = time.perf_counter()
        for _ in range(repeats):
            op()
        best = max(best, mb_s(nbytes * repeats, time.perf_counter() - t0))
    return best


def chunk_speeds(chunks: list[tuple[bytes, bytes]]) -> tuple[float, float]:
    """MB/s of plain bytes: blake3 of every chunk, zstd decompression of every frame."""
    nbytes = sum(len(p) for p, _ in chunks)
    dctx = zstandard.ZstdDecompressor()

    def hash_all() -> None:
        for plain, _ in chunks:
            blake3.blake3(plain).digest()

    def decompress_all() -> None:
        for plain, frame in chunks:
            dctx.decompress(frame, max_output_size=len(plain))

    return _best_mb_s(hash_all, nbytes), _best_mb_s(decompress_all, nbytes)


def scrub_rpc(address: str, now: bool = False) -> node_pb2.ScrubStatus:
    with grpc.insecure_channel(address) as ch:
        reply: node_pb2.ScrubStatus = node_pb2_grpc.NodeApiStub(ch).Scrub(
            node_pb2.ScrubRequest(now=now), timeout=RPC_TIMEOUT_S)
        return reply


def own_verified_age_s(address: str, node_id: str, uid: str) -> float:
    """Seconds since this node's last complete pass started (its holder entry)."""
    with grpc.insecure_channel(address) as ch:
        reply = node_pb2_grpc.NodeApiStub(ch).Locate(node_pb2.LocateRequest(study_uid=uid),
                                                     timeout=RPC_TIMEOUT_S)
    return float(next(h.verified_age_s for h in reply.holders if h.node == node_id))


@dataclass(frozen=True)
class Pass:
    seconds: float
    chunks: int
    plain_bytes: int
    read_bytes: int

    @property
    def verified_mb_s(self) -> float:
        return mb_s(self.plain_bytes, self.seconds)

    @property
    def read_mb_s(self) -> float:
        return mb_s(self.read_bytes, self.seconds)


def wait_idle(address: str, timeout_s: float) -> node_pb2.ScrubStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        st = scrub_rpc(address)
        if not st.running:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"a scrub pass still running after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def one_pass(node: NodeProc, uid: str, read_bytes: int, timeout_s: float) -> Pass:
    """Request a pass and time it by the node's own clock."""
    before = wait_idle(node.address, timeout_s)
    requested = time.monotonic()
    scrub_rpc(node.address, now=True)
    started: float | None = None
    deadline = requested + timeout_s
    while True:
        t = time.monotonic()
        st = scrub_rpc(node.address)
        if st.running and started is None:
            started = t - st.pass_started_age_s
        if not st.running and 0 <= st.last_pass_completed_age_s < t - requested:
            ended = t - st.last_pass_completed_age_s
            break
        if t > deadline:
            raise TimeoutError(f"no pass completed within {timeout_s:.0f} s: {st}")
        time.sleep(POLL_S)
    if started is None:  # shorter than a poll: the start is in the holder's verified age
        t = time.monotonic()
        started = t - own_verified_age_s(node.address, node.node_id, uid)
    if st.corrupt_found != before.corrupt_found:
        raise RuntimeError(f"the pass found damage: {st}")
    return Pass(seconds=ended - started, chunks=st.pass_chunks,
                plain_bytes=st.bytes_verified - before.bytes_verified, read_bytes=read_bytes)


def restart_with_rate(node: NodeProc, rate_mb_s: float) -> None:
    if node.proc is not None and node.proc.poll() is None:
        node.terminate()
    node.extra["scrub"] = {"rate_mb_s": rate_mb_s, "interval_s": INTERVAL_S}
    node.start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scrub", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=600, help="512x512 CT instances")
    ap.add_argument("--passes", type=int, default=3, help="unthrottled passes (best is kept)")
    ap.add_argument("--rates", default="20,5", help="rate_mb_s settings to check, comma list")
    ap.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scrub-", dir=OUT_DIR))
    node = NodeProc(work / "node", node_id="scrub-bench",
                    extra={"cluster": {"copies": 1}})
    try:
        spec = StudySpec(instances=args.instances, study_index=1, seed=23)
        paths = write_study(work / "study", spec)
        total = sum(p.stat().st_size for p in paths)
        uid = study_uid(spec)
        print(f"study: {len(paths)} instances, {total / 1e6:.0f} MB", flush=True)

        chunks_in_memory = stored_chunks(paths, RAW_SAMPLE_BYTES)
        b3, zd = chunk_speeds(chunks_in_memory)
        serial = 1 / (1 / b3 + 1 / zd)
        whole = b"".join(p for p, _ in chunks_in_memory)
        b3_whole, zd_whole = blake3_mb_s(whole), zstd_decompress_mb_s(whole, level=1)
        del chunks_in_memory, whole
        print(f"raw, per chunk: blake3 {b3:.0f} MB/s, zstd-1 decompress {zd:.0f} MB/s, both in "
              f"series {serial:.0f} MB/s; one buffer: blake3 {b3_whole:.0f}, zstd-1 decompress "
              f"{zd_whole:.0f} MB/s", flush=True)

        restart_with_rate(node, UNTHROTTLED_MB_S)
        put = cli_json("put", str(work / "study"), node=node.address, timeout_s=1800)
        if put["stored"] != len(paths):
            raise RuntimeError(f"put stored {put['stored']} of {len(paths)}")
        status = cli_json("status", node=node.address)
        read_bytes = int(status["chunk_bytes"])
        chunks = int(scrub_rpc(node.address).total_chunks)
        print(f"stored: {chunks} chunks, {read_bytes / 1e6:.0f} MB in packs "
              f"(zstd-1: {total / read_bytes:.2f}x)", flush=True)
        timeout_s = 120 + 3 * read_bytes / 1e6 / min(rates, default=1.0)

        fast: list[Pass] = []
        for i in range(args.passes):
            p = one_pass(node, uid, read_bytes, timeout_s)
            fast.append(p)
            print(f"unthrottled pass {i + 1}: {p.chunks} chunks in {p.seconds:.2f} s, verified "
                  f"{p.verified_mb_s:.0f} MB/s, read {p.read_mb_s:.0f} MB/s", flush=True)
        best = max(fast, key=lambda p: p.verified_mb_s)

        limited: list[tuple[float, Pass]] = []
        for rate in rates:
            restart_with_rate(node, rate)
            p = one_pass(node, uid, read_bytes, timeout_s)
            limited.append((rate, p))
            print(f"rate_mb_s = {rate:g}: {p.seconds:.2f} s, read {p.read_mb_s:.2f} MB/s "
                  f"({(p.read_mb_s / rate - 1) * 100:+.1f} %), verified "
                  f"{p.verified_mb_s:.2f} MB/s", flush=True)

        lines = [
            f"{len(paths)} synthetic CT instances (512x512, 16 bit), {total / 1e6:.0f} MB; "
            f"{chunks} chunks, {read_bytes / 1e6:.0f} MB in packs (zstd-1, "
            f"{total / read_bytes:.2f}x). One node process; pass times from the node's own "
            "scrub status; packs in the page cache. Verified = plain bytes hashed; read = "
            "pack bytes (what `scrub.rate_mb_s` limits).",
            "",
            "| what | MB/s |",
            "|---|---|",
            f"| scrub pass, unthrottled, verified (best of {len(fast)}; "
            f"{best.seconds:.2f} s) | {best.verified_mb_s:.0f} |",
            f"| scrub pass, unthrottled, read from packs | {best.read_mb_s:.0f} |",
            f"| blake3 of the stored chunks, one thread | {b3:.0f} |",
            f"| zstd-1 decompress of the stored chunks, one thread | {zd:.0f} |",
            f"| both in series (one scrub thread's bound) | {serial:.0f} |",
            f"| for reference, bench.limits on one buffer: blake3 | {b3_whole:.0f} |",
            f"| for reference, bench.limits on one buffer: zstd-1 decompress | {zd_whole:.0f} |",
            "",
            f"Unthrottled scrub verifies at {best.verified_mb_s / serial * 100:.0f} % of the "
            "one-thread hash+decompress bound.",
            "",
            "| rate_mb_s | pass | read MB/s | off the setting | verified MB/s | within 10 % |",
            "|---|---|---|---|---|---|",
        ]
        for rate, p in limited:
            off = p.read_mb_s / rate - 1
            ok = "yes" if abs(off) <= RATE_TOLERANCE else "NO"
            lines.append(f"| {rate:g} | {p.seconds:.2f} s | {p.read_mb_s:.2f} | "
                         f"{off * 100:+.1f} % | {p.verified_mb_s:.2f} | {ok} |")
        text = "\n".join(lines)
        print()
        print(machine_line())
        print(text)
        if args.record:
            append_results("Scrub: throughput and rate limit", text)
        return 0 if all(abs(p.read_mb_s / r - 1) <= RATE_TOLERANCE for r, p in limited) else 1
    except BaseException:
        print(node.log(), file=sys.stderr)
        raise
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
