"""Ports for local servers are taken below the kernel's ephemeral range, never twice."""

from __future__ import annotations

import socket

from services.cli.embedded import _ephemeral_range, free_port


def test_ports_are_below_the_ephemeral_range_bindable_and_never_handed_out_twice() -> None:
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)
    with socket.socket() as server:
        server.bind(("127.0.0.1", ports[0]))
