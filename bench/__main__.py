"""`python -m bench [NAME...] [OPTIONS]`: run the benchmarks (all by default).

Without options each named benchmark runs with `--record` (appends to RESULTS.md);
with options (everything from the first `-...` on), those options go to each named
benchmark instead, e.g. `python -m bench wan --rates 100,200 --record`.
"""

from __future__ import annotations

import sys

from bench import (
    antientropy,
    dicom,
    freshness,
    gc,
    ingest,
    limits,
    observability,
    replication,
    scale,
    scrub,
    trust,
    wan,
)

BENCHES = {
    "limits": limits.main,
    "ingest": ingest.main,
    "antientropy": antientropy.main,
    "replication": replication.main,
    "scrub": scrub.main,
    "gc": gc.main,
    "dicom": dicom.main,
    "scale": scale.main,
    "trust": trust.main,
    "wan": wan.main,  # needs root and `ip netns`; says why and skips otherwise
    "freshness": freshness.main,
    "observability": observability.main,
}


def main(argv: list[str]) -> int:
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names = argv[:first_option] or list(BENCHES)
    options = argv[first_option:] or ["--record"]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {unknown}; known: {sorted(BENCHES)}", file=sys.stderr)
        return 2
    code = 0
    for name in names:
        print(f"== {name}", flush=True)
        code |= BENCHES[name](list(options))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
