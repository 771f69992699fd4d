"""TVM RPC: a tracker, the key its devices registered under, and sessions on those devices.

    tracker = Tracker.parse("127.0.0.1:9190", "sd8gen2")
    count_servers(tracker)                  # devices under the key (TrackerError when none, or no tracker)
    session = request_session(tracker)      # a tvm.rpc.RPCSession on one of them

Both `passes tune --tracker` (measuring candidates) and `passes generate --tracker` (running a generator on
a phone) go through here. TVM RPC has no authentication: keep trackers and servers on loopback or on a
network you trust.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from passes.core.errors import PassesError


class TrackerError(PassesError):
    """The tracker address is malformed, nothing answers at it, or it has no device under the key."""


@dataclass(frozen=True)
class Tracker:
    """A TVM RPC tracker and the device key to ask it for."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str | None) -> Tracker:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TrackerError(f"--tracker must be HOST:PORT (e.g. 127.0.0.1:9190), got {address!r}")
        if not key:
            raise TrackerError("--tracker needs --key: the device key the servers registered with (rpc_server --key)")
        return cls(host, int(port), key)

    def __str__(self) -> str:
        return f"{self.host}:{self.port} (key {self.key!r})"


def count_servers(tracker: Tracker) -> int:
    """Servers registered under the key (free or busy); raises TrackerError when there are none."""
    from tvm import rpc

    try:
        with socket.create_connection((tracker.host, tracker.port), timeout=5):
            pass
        summary = rpc.connect_tracker(tracker.host, tracker.port).summary()
    except (OSError, RuntimeError) as err:
        raise TrackerError(f"no TVM RPC tracker answers at {tracker.host}:{tracker.port} ({err}); start one with "
                           f"`python -m tvm.exec.rpc_tracker --host {tracker.host} --port {tracker.port}`") from err
    queue = summary.get("queue_info", {}).get(tracker.key, {})
    servers = int(queue.get("free", 0)) + int(queue.get("pending", 0))
    listed = sum(1 for info in summary.get("server_info", []) if str(info.get("key", "")) == f"server:{tracker.key}")
    count = max(servers, listed)
    if count == 0:
        raise TrackerError(f"the tracker at {tracker.host}:{tracker.port} has no device under key {tracker.key!r}; "
                           f"register one with `python -m tvm.exec.rpc_server --tracker {tracker.host}:{tracker.port} "
                           f"--key {tracker.key}`")
    return count


def request_session(tracker: Tracker, timeout_s: float = 600.0) -> Any:
    """A session on a device under the tracker's key, held for at most `timeout_s` seconds; waits while the
    devices are busy."""
    from tvm import rpc

    count_servers(tracker)
    try:
        return rpc.connect_tracker(tracker.host, tracker.port).request(tracker.key, priority=1,
                                                                       session_timeout=int(timeout_s))
    except (OSError, RuntimeError) as err:
        raise TrackerError(f"the tracker at {tracker.host}:{tracker.port} gave no session on key {tracker.key!r}: "
                           f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}") from err
