"""Prometheus metrics scraped from a real node process: the exposition parses, names
follow Prometheus conventions, and the figures move when the node's state does."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.clusterproc import make_study, wait_for
from tests.nodeproc import NodeProc, cli, free_port


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("pacsmesh_") or not family.name.startswith("pacsmesh")
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_a_real_node_is_scraped_and_its_figures_move(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    node = NodeProc(tmp_path, extra={"metrics": {"listen": listen},
                                     "cluster": {"copies": 1}})
    study = make_study(tmp_path / "in", 1, instances=5)
    node.start()
    try:
        before = _scrape(listen)
        assert before["pacsmesh_instances"] == 0 and before["pacsmesh_studies"] == 0
        assert before["pacsmesh_node_state{node=n1,site=Boston,state=alive}"] == 1
        assert "pacsmesh_manifests_committed_total" in before  # counters end in _total
        assert "pacsmesh_scrub_chunks_verified_total" in before
        assert "pacsmesh_gc_reclaimed_bytes_total" in before
        res = cli("put", str(study.folder), "--json", node=node.address)
        assert res.returncode == 0, res.stderr

        def moved() -> dict[str, float] | None:
            after = _scrape(listen)
            ok = (after["pacsmesh_instances"] == 5 and after["pacsmesh_studies"] == 1
                  and after["pacsmesh_safe_studies"] == 1)
            return after if ok else None
        after = wait_for(moved, 20, "the scrape to show the study, safe")
        assert (after["pacsmesh_manifests_committed_total"]
                >= before["pacsmesh_manifests_committed_total"] + 5)
        assert after["pacsmesh_chunk_bytes"] > before["pacsmesh_chunk_bytes"]
        assert after["pacsmesh_node_used_bytes{node=n1}"] > 0
        assert after["pacsmesh_unsafe_studies"] == 0
    finally:
        node.stop()
