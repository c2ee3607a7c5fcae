"""`pacsmesh ls` against a real node process holding 25,000 studies: pages, filters
and usage errors, each answer checked against one computed from what was stored.

The node runs with copies = 1 so that "unsafe" means something on one node: a
study is safe when this node holds all of it. Every ninth study is known from
its manifest only (not held here): unsafe, and not --local.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.catalogfill import Synth, filled_data_dir, synth_studies
from tests.nodeproc import NodeProc, cli, cli_json

STUDIES = 25_000


@pytest.fixture(scope="module")
def studies() -> list[Synth]:
    return synth_studies(STUDIES, seed=2, patients=1500, not_held_every=9)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, studies: list[Synth]) -> Iterator[NodeProc]:
    n = NodeProc(tmp_path_factory.mktemp("ls"), extra={"cluster": {"copies": 1}})
    filled_data_dir(n.data_dir, studies)
    n.start()
    try:
        yield n
    finally:
        n.stop()


def uids_of(studies: list[Synth], keep: Callable[[Synth], bool], by_date: bool = False
            ) -> list[str]:
    chosen = sorted((s for s in studies if keep(s)),
                    key=lambda s: (s.study_date, s.study_uid) if by_date else s.study_uid)
    return [s.study_uid for s in chosen]


def ls(node: NodeProc, *args: str) -> dict[str, Any]:
    return cli_json("ls", *args, node=node.address)


def test_pages_walk_every_study_once_in_order(node: NodeProc, studies: list[Synth]) -> None:
    seen: list[str] = []
    after: list[str] = []
    pages = 0
    while True:
        doc = ls(node, "--limit", "1000", *after)
        assert set(doc) == {"studies", "next"}
        assert len(doc["studies"]) == 1000  # 25 full pages
        seen += [d["study_uid"] for d in doc["studies"]]
        pages += 1
        if doc["next"] is None:
            break
        assert doc["next"] == seen[-1]
        after = ["--after", doc["next"]]
    assert pages == 25 and seen == uids_of(studies, lambda s: True)
    first = ls(node, "--limit", "1")["studies"][0]
    want = min(studies, key=lambda s: s.study_uid)
    assert first == {"study_uid": want.study_uid, "patient_id": want.patient_id,
                     "study_date": want.study_date, "modalities": [want.modality],
                     "instances": 1, "bytes": first["bytes"], "safe_copies": int(want.held),
                     "expires": first["expires"]}
    d = want.study_date  # the default policy: 7 years from the study date
    assert first["expires"] in (f"{int(d[:4]) + 7}-{d[4:6]}-{d[6:]}",
                                f"{int(d[:4]) + 7}-03-01")  # (Feb 29 lands on Mar 1)


def test_default_page_and_human_output(node: NodeProc, studies: list[Synth]) -> None:
    doc = ls(node)
    assert len(doc["studies"]) == 1000 and doc["next"] == doc["studies"][-1]["study_uid"]
    res = cli("ls", "--limit", "3", node=node.address)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 5 and lines[0].split() == [
        "study", "patient", "date", "mod", "inst", "size", "safe", "expires"], lines
    assert lines[-1] == f"more: repeat with --after {uids_of(studies, lambda s: True)[2]} " \
                        "for the next page"


def test_filters_match_brute_force(node: NodeProc, studies: list[Synth]) -> None:
    patient = studies[42].patient_id
    cases: list[tuple[list[str], Callable[[Synth], bool], bool]] = [
        (["--patient", patient], lambda s: s.patient_id == patient, False),
        (["--since", "20240601"], lambda s: s.study_date >= "20240601", True),
        (["--until", "20150301"], lambda s: s.study_date <= "20150301", True),
        (["--since", "20180101", "--until", "20180131"],
         lambda s: "20180101" <= s.study_date <= "20180131", True),
        (["--modality", "MG"], lambda s: s.modality == "MG", False),
        (["--unsafe", "--modality", "US"], lambda s: not s.held and s.modality == "US", False),
        (["--local", "--since", "20250101"], lambda s: s.held and s.study_date >= "20250101",
         True),
        (["--patient", patient, "--since", "20200101", "--local"],
         lambda s: s.patient_id == patient and s.study_date >= "20200101" and s.held, False),
    ]
    for args, keep, by_date in cases:
        doc = ls(node, *args, "--all", "--limit", "2000")
        assert doc["next"] is None
        assert [d["study_uid"] for d in doc["studies"]] == uids_of(studies, keep, by_date), args
    unsafe = ls(node, "--unsafe", "--all", "--limit", "10000")["studies"]
    assert [d["study_uid"] for d in unsafe] == uids_of(studies, lambda s: not s.held)
    assert {d["safe_copies"] for d in unsafe} == {0}
    local = ls(node, "--local", "--all", "--limit", "10000")["studies"]
    assert [d["study_uid"] for d in local] == uids_of(studies, lambda s: s.held)
    assert {d["safe_copies"] for d in local} == {1}


def _expires(s: Synth) -> str:
    """The default policy, computed here on its own: 7 years, MG 7 (no by_modality)."""
    y, md = int(s.study_date[:4]) + 7, s.study_date[4:]
    return f"{y}{md}" if md != "0229" else f"{y}0301"


def test_expired_pages_match_brute_force(node: NodeProc, studies: list[Synth]) -> None:
    """Thousands of expired studies (dated 2015-2025, kept 7 years): `ls --expired`
    pages through them in expiry-date order, a page of 1000 at a time, each once."""
    today = time.strftime("%Y%m%d", time.gmtime())
    want = sorted((s for s in studies if _expires(s) <= today),
                  key=lambda s: (_expires(s), s.study_uid))
    assert len(want) > 5 * 1000  # far more than a page
    seen: list[str] = []
    after: list[str] = []
    while True:
        doc = ls(node, "--expired", "--limit", "1000", *after)
        seen += [d["study_uid"] for d in doc["studies"]]
        for d in doc["studies"]:
            assert d["expires"] is not None and d["expires"].replace("-", "") <= today, d
        if doc["next"] is None:
            break
        after = ["--after", doc["next"]]
    assert seen == [s.study_uid for s in want]
    mixed = ls(node, "--expired", "--modality", "MG", "--all")["studies"]
    assert [d["study_uid"] for d in mixed] == [s.study_uid for s in want if s.modality == "MG"]


def test_a_filter_matching_nothing_answers_at_once(node: NodeProc) -> None:
    started = time.monotonic()
    assert ls(node, "--modality", "XA") == {"studies": [], "next": None}
    assert ls(node, "--patient", "NOBODY") == {"studies": [], "next": None}
    assert time.monotonic() - started < 5
    res = cli("ls", "--patient", "NOBODY", node=node.address)
    assert (res.returncode, res.stdout) == (0, "no studies\n")


def test_usage_errors_exit_2(node: NodeProc) -> None:
    for args in (["--since", "2020-01-01"], ["--until", "20200230"], ["--since", "2020"],
                 ["--since", "20200102", "--until", "20200101"], ["--limit", "0"],
                 ["--limit", "x"], ["--after", "../etc"]):
        res = cli("ls", *args, node=node.address)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stdout == "" and "pacsmesh ls" in res.stderr, args
    res = cli("ls", "--since", "20200101", "--after", "1.2.3.999", node=node.address)
    assert res.returncode == 1 and "not in this node's catalog" in res.stderr


def test_local_on_an_empty_node(tmp_path: Path) -> None:
    n = NodeProc(tmp_path / "empty").start()
    try:
        assert ls(n, "--local") == {"studies": [], "next": None}
    finally:
        n.stop()
