"""The requests and replies of the replication protocol, as the sans-IO machines
see them: frozen dataclasses, no bytes on a wire. The runtime converts them to
proto/peer.proto messages (cluster/wire.py); the simulation passes them as they
are. Manifests travel opaque to the machines (`M`): exact bytes in the runtime,
small synthetic records in the simulation.

Every reply that could grow with the archive is a page: the asker names where
to continue (`after`) and how much it wants (`limit`), and the answerer caps it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

M = TypeVar("M")

PartDigest: TypeAlias = tuple[bytes, int]  # AdHash digest, element count
StudyDigest: TypeAlias = tuple[str, bytes, int]  # study uid, digest, count
StudyHeld: TypeAlias = tuple[str, int, bytes]  # study uid, held instances, held digest

# ---- anti-entropy: the set of manifests every node knows ---------------------------


@dataclass(frozen=True, slots=True)
class RootAsk:
    """The digest of the whole manifest set: one small answer when nothing differs."""


@dataclass(frozen=True, slots=True)
class RootGive:
    digest: bytes
    count: int


@dataclass(frozen=True, slots=True)
class PartitionDigestsAsk:
    pass


@dataclass(frozen=True, slots=True)
class PartitionDigestsGive:
    parts: tuple[PartDigest, ...]  # index = partition


@dataclass(frozen=True, slots=True)
class StudyDigestsAsk:
    partition: int
    after: str
    limit: int


@dataclass(frozen=True, slots=True)
class StudyDigestsGive:
    studies: tuple[StudyDigest, ...]
    more: bool  # ask again after the last study


@dataclass(frozen=True, slots=True)
class IdsAsk:
    studies: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IdsGive:
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ManifestsAsk:
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ManifestsGive(Generic[M]):
    manifests: tuple[M, ...]
    covered: int  # how many of the asked ids the answer covers (a reply has a byte cap)


@dataclass(frozen=True, slots=True)
class PartitionManifestsAsk:
    """Every manifest of whole studies of a partition, in study order: how a node that
    knows nothing of a partition learns it in a few large pages, not per study."""

    partition: int
    after: str  # study uid
    limit: int  # manifests, at least one whole study


@dataclass(frozen=True, slots=True)
class PartitionManifestsGive(Generic[M]):
    manifests: tuple[M, ...]
    last: str  # the last study given: continue after it
    more: bool


# ---- holdings: which node holds what, verified -------------------------------------


@dataclass(frozen=True, slots=True)
class HeldRootAsk:
    pass


@dataclass(frozen=True, slots=True)
class HeldRootGive:
    digest: bytes  # AdHash of every current version held here
    count: int
    backlog_instances: int  # placed here, not held yet
    backlog_bytes: int
    scrub_started_ms: int  # start of the last complete scrub pass; 0 = none
    backlog_oldest_ms: int = 0  # first received ms of the oldest waiting manifest
    receive_bytes_per_s: float = 0.0  # plain bytes it has been receiving lately
    waiting: str = ""  # why its backlog is not moving, as its senders said


@dataclass(frozen=True, slots=True)
class HeldPartitionsAsk:
    pass


@dataclass(frozen=True, slots=True)
class HeldPartitionsGive:
    parts: tuple[PartDigest, ...]


@dataclass(frozen=True, slots=True)
class HeldStudiesAsk:
    partition: int
    after: str
    limit: int


@dataclass(frozen=True, slots=True)
class HeldStudiesGive:
    studies: tuple[StudyHeld, ...]  # only studies with something held
    last: str  # the last study examined: continue after it
    more: bool


@dataclass(frozen=True, slots=True)
class HeldPush:
    """Our holding of these studies changed: (study, partition, held, digest) each.
    No answer; a lost push is caught up by the next digest comparison."""

    node_id: str
    studies: tuple[tuple[str, int, int, bytes], ...]


@dataclass(frozen=True, slots=True)
class StudyHoldingAsk:
    """What do you hold of this study, right now? (trim asks before it drops a copy)

    With a challenge (a fresh nonce and chunks of the study), the answer must prove
    possession: blake3(nonce || chunk plaintext) for each, which only a node holding
    the bytes can compute. A member with a valid certificate may still lie about what
    it holds; it cannot fake these."""

    study_uid: str
    nonce: bytes = b""
    chunks: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class StudyHoldingGive:
    node_id: str
    held_instances: int
    held_digest: bytes
    replica: bool  # the answerer places the study on itself (it will not trim)
    proofs: tuple[bytes, ...] = ()  # one per challenged chunk; b"" = not held there


Request: TypeAlias = (
    RootAsk | PartitionDigestsAsk | StudyDigestsAsk | IdsAsk | ManifestsAsk
    | PartitionManifestsAsk | HeldRootAsk | HeldPartitionsAsk | HeldStudiesAsk
    | StudyHoldingAsk
)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # dataclass -> its fields, found once


def approx_size(message: object) -> int:
    """Bytes a message takes on the wire, roughly (protobuf is close to this): for the
    simulation's traffic accounting and the benchmark's. Called for every message the
    simulation sends, so the common types are told apart by exact type first."""
    kind = type(message)
    if kind is bytes or kind is str:
        return len(message) + 2  # type: ignore[arg-type]
    if kind is int or kind is float or kind is bool or message is None:
        return 4
    if kind is tuple or kind is list:
        return 2 + sum(map(approx_size, message))  # type: ignore[call-overload]
    names = _FIELD_NAMES.get(kind)
    if names is not None:
        return 2 + sum(approx_size(getattr(message, name)) for name in names)
    if isinstance(message, bytes | str):
        return len(message) + 2
    if isinstance(message, int | float | bool):
        return 4
    if isinstance(message, tuple | list):
        return 2 + sum(approx_size(x) for x in message)
    if dataclasses.is_dataclass(message):
        _FIELD_NAMES[kind] = tuple(f.name for f in dataclasses.fields(message))
        return approx_size(message)
    return 16  # an opaque payload
