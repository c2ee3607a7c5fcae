"""Trim counts a replica only when it proves it holds the bytes (a fresh challenge
per replica), so a member with a valid certificate cannot talk copies away."""

from __future__ import annotations

from collections.abc import Mapping

from pacsmesh.cluster.messages import StudyHoldingAsk, StudyHoldingGive
from pacsmesh.cluster.safety import Position
from pacsmesh.cluster.trim import Challenge, TrimCase, TrimRound
from pacsmesh.node.hashing import possession_proof

CHUNK = b"the bytes of one chunk" * 100
CASE = TrimCase("1.2.3", instances=2, current_digest=b"d" * 32, all_digest=b"a" * 32,
                mids=(b"m1", b"m2"), origin_here=False)
POSITIONS = {
    "me": Position("me", "Chicago", 41.88, -87.63, True),
    "seattle": Position("seattle", "Seattle", 47.61, -122.33, True),
    "mallory": Position("mallory", "Boston", 42.36, -71.06, True),
}


def challenge(seed: bytes) -> Challenge:
    nonce = seed * 16
    return Challenge(nonce, (b"h" * 32,), (possession_proof(nonce, "me", CHUNK),))


def run(answers: Mapping[str, tuple[bytes, ...]]) -> tuple[bool, TrimRound, list[bytes]]:
    challenges = {"seattle": challenge(b"s"), "mallory": challenge(b"m")}
    machine = TrimRound("me", CASE, ("mallory", "seattle"), POSITIONS, copies=2,
                        min_distance_miles=250.0, challenges=challenges)
    step: tuple[str, StudyHoldingAsk] | bool = machine.start()
    nonces = []
    while not isinstance(step, bool):
        node, ask = step
        assert isinstance(ask, StudyHoldingAsk) and ask.chunks == (b"h" * 32,)
        nonces.append(ask.nonce)
        step = machine.on_reply(StudyHoldingGive(node, 2, b"d" * 32, True, answers[node]))
    return step, machine, nonces


def test_replicas_that_prove_possession_allow_the_trim() -> None:
    good = {r: (possession_proof(c.nonce, "me", CHUNK),)
            for r, c in {"seattle": challenge(b"s"), "mallory": challenge(b"m")}.items()}
    verdict, machine, nonces = run(good)
    assert verdict is True and machine.failed_proofs == []
    assert len(set(nonces)) == 2  # each replica its own nonce: no answer serves twice


def test_a_replica_claiming_copies_it_cannot_prove_blocks_the_trim_and_is_named() -> None:
    for lie in [(), (b"",), (b"x" * 32,), (possession_proof(b"s" * 16, "me", CHUNK),)]:
        answers = {"seattle": (possession_proof(b"s" * 16, "me", CHUNK),), "mallory": lie}
        verdict, machine, _ = run(answers)
        assert verdict is False, lie
        assert machine.failed_proofs == ["mallory"]


def test_an_answer_from_another_node_than_asked_does_not_count() -> None:
    challenges = {"seattle": challenge(b"s"), "mallory": challenge(b"m")}
    machine = TrimRound("me", CASE, ("mallory", "seattle"), POSITIONS, 2, 250.0, challenges)
    machine.start()
    proof = (possession_proof(b"m" * 16, "me", CHUNK),)
    step = machine.on_reply(StudyHoldingGive("seattle", 2, b"d" * 32, True, proof))
    assert not isinstance(step, bool)
    step = machine.on_reply(StudyHoldingGive("seattle", 2, b"d" * 32, True,
                                             (possession_proof(b"s" * 16, "me", CHUNK),)))
    assert step is False and machine.failed_proofs == ["mallory"]


def test_a_relayed_answer_is_bound_to_the_relayer() -> None:
    """mallory passes my challenge to an honest holder; the holder binds its answer to
    mallory (its authenticated caller), so it does not match what I expect."""
    relayed = (possession_proof(b"m" * 16, "mallory", CHUNK),)
    answers = {"seattle": (possession_proof(b"s" * 16, "me", CHUNK),), "mallory": relayed}
    verdict, machine, _ = run(answers)
    assert verdict is False and machine.failed_proofs == ["mallory"]
