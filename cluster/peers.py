"""Channels to peers: one async channel per address for the workers, one blocking
channel per address for API threads (restores reading chunks from peers).

With TLS, a channel to a known member demands that the far end's certificate
names that member's node id (its DNS name; see node/pki.py): an address learned
from gossip cannot make us talk to, and believe, someone else. A seed, whose id
we do not know yet, is checked by its host name like any TLS server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from pacsmesh.node.tls import TlsFiles, channel_credentials
from pacsmesh.proto import peer_pb2_grpc

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

ExpectedId = Callable[[str], str | None]  # address -> the member id gossip puts there


class Peers:
    def __init__(self, tls: TlsFiles | None = None,
                 expected_id: ExpectedId | None = None) -> None:
        self._tls = tls
        self._creds = channel_credentials(tls) if tls is not None else None
        self._expected = expected_id or (lambda _address: None)
        self._async: dict[tuple[str, str | None], peer_pb2_grpc.PeerApiAsyncStub] = {}
        self._async_channels: list[grpc.aio.Channel] = []
        self._sync: dict[tuple[str, str | None], peer_pb2_grpc.PeerApiStub] = {}
        self._sync_channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    @property
    def verifies_identity(self) -> bool:
        """A reply on a channel to a known member comes from that member (TLS)."""
        return self._tls is not None

    def _options(self, name: str | None) -> list[tuple[str, object]]:
        if name is None:
            return list(CHANNEL_OPTIONS)
        return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)]

    def stub(self, address: str) -> peer_pb2_grpc.PeerApiAsyncStub:
        """For the event loop."""
        key = (address, self._expected(address) if self._tls else None)
        stub = self._async.get(key)
        if stub is None:
            if self._creds is not None:
                channel = grpc.aio.secure_channel(address, self._creds, self._options(key[1]))
            else:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._async_channels.append(channel)
            stub = self._async[key] = peer_pb2_grpc.PeerApiStub(channel)
        return stub

    def blocking_stub(self, address: str) -> peer_pb2_grpc.PeerApiStub:
        """For worker threads."""
        key = (address, self._expected(address) if self._tls else None)
        with self._lock:
            stub = self._sync.get(key)
            if stub is None:
                if self._creds is not None:
                    channel = grpc.secure_channel(address, self._creds, self._options(key[1]))
                else:
                    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._sync_channels.append(channel)
                stub = self._sync[key] = peer_pb2_grpc.PeerApiStub(channel)
            return stub

    async def close(self) -> None:
        for channel in self._async_channels:
            await channel.close()
        with self._lock:
            for sync_channel in self._sync_channels:
                sync_channel.close()
