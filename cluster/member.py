"""The composition root: builds a full cluster member from a config and runs it.

node/ knows nothing of peers; this module is where the cluster's services and
workers are plugged into the single-site daemon's seams.
"""

from __future__ import annotations

import asyncio

from node.config import Config
from node.daemon import NodeDaemon


async def _serve(cfg: Config) -> None:
    daemon = NodeDaemon(cfg)
    try:
        await daemon.serve_until_signalled()
    except BaseException:
        await daemon.stop()
        raise


def run_member(cfg: Config) -> int:
    asyncio.run(_serve(cfg))
    return 0
