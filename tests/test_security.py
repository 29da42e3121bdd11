"""A local run listens on loopback only: Ray's processes, the client actors and Prometheus."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from fedkd.compose import from_dict, prepare
from fedkd.scenario import EngineConfig

TCP_LISTEN = "0A"


def _address(field: str) -> tuple[str, int]:
    """``/proc/net/tcp{,6}`` local address (little-endian hex) as (ip, port)."""
    ip_hex, port_hex = field.split(":")
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(ip_hex, 16)))
    else:
        ip = socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *struct.unpack("<4I", raw)))
        ip = ip.removeprefix("::ffff:") if "." in ip else ip  # IPv4-mapped (gRPC's v6 sockets)
    return ip, int(port_hex, 16)


def listening(pids: Iterable[int]) -> list[tuple[str, str, int]]:
    """``(process name, ip, port)`` of every listening TCP socket the processes hold."""
    sockets: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == TCP_LISTEN:
                sockets[int(cols[9])] = _address(cols[1])
    found = set()
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile (e.g. the descriptor listdir used)
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                found.add((name, *sockets[int(link[8:-1])]))
    return sorted(found)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def test_local_ray_and_actors_listen_on_loopback_only(tmp_path: Path) -> None:
    from fedkd.client import WorldSource
    from fedkd.engine.ray_grid import RayGrid
    from fedkd.engine.simulate import ray_session
    from fedkd.record import PromExporter
    from fedkd.scenario import dump

    scn = from_dict({"name": "sec", "partition": {"name": "iid"},
                     "clients": {"num": 4, "models": [{"arch": "mlp"}]},
                     "data": {"name": "synthetic",
                              "params": {"train_size": 100, "test_size": 20}}})
    world, _ = prepare(scn)
    with ray_session(EngineConfig(), verbose=False):
        grid = RayGrid(world, WorldSource(dump(scn), str(tmp_path)), actors=2)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        exporter = PromExporter(port)
        try:
            socks = listening(process_tree(os.getpid()))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
        finally:
            exporter.close()
            grid.shutdown()
    names = {name for name, _, _ in socks}
    assert {"gcs_server", "raylet"} <= names, socks  # Ray's own servers were seen
    assert ("127.0.0.1", port) in {(ip, p) for _, ip, p in socks}, socks  # Prometheus
    assert len(socks) >= 6, socks  # driver, GCS, raylet (x2), both actors, Prometheus
    exposed = [s for s in socks if not ipaddress.ip_address(s[1]).is_loopback]
    assert exposed == [], f"listening beyond loopback: {exposed}"
