"""DICOM network services of one node, on pynetdicom.

    server      the Application Entity: contexts, limits, start/stop in its own threads
    listener    the plaintext and TLS listeners: what a connection passes before pynetdicom
    admission   connections not yet associated: deadlines and per-address limits
    trail       what the services record in the node's audit trail
    store_scp   C-STORE: store exactly as received; success only once durable here
    query       C-FIND matching over the catalog (patient, study, series, image level)
    person_name what a PN key matches: case, composition, component groups
    retrieve    C-GET and C-MOVE: send instances as stored, read through the verified
                path (from peers when this node does not hold them)
    convert     lossless transfer-syntax conversion of a copy, for a peer that did
                not accept the stored syntax
    commitment  Storage Commitment (push model): success only once the copies are safe;
                accepted transactions survive restarts
    commit_request   what an N-ACTION may ask, read with bounded cost
    commit_verdict   which referenced instances are safe or failed, and the report
    commit_ledger    accepted transactions in LMDB until their report is delivered
    commit_outbox    decided reports: route, retry with backoff, give up
    commit_delivery  sending N-EVENT-REPORTs on new or existing associations
    archive     the narrow seam to the node: what these services may ask of it

pynetdicom runs every association in its own threads; the handlers here call the
node's thread-safe entry points directly and block until the answer is final.
"""

from pacsmesh.node.dicom.server import DicomServer

__all__ = ["DicomServer"]
