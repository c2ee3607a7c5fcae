"""Channels to peers: one async channel per address for the workers, one blocking
channel per address for API threads (restores reading chunks from peers)."""

from __future__ import annotations

import threading

import grpc

from proto import peer_pb2_grpc

PEER_MESSAGE_MAX = 16 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", PEER_MESSAGE_MAX),
    ("grpc.max_send_message_length", PEER_MESSAGE_MAX),
    # a restarted peer must be reachable again at once, not after backoff
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
RPC_TIMEOUT_S = 10.0  # one unary call; streams set their own
CHUNK_BATCH_BYTES_MAX = 32 << 20  # plain bytes asked for in one FetchChunks


class Peers:
    def __init__(self) -> None:
        self._async: dict[str, peer_pb2_grpc.PeerApiAsyncStub] = {}
        self._async_channels: list[grpc.aio.Channel] = []
        self._sync: dict[str, peer_pb2_grpc.PeerApiStub] = {}
        self._sync_channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def stub(self, address: str) -> peer_pb2_grpc.PeerApiAsyncStub:
        """For the event loop."""
        stub = self._async.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._async_channels.append(channel)
            stub = self._async[address] = peer_pb2_grpc.PeerApiStub(channel)
        return stub

    def blocking_stub(self, address: str) -> peer_pb2_grpc.PeerApiStub:
        """For worker threads."""
        with self._lock:
            stub = self._sync.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._sync_channels.append(channel)
                stub = self._sync[address] = peer_pb2_grpc.PeerApiStub(channel)
            return stub

    async def close(self) -> None:
        for channel in self._async_channels:
            await channel.close()
        with self._lock:
            for sync_channel in self._sync_channels:
                sync_channel.close()
