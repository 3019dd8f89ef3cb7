"""A TCP forwarder between the pooler and PostgreSQL for fault tests: plain forwarding in threads,
plus packets dropped by iptables (a frozen network: nothing is acknowledged, unlike a paused
process whose kernel still acknowledges) and bytes injected into the server's replies."""

from __future__ import annotations

import socket
import subprocess
import threading

from pgdoorman.devcluster import free_port


def iptables_drop(action: str, port: int) -> None:
    """-I (insert) or -D (delete) the rules that drop every packet to and from `port` on lo."""
    for direction in ("--dport", "--sport"):
        rule = ["INPUT", "-i", "lo", "-p", "tcp", direction, str(port), "-j", "DROP"]
        subprocess.run(["iptables", action, *rule], check=True, capture_output=True)


class Forwarder:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port("127.0.0.1")
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.frozen = False
        self._inject = b""  # sent to the pooler before the server's next reply bytes
        self._lock = threading.Lock()
        self.pooler_sides: list[socket.socket] = []  # the pooler's end of each server connection
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.pooler_sides.append(client)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if replies and self._inject:
                    with self._lock:
                        data, self._inject = self._inject + data, b""
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def inject(self, data: bytes) -> None:
        """Put `data` in front of the next reply bytes any server connection sends."""
        with self._lock:
            self._inject = data

    def send_now(self, data: bytes) -> None:
        """Send `data` to the pooler on every server connection at once, as if the servers did."""
        with self._lock:
            for sock in self.pooler_sides:
                try:
                    sock.sendall(data)
                except OSError:
                    pass

    def freeze(self) -> None:
        iptables_drop("-I", self.port)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            iptables_drop("-D", self.port)
            self.frozen = False

    def close(self) -> None:
        self.thaw()
        self.listener.close()
