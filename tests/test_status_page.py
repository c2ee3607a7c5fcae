"""The status page: what an operator reads there.

The renderer is checked without a node (escaping, the health line, the D-mile
marks); then a real three-node cluster loses a node to SIGKILL and a real browser
(Debian's chromium, driven by playwright) reads a survivor's page; then a TLS node
serves it over HTTPS to a reader's certificate and refuses everyone else.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.registry import CollectorRegistry

from pacsmesh.node import pki, statuspage, web
from pacsmesh.proto import node_pb2
from tests.clusterproc import (
    CITIES,
    DEAD_AFTER_S,
    Cluster,
    alert_codes,
    api_status,
    cluster_settings,
    make_study,
    started,
    states,
    wait_for,
)
from tests.nodeproc import NodeProc, cli, free_port

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


# ---- the renderer, without a node ---------------------------------------------------------


def _reply(**overrides: Any) -> node_pb2.StatusReply:
    def node(node_id: str, city: str, state: str = "alive", site: str = "") -> Any:
        lat, lon = CITIES[city]
        return node_pb2.NodeStatus(id=node_id, site=site or city, lat=lat, lon=lon,
                                   state=state, used_bytes=2_000_000, free_bytes=8_000_000,
                                   capacity_bytes=10_000_000)
    reply = node_pb2.StatusReply(
        copies=3, min_distance_miles=250, answered_by="boston",
        studies=10, instances=40, safe_studies=8, unsafe_studies=2, oldest_unsafe_age_s=7200,
        nodes=[node("boston", "Boston"), node("nyc", "New York"),
               node("denver", "Denver", "dead", site=HOSTILE)],
        alerts=[node_pb2.Alert(severity="warning", code="SCRUB_OVERDUE",
                               message="no scrub pass for 8 days: check the scrubber"),
                node_pb2.Alert(severity="critical", code="NODE_DEAD",
                               message=f"node denver ({HOSTILE}) is dead: {HOSTILE}")],
        last_drill=[node_pb2.DrillResult(study_uid="1.2.3.4", source_node="nyc",
                                         source_site="New York", ok=False,
                                         error=HOSTILE, at_s=1000.0)],
        days_until_full=12.0)
    for k, v in overrides.items():
        if isinstance(v, list):
            del getattr(reply, k)[:]
            getattr(reply, k).extend(v)
        else:
            setattr(reply, k, v)
    return reply


class _Text(HTMLParser):
    """The page's text and its elements, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_page_escapes_peer_strings_and_says_what_an_operator_needs() -> None:
    scrub = node_pb2.ScrubStatus(last_pass_completed_age_s=3 * 3600, chunks_verified=1234,
                                 corrupt_found=2, repaired=1, unrepairable=["c1"],
                                 rate_mb_s=50, interval_s=604800)
    page = statuspage.render(statuspage.Figures(_reply(), scrub, now_s=1000.0 + 600))
    parsed = _Text()
    parsed.feed(page)
    # no markup from a peer: no script element, no element with an event handler, and
    # the hostile strings read back as text, intact
    assert not [t for t, _ in parsed.tags if t in ("script", "img")]
    assert not [a for _, a in parsed.tags if any(k.startswith("on") for k in a)]
    text = "".join(parsed.text)
    assert HOSTILE in text and "&lt;script&gt;" in page
    assert "1.2.3.4" not in page  # no study UIDs on the page
    # the health line first: the worst alert's level, its reasons
    assert page.index('id="health"') < page.index('id="alerts"')
    assert "HEALTH_CRITICAL: 1 node dead (denver); scrub overdue" in text
    assert 'class="health crit"' in page
    # studies, scrub, drill, disk
    assert "2 unsafe" in text and "2.0 h" in text
    assert "Last full pass: 3.0 h ago" in text and "1 unrepairable" in text
    assert "10 min ago: FAILED from nyc (New York)" in text
    assert "not growing" not in text and ">12<" in page  # this node's days until full
    # the D-mile rule: Boston-New York (~190 mi) fails it; the others meet it
    assert 'class="pair near"' in page and page.count('class="pair far"') == 2
    assert "190 mi < 250 mi" in text
    rows = [t for t in text.split("\n") if "closer than D" in t]
    assert len(rows) == 1 and "Boston" in rows[0] and "New York" in rows[0]
    # the dead member is marked, on the map and in the table, by a fixed class only
    assert '<tr class="st-dead" data-node="denver">' in page
    assert '<circle class="st-dead"' in page
    # and the JSON says the same, numbers as numbers
    doc = statuspage.as_json(statuspage.Figures(_reply(), scrub, now_s=1600.0))
    assert doc["health"]["level"] == "HEALTH_CRITICAL"
    assert doc["status"]["studies"] == 10 and doc["scrub"]["unrepairable"] == 1
    assert "study_uid" not in doc["status"]["last_drill"][0]
    json.dumps(doc)


def test_a_healthy_federation_reads_ok() -> None:
    reply = _reply(alerts=[], unsafe_studies=0, safe_studies=10, days_until_full=-1.0)
    page = statuspage.render(statuspage.Figures(reply, None, now_s=2000.0))
    assert '<header id="health" class="health ok">HEALTH_OK</header>' in page
    assert "No alerts: nothing to do." in page and "none unsafe" in page
    assert "this node runs no scrubber" in page and "not growing" in page


def test_the_server_is_bounded_and_serves_three_paths() -> None:
    """HANDLERS_MAX slow clients hold every handler: one more is closed at once, and
    the server answers again as soon as they go."""
    figures = statuspage.Figures(_reply(), None, now_s=2000.0)
    server = web.WebServer(f"127.0.0.1:{free_port()}", CollectorRegistry(), lambda: figures)
    address = ("127.0.0.1", server.port)
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(base + "/", timeout=5) as reply:
            assert reply.headers["Content-Security-Policy"].startswith("default-src 'none'")
            assert "HEALTH_CRITICAL" in reply.read().decode()
        with urllib.request.urlopen(base + "/status.json", timeout=5) as reply:
            assert json.loads(reply.read())["status"]["answered_by"] == "boston"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(base + "/nothing", timeout=5)
        with contextlib.ExitStack() as stack:
            slow = [stack.enter_context(socket.create_connection(address, timeout=5))
                    for _ in range(web.HANDLERS_MAX)]
            for sock in slow:
                sock.sendall(b"GET / HTTP/1.1\r\n")  # and never the rest
            time.sleep(0.2)
            with socket.create_connection(address, timeout=5) as extra:
                extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert extra.recv(100) == b""  # closed unanswered

        def served_again() -> bool:
            try:
                with urllib.request.urlopen(base + "/metrics", timeout=5) as reply:
                    return bool(reply.status == 200)
            except (urllib.error.URLError, ConnectionError) as exc:
                raise AssertionError(exc) from exc
        wait_for(served_again, 5, "the server to answer once the slow clients left")
    finally:
        server.close()


# ---- a real browser, a real cluster ---------------------------------------------------------


@contextlib.contextmanager
def _browser() -> Iterator[Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium; ./dev test "
                    "installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install '.[test]')")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_an_operator_sees_a_killed_node_in_a_browser(tmp_path: Path) -> None:
    with _browser() as browser:
        c = Cluster(tmp_path)
        for node_id, city in (("boston", "Boston"), ("chicago", "Chicago"),
                              ("denver", "Denver")):
            c.add(node_id, city).extra["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
        study = make_study(tmp_path / "in", 1, instances=3)
        with started(c):
            c.wait_converged()
            boston, denver = c.by_id("boston"), c.by_id("denver")
            res = cli("put", str(study.folder), "--wait-safe", "30", "--json",
                      node=boston.address)
            assert res.returncode == 0, res.stderr
            denver.kill()

            def judged() -> bool:
                st = api_status(boston.address)
                return (states(st)["denver"] == "dead" and st.unsafe_studies == 1
                        and "NODE_DEAD" in alert_codes(st))
            wait_for(judged, DEAD_AFTER_S + 15, "boston to see denver dead, a study unsafe")

            page = browser.new_page()
            page.goto(f"http://{boston.extra['metrics']['listen']}/")
            health = page.locator("#health").inner_text()
            assert health.startswith("HEALTH_CRITICAL"), health
            assert "1 node dead (denver)" in health
            row = page.locator('#members tr[data-node="denver"]')
            assert row.locator("td.state").inner_text() == "dead"
            assert "Denver" in row.inner_text()
            # an SVG element has text, not inner_text: its labels' tspans run together
            label = page.locator('#map g.site[data-site="Denver"]').text_content() or ""
            assert "denver: dead" in label, label
            dead_alerts = page.locator("#alerts li", has_text="NODE_DEAD")
            assert dead_alerts.count() == 1
            alert = dead_alerts.inner_text()
            assert "CRITICAL" in alert and "denver" in alert and "Denver" in alert
            # every copy was safe before the kill; now one of three is on a dead node
            assert "1 unsafe" in page.locator("#studies").inner_text()
            # the three US sites meet the 250-mile rule pairwise
            assert page.locator("#pairs tr.far").count() == 3
            page.close()


# ---- over HTTPS, with client certificates -----------------------------------------------------


def _fetch(url: str, ca: Path, cert: tuple[Path, Path] | None) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_https_serves_readers_and_refuses_others(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "boston", "node", ["127.0.0.1"])
    for name, role in (("alice", "operator"), ("ct-scanner", "modality")):
        pki.issue(d, name, role)
    for name in ("rory", "rita"):
        pki.issue(d, name, "reader")  # rory: revoked below
    other = tmp_path / "other-ca"  # a reader certificate from another federation's CA
    pki.init_ca(other)
    pki.issue(other, "eve", "reader")
    ca = d / "ca.pem"
    listen = f"127.0.0.1:{free_port()}"
    lat, lon = CITIES["Boston"]
    node = NodeProc(tmp_path, node_id="boston", site="Boston", lat=lat, lon=lon,
                    extra={"cluster": cluster_settings(copies=1),
                           "metrics": {"listen": listen},
                           "tls": {"ca_cert": str(ca), "cert": str(d / "boston.pem"),
                                   "key": str(d / "boston.key"),
                                   "crl": str(pki.crl_path(d))}},
                    tls_client=(ca, d / "rita.pem", d / "rita.key"))
    url = f"https://{listen}/"
    with contextlib.ExitStack() as stack:
        node.start()
        stack.callback(node.stop)
        # a reader's certificate: the page, the figures and /metrics (the server's own
        # certificate checked against the cluster CA, for the address it serves on)
        status, body = _fetch(url, ca, (d / "rita.pem", d / "rita.key"))
        assert status == 200 and 'id="health"' in body and "HEALTH_OK" in body
        status, body = _fetch(url + "status.json", ca, (d / "alice.pem", d / "alice.key"))
        assert status == 200 and json.loads(body)["status"]["answered_by"] == "boston"
        status, body = _fetch(url + "metrics", ca, (d / "rita.pem", d / "rita.key"))
        assert status == 200 and "pacsmesh_studies " in body
        # no certificate, or a modality's: 403 and why
        status, body = _fetch(url, ca, None)
        assert status == 403 and "none was presented" in body
        status, body = _fetch(url + "metrics", ca, (d / "ct-scanner.pem", d / "ct-scanner.key"))
        assert status == 403 and "modality:ct-scanner has the role 'modality'" in body
        # another CA's certificate, or plain HTTP on the HTTPS port: no connection at all
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _fetch(url, ca, (other / "eve.pem", other / "eve.key"))
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{listen}/", timeout=5)
        # a revoked reader is refused on its next request, without a restart (the CRL)
        assert _fetch(url, ca, (d / "rory.pem", d / "rory.key"))[0] == 200
        pki.revoke(d, "rory")

        def refused() -> str | None:
            status, body = _fetch(url, ca, (d / "rory.pem", d / "rory.key"))
            return body if status == 403 else None
        assert "is revoked" in wait_for(refused, 10, "the revoked reader to get 403")

        # and a browser holding the reader's certificate reads the page
        with _browser() as browser:
            context = browser.new_context(
                ignore_https_errors=True,  # the cluster CA is not in chromium's store
                client_certificates=[{"origin": f"https://{listen}",
                                      "certPath": str(d / "rita.pem"),
                                      "keyPath": str(d / "rita.key")}])
            page = context.new_page()
            started_s = time.monotonic()
            page.goto(url)
            assert page.locator("#health").inner_text() == "HEALTH_OK"
            assert page.locator('#members tr[data-node="boston"] td.state').inner_text() \
                == "alive"
            assert time.monotonic() - started_s < 10
            context.close()
