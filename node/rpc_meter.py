"""Counts and times every gRPC call the node serves, by service, method and code.

A server interceptor placed before the TLS gate (tls.py), so calls the gate
refuses are counted with the code they got. It wraps the handler the way the gate
does: a unary call is timed to its return, a stream to its last message (the
wrapper is an async generator that passes each message through), which is what
a client waits for.

The code is what the client sees: OK, the code an `abort` or `set_code` gave,
UNKNOWN for an exception, CANCELLED (DEADLINE_EXCEEDED if the deadline passed)
when the client went away first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from pacsmesh.node.telemetry import Telemetry


class MeterInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self._names: dict[str, tuple[str, str]] = {}  # full method -> (service, method)

    def _name(self, full: str) -> tuple[str, str]:
        names = self._names.get(full)
        if names is None:  # only methods a service registered get here: a bounded set
            service, _, method = full.lstrip("/").rpartition("/")
            names = self._names[full] = (service, method)
        return names

    def _done(self, names: tuple[str, str], started: float, code: str) -> None:
        self.telemetry.grpc_seconds.observe(names, time.perf_counter() - started)
        self.telemetry.grpc_requests.add((*names, code))

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED, uncounted
            return None
        names = self._name(details.method)
        done = self._done
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None or handler.stream_unary is not None:
            unary: Any = handler.unary_unary or handler.stream_unary

            async def timed(request: Any, context: Any) -> Any:
                started, code = time.perf_counter(), "OK"
                try:
                    reply = await unary(request, context)
                    code = _set_code(context)
                    return reply
                except BaseException as exc:
                    code = _failed_code(exc, context)
                    raise
                finally:
                    done(names, started, code)
            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(timed, **kw)
            return grpc.stream_unary_rpc_method_handler(timed, **kw)
        inner: Any = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            started, code = time.perf_counter(), "OK"
            try:
                result: Any = inner(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a handler that writes through context.write
                    await result
                code = _set_code(context)
            except BaseException as exc:
                code = _failed_code(exc, context)
                raise
            finally:
                done(names, started, code)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming, **kw)
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)


def _set_code(context: Any) -> str:
    """A handler that returned may still have set a code (`set_code`)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


def _failed_code(exc: BaseException, context: Any) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()  # set by abort (AbortError) or set_code before raising
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
