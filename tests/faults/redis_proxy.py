"""A fault-injecting TCP proxy, run as a process of its own.

    python -m tests.faults.redis_proxy LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT CONTROL_PORT

Control port: one line per command, answered "ok <n>":
  pass                 forward normally (and flush what silence held back)
  silent               every open connection goes silent in both directions (no FIN, no RST);
                       data is held, not dropped (TCP would retransmit it), and is delivered
                       on `pass`; connections opened afterwards work normally
  silent_all           like silent, new connections too
  latency MS           delay every chunk by MS milliseconds (each direction)
  reset                reset (RST) every open connection at once
  count                number of open connections
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys


class Link:
    def __init__(self, cr, cw, ur, uw) -> None:
        self.cr, self.cw, self.ur, self.uw = cr, cw, ur, uw
        self.silent = False
        self.resume = asyncio.Event()
        self.resume.set()
        self.tasks: list[asyncio.Task] = []


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.links: set[Link] = set()
        self.latency = 0.0
        self.silent_new = False

    async def client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(self.host, self.port)
        except OSError:
            _rst(cw)
            return
        link = Link(cr, cw, ur, uw)
        if self.silent_new:
            link.silent = True
            link.resume.clear()
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(self.pump(link, cr, uw)),
            asyncio.create_task(self.pump(link, ur, cw)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self.links.discard(link)
        for w in (cw, uw):
            w.close()

    async def pump(self, link: Link, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    await link.resume.wait()
                    if w.can_write_eof():
                        w.write_eof()
                    return
                if self.latency:
                    await asyncio.sleep(self.latency)
                await link.resume.wait()
                w.write(data)
                await w.drain()
        except (OSError, asyncio.CancelledError):
            for t in link.tasks:
                t.cancel()

    def silence(self, new_too: bool) -> None:
        self.silent_new = new_too
        for link in self.links:
            link.silent = True
            link.resume.clear()

    def heal(self) -> None:
        self.silent_new = False
        for link in self.links:
            link.silent = False
            link.resume.set()

    def reset(self) -> int:
        n = 0
        for link in list(self.links):
            n += 1
            _rst(link.cw)
            _rst(link.uw)
            for t in link.tasks:
                t.cancel()
        self.links.clear()
        return n

    async def control(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            words = line.decode().split()
            n = len(self.links)
            if words[0] == "pass":
                self.latency = 0.0
                self.heal()
            elif words[0] == "silent":
                self.silence(False)
            elif words[0] == "silent_all":
                self.silence(True)
            elif words[0] == "latency":
                self.latency = float(words[1]) / 1000
            elif words[0] == "reset":
                n = self.reset()
            w.write(f"ok {n}\n".encode())
            await w.drain()
        w.close()


def _rst(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


async def main() -> None:
    listen, host, port, control = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    proxy = Proxy(host, port)
    s1 = await asyncio.start_server(proxy.client, "127.0.0.1", int(listen))
    s2 = await asyncio.start_server(proxy.control, "127.0.0.1", int(control))
    print("ready", flush=True)
    async with s1, s2:
        await asyncio.gather(s1.serve_forever(), s2.serve_forever())


if __name__ == "__main__":
    asyncio.run(main())
