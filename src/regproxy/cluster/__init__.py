"""Worker processes and replicas that fetch each cold blob from the upstream once between
them: leases in the metadata store (leases.py), and followers that read the owner's fill
from its spool file or through the owner's internal endpoint (peer.py)."""

from __future__ import annotations

from dataclasses import dataclass

from regproxy.cluster.leases import Leases
from regproxy.cluster.peer import PeerClient


@dataclass
class Cluster:
    """This process's part in the cluster: its leases, and a client for peers' endpoints
    (None without ``cluster.secret``: then only fills on this machine are followed)."""

    leases: Leases
    peer: PeerClient | None
