"""`python -m bench [NAME...]`: run the benchmarks (all by default) and record them."""

from __future__ import annotations

import sys

from bench import antientropy, dicom, ingest, limits, replication, scale, scrub, trust

BENCHES = {
    "limits": limits.main,
    "ingest": ingest.main,
    "antientropy": antientropy.main,
    "replication": replication.main,
    "scrub": scrub.main,
    "dicom": dicom.main,
    "scale": scale.main,
    "trust": trust.main,
}


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {unknown}; known: {sorted(BENCHES)}", file=sys.stderr)
        return 2
    code = 0
    for name in names:
        print(f"== {name}", flush=True)
        code |= BENCHES[name](["--record"])
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
