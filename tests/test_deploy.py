"""The shipped compose federation's configs stay valid as the config grows (there is
no Docker engine here to run it; the node's own loader is the check)."""

from __future__ import annotations

from pathlib import Path

from pacsmesh.node.config import load

ROOT = Path(__file__).resolve().parent.parent


def test_compose_configs_load_and_every_mounted_config_exists() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    configs = sorted((ROOT / "deploy" / "compose").glob("*.toml"))
    assert len(configs) == 3
    for path in configs:
        cfg = load(path)
        assert cfg.cluster.seeds == ("boston:7400",) and cfg.tls.insecure
        assert f"./deploy/compose/{path.name}:/etc/pacsmesh/node.toml" in compose
