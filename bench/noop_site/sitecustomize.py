"""Loaded by Python at start when bench.dicom_stages puts this folder on PYTHONPATH:
the node's C-STORE answers Success without storing anything, so the benchmark can
measure the receive path alone. Never on the path of a real node."""

from pacsmesh.node.dicom import store_scp


def _noop(self: object, assoc: object, sop_class: str, sop_instance: str,
          received: object) -> tuple[int, str]:
    return 0x0000, ""


store_scp.StoreScp.store = _noop  # type: ignore[method-assign]
