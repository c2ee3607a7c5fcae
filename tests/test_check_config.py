"""`pacsmesh node --check-config FILE` validates a config without starting a node:
exit 0 with a summary, or 2 with what is wrong (a bad key, a missing TLS file)."""

from __future__ import annotations

from pathlib import Path

from tests.nodeproc import NodeProc, cli


def test_a_good_config_is_summarised_and_nothing_starts(tmp_path: Path) -> None:
    node = NodeProc(tmp_path, node_id="checked", extra={"dicom": {"listen": "127.0.0.1:11999"}})
    tmp_path.mkdir(exist_ok=True)
    res = cli("node", "--check-config", str(node.config()))
    assert res.returncode == 0, res.stderr
    assert "config OK: node checked at Boston" in res.stdout, res.stdout
    assert "DICOM on 127.0.0.1:11999" in res.stdout
    assert "3 copies >= 250 miles apart" in res.stdout
    assert not node.data_dir.exists()  # nothing was started or created


def test_a_bad_key_and_a_missing_tls_file_are_named(tmp_path: Path) -> None:
    bad = NodeProc(tmp_path / "a", node_id="a", extra={"cluster": {"copeis": 3}})
    (tmp_path / "a").mkdir(parents=True)
    res = cli("node", "--check-config", str(bad.config()))
    assert res.returncode == 2 and "copeis" in res.stderr, res.stderr

    missing = tmp_path / "pki" / "ca.pem"
    tls = NodeProc(tmp_path / "b", node_id="b", extra={"tls": {
        "ca_cert": str(missing), "cert": str(missing), "key": str(missing)}})
    (tmp_path / "b").mkdir(parents=True)
    res = cli("node", "--check-config", str(tls.config()))
    assert res.returncode == 2, res.stdout
    assert "[tls] ca_cert" in res.stderr and str(missing) in res.stderr, res.stderr


def test_node_without_a_config_says_what_it_needs() -> None:
    res = cli("node")
    assert res.returncode == 2
    assert "--config FILE is required" in res.stderr, res.stderr
