"""The instruments and the gRPC meter on their own: bucket edges, and the code and
time a call is counted with in every shape a call can end (in-process server,
real gRPC, no mocks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pacsmesh.node.rpc_meter import MeterInterceptor
from pacsmesh.node.telemetry import Telemetry, Timings

SERVICE = "test.Meter"


def test_a_bucket_holds_its_bound_and_buckets_are_cumulative() -> None:
    t = Timings("x_seconds", "x", ["k"], buckets=(0.01, 0.1, 1.0))
    for seconds in (0.01, 0.05, 0.1, 5.0):
        t.observe(("a",), seconds)
    (sample_set,) = [t.family()]
    buckets = {s.labels["le"]: s.value for s in sample_set.samples
               if s.name == "x_seconds_bucket"}
    assert buckets == {"0.01": 1, "0.1": 3, "1.0": 3, "+Inf": 4}
    total = next(s.value for s in sample_set.samples if s.name == "x_seconds_sum")
    assert total == pytest.approx(5.16)
    assert t.count(("a",)) == 4 and t.count(("b",)) == 0


def test_ingest_counts_bytes_of_stored_instances_only() -> None:
    t = Telemetry()
    t.ingested("put", "stored", 100)
    t.ingested("put", "duplicate", 100)
    t.ingested("c-store", "rejected", 50)
    assert t.ingest_bytes.value(("put",)) == 100 and t.ingest_bytes.value(("c-store",)) == 0
    assert t.ingest_instances.value(("put", "duplicate")) == 1
    assert t.ingest_instances.value(("c-store", "rejected")) == 1


async def _unary(request: bytes, context: Any) -> bytes:
    kind = request.decode()
    if kind == "abort":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if kind == "raise":
        raise RuntimeError("a bug")
    if kind == "set":
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        return b""
    if kind == "slow":
        await asyncio.sleep(5)
    return b"ok"


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for i in range(1000):
        yield b"%d" % i
        if request == b"slow":
            await asyncio.sleep(0.05)


async def _upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    n = 0
    async for _ in requests:
        n += 1
    return b"%d" % n


async def test_every_ending_of_a_call_is_counted_with_its_code() -> None:
    telemetry = Telemetry()
    server = grpc.aio.server(interceptors=[MeterInterceptor(telemetry)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Upload": grpc.stream_unary_rpc_method_handler(_upload),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary: Any = channel.unary_unary(f"/{SERVICE}/Unary")
            for kind, code in (("ok", None), ("abort", grpc.StatusCode.NOT_FOUND),
                               ("raise", grpc.StatusCode.UNKNOWN),
                               ("set", grpc.StatusCode.FAILED_PRECONDITION)):
                if code is None:
                    assert await unary(kind.encode(), timeout=10) == b"ok"
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await unary(kind.encode(), timeout=10)
                    assert err.value.code() == code
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await unary(b"slow", timeout=0.2)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stream: Any = channel.unary_stream(f"/{SERVICE}/Stream")
            assert len([m async for m in stream(b"fast", timeout=10)]) == 1000
            call = stream(b"slow", timeout=10)
            assert await call.read() == b"0"
            call.cancel()  # the client goes away mid-stream
            upload: Any = channel.stream_unary(f"/{SERVICE}/Upload")

            async def parts() -> AsyncIterator[bytes]:
                for _ in range(3):
                    yield b"x"
            assert await upload(parts(), timeout=10) == b"3"

        def counted(method: str, code: str) -> float:
            return telemetry.grpc_requests.value((SERVICE, method, code))
        # the server sees a cancellation or a deadline after the client does
        for _ in range(100):
            if counted("Stream", "CANCELLED") and counted("Unary", "DEADLINE_EXCEEDED"):
                break
            await asyncio.sleep(0.05)
        for name in ("OK", "NOT_FOUND", "UNKNOWN", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED"):
            assert counted("Unary", name) == 1, name
        assert telemetry.grpc_seconds.count((SERVICE, "Unary")) == 5
        assert counted("Stream", "OK") == 1 and counted("Stream", "CANCELLED") == 1
        assert counted("Upload", "OK") == 1
        # a stream is timed to its end: the slow one ran until it was cancelled
        family = telemetry.grpc_seconds.family()
        fast_bucket = next(s.value for s in family.samples if s.name.endswith("_bucket")
                           and s.labels["method"] == "Stream" and s.labels["le"] == "0.025")
        assert fast_bucket <= 1  # the fast stream at most; the cancelled one took longer
    finally:
        await server.stop(0)
