"""Shared by the tests/test_fuzz_*.py files: the settings profile and mutation strategies.

The suite runs a brief fuzz (a few dozen examples per test, the whole set in well
under a minute); `./dev fuzz` sets PACSMESH_FUZZ_EXAMPLES (20,000 by default) and
runs the same tests far longer. No example database: a fuzz run must not write
into the repository, and a failure prints its reproduction blob instead.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES_ENV = "PACSMESH_FUZZ_EXAMPLES"
EXAMPLES_DEFAULT = 60  # per test, before its weight

settings.register_profile(
    "pacsmesh-fuzz",
    max_examples=int(os.environ.get(EXAMPLES_ENV) or EXAMPLES_DEFAULT),
    deadline=None,  # real LMDB, fsync and threads: timing says nothing about a bug here
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)
PROFILE = settings.get_profile("pacsmesh-fuzz")


def fuzz(weight: float = 1.0) -> settings:
    """The profile, with `weight` times its examples: IO-heavy tests run fewer."""
    return settings(PROFILE, max_examples=max(1, round(PROFILE.max_examples * weight)))


# Values at the edges of the wire types: where parsers overflow, wrap or divide.
U32_EDGES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1)
U64_EDGES = (*U32_EDGES, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1)
FLOAT_EDGES = (0.0, -0.0, 1e-308, 5e-324, -1.0, 90.0, -90.0, 180.000001, 1e308, float("inf"),
               float("-inf"), float("nan"))


def u32s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))


def u64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))


def doubles() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats())


def texts(valid: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Wire strings: the valid ones given, empty, huge, control and non-ASCII characters."""
    return st.one_of(
        *([st.sampled_from(list(valid))] if valid else []),
        st.just(""),
        st.text(max_size=80),
        st.text(alphabet="0123456789.", max_size=80),
        st.sampled_from(["\x00", "a\x00b", " ", "\n", "../../etc/passwd", "é" * 200,
                         "\U0010ffff", "1.2.3", "1..2", "." * 64, "9" * 65,
                         "h:1", "h:0", "h:65536", ":80", "[::1]:7400"]),
        st.integers(1, 1 << 20).map(lambda n: "x" * n),  # up to a megabyte
    )


def blobs() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.sampled_from([b"", bytes(32), b"\xff" * 32]),
                     st.integers(0, 1 << 20).map(lambda n: b"\x01" * n))


_EXTREME_WORDS = [struct.pack("<I", v) for v in (0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFE)]


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """One of `seeds`, damaged the ways storage and networks damage bytes: bit flips,
    overwritten bytes and words, truncation, cut-outs, inserted garbage, repeats,
    and splices of two seeds (the head of one, the tail of another)."""
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "word", "truncate", "cut", "insert",
                                   "repeat", "splice"]))
        n = len(data)
        pos = draw(st.integers(0, n)) if n else 0
        if op == "flip" and n:
            data[min(pos, n - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            data[min(pos, n - 1)] = draw(st.integers(0, 255))
        elif op == "word":
            data[pos : pos + 4] = draw(st.sampled_from(_EXTREME_WORDS))
        elif op == "truncate":
            del data[pos:]
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "repeat":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
        elif op == "splice":
            other = draw(st.sampled_from(list(seeds)))
            data[pos:] = other[draw(st.integers(0, len(other))):]
    return bytes(data)


def garbage(seeds: Sequence[bytes], max_size: int = 4096) -> st.SearchStrategy[bytes]:
    """Random bytes or a mutated seed."""
    return st.one_of(st.binary(max_size=max_size), mutated(seeds))
