"""Two emulated hosts on one machine: a pair of network namespaces joined by a shaped veth link.

``VethPair`` creates two namespaces (``agoqnet<pid>a`` / ``agoqnet<pid>b``) with the two ends of a
veth pair created directly inside them (nothing is added to the machine's own namespace), gives
them the addresses ``10.213.<subnet>.1`` / ``.2`` (/30, reachable only from inside the pair), and
shapes both directions with ``tc``: a token-bucket rate (``tbf``) and optionally a fixed one-way
delay (``netem`` above it). The byte counters of the veth ends tell what really crossed the link.

Leftovers of an earlier run that died (namespaces with the prefix whose creating process is gone)
are removed by ``cleanup_stale``. Every command has a timeout.

    with VethPair() as pair:
        pair.shape(Link(rate_mbit=1000, delay_ms=0.5))
        subprocess.run(pair.exec_argv(0, ["ping", "-c1", pair.addr[1]]))
        print(pair.counters(0))
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

PREFIX = "agoqnet"
"""Name prefix of every namespace this module creates (``<PREFIX><pid><a|b>``)."""

DEVICES = ("agoq0", "agoq1")
"""Names of the veth ends inside namespace a and b."""

CMD_TIMEOUT_S = 15.0
"""Timeout of each ``ip`` / ``tc`` command."""


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed or namespaces are not available here."""


def _run(argv: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run one command with a timeout; raise ``NetnsError`` with its stderr when ``check`` and it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Link:
    """How the veth link is shaped (the same in both directions)."""

    rate_mbit: float | None = None
    """Rate limit in Mbit/s (``None`` or 0: unshaped veth)."""
    delay_ms: float = 0.0
    """Fixed one-way delay added on each end (round trip = 2x)."""

    @property
    def label(self) -> str:
        """Short name, e.g. ``1 Gbit/s`` or ``10 Gbit/s + 0.5 ms``."""
        if not self.rate_mbit:
            rate = "unshaped"
        elif self.rate_mbit >= 1000:
            rate = f"{self.rate_mbit / 1000:g} Gbit/s"
        else:
            rate = f"{self.rate_mbit:g} Mbit/s"
        return rate + (f" + {self.delay_ms:g} ms" if self.delay_ms else "")


def netns_available() -> tuple[bool, str]:
    """Whether ``ip netns`` and ``tc`` work here: creates and deletes a probe namespace."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}probe"
    try:
        _run(["ip", "netns", "add", name])
    except NetnsError as exc:
        return False, f"`ip netns add` is not permitted here ({exc})"
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return True, "ok"
    except NetnsError as exc:
        return False, f"cannot configure a network namespace ({exc})"
    finally:
        _run(["ip", "netns", "del", name], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix><pid>...`` whose creating process no longer runs.

    Processes still inside such a namespace (ranks of a run that was killed) are sent SIGKILL by
    pid first. Namespaces of live runs are left alone. Returns the names removed.
    """
    proc = _run(["ip", "netns", "list"], check=False)
    removed = []
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)(a|b|probe)", name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


class VethPair:
    """Two network namespaces joined by a veth pair; a context manager that removes them on exit."""

    def __init__(self, subnet: int = 0) -> None:
        pid = os.getpid()
        self.ns: tuple[str, str] = (f"{PREFIX}{pid}a", f"{PREFIX}{pid}b")
        self.dev: tuple[str, str] = DEVICES
        self.addr: tuple[str, str] = (f"10.213.{subnet}.1", f"10.213.{subnet}.2")
        self.link = Link()
        self._created = False
        self._anchor: subprocess.Popen | None = None
        """A ``sleep`` inside namespace a: its ``/proc/<pid>/net/dev`` gives a's counters without a subprocess."""

    # --- lifecycle -------------------------------------------------------------------------------

    def create(self) -> VethPair:
        """Create both namespaces, the veth pair inside them, addresses and loopback."""
        cleanup_stale()
        self._created = True
        for ns in self.ns:
            _run(["ip", "netns", "add", ns])
        a, b = self.ns
        _run(["ip", "link", "add", self.dev[0], "netns", a, "type", "veth", "peer", "name", self.dev[1], "netns", b])
        for ns, dev, addr in zip(self.ns, self.dev, self.addr, strict=True):
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self._anchor = subprocess.Popen(self.exec_argv(0, ["sleep", "86400"]), stdin=subprocess.DEVNULL)
        return self

    def destroy(self) -> None:
        """Kill what still runs inside the namespaces (by pid) and delete them (the veth goes with them)."""
        if not self._created:
            return
        if self._anchor is not None:
            self._anchor.kill()
            self._anchor.wait(timeout=10)
            self._anchor = None
        for ns in self.ns:
            for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", ns], check=False)
        self._created = False

    def __enter__(self) -> VethPair:
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # --- shaping and counters ------------------------------------------------------------------

    def shape(self, link: Link) -> None:
        """Replace the qdiscs of both ends by ``link`` (tbf rate, netem delay above it when asked)."""
        for ns, dev in zip(self.ns, self.dev, strict=True):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            parent = ["root"]
            if link.delay_ms:
                netem = ["netem", "delay", f"{link.delay_ms}ms", "limit", "100000"]
                try:
                    _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem])
                except NetnsError as exc:
                    if "unknown" in str(exc):
                        raise NetnsError(f"a fixed delay needs the netem qdisc, not in this kernel: {exc}") from exc
                    raise
                parent = ["parent", "1:1"]
            if link.rate_mbit:
                rate_bytes = link.rate_mbit * 1e6 / 8
                burst = max(int(rate_bytes * 1e-3), 256 * 1024)  # >= 1 ms of traffic and > a 64 KiB GSO packet
                tbf = ["tbf", "rate", f"{link.rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"]
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "handle", "10:", *tbf])
        self.link = link

    def qdiscs(self, side: int) -> str:
        """``tc qdisc show`` of one end (for the record)."""
        return _run(["tc", "-n", self.ns[side], "qdisc", "show", "dev", self.dev[side]]).stdout.strip()

    def counters(self, side: int) -> dict[str, int]:
        """Byte and packet counters of one veth end: ``tx_bytes``, ``rx_bytes``, ``tx_packets``, ``rx_packets``.

        Side 0 is read from ``/proc/<pid>/net/dev`` of a process inside namespace a (cheap enough to
        call after every training step); side 1 with ``ip -s -j link``.
        """
        if side == 0 and self._anchor is not None and self._anchor.poll() is None:
            with open(f"/proc/{self._anchor.pid}/net/dev") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name.strip() == self.dev[0]:
                        v = [int(x) for x in rest.split()]
                        return {"rx_bytes": v[0], "rx_packets": v[1], "tx_bytes": v[8], "tx_packets": v[9]}
        out = _run(["ip", "-n", self.ns[side], "-s", "-j", "link", "show", "dev", self.dev[side]]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {
            "tx_bytes": stats["tx"]["bytes"],
            "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"],
            "rx_packets": stats["rx"]["packets"],
        }

    def exec_argv(self, side: int, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``side`` (0 = a, 1 = b)."""
        return ["ip", "netns", "exec", self.ns[side], *argv]

    # --- measuring the link --------------------------------------------------------------------

    def probe_mbit(self, nbytes: int, port: int = 29400, timeout: float = 60.0) -> float:
        """TCP goodput from a to b in Mbit/s: ``nbytes`` sent from namespace a to a receiver in b."""
        server = subprocess.Popen(
            self.exec_argv(1, [sys.executable, "-c", _PROBE_SERVER, self.addr[1], str(port)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise NetnsError("link probe: receiver did not start")
            client = [sys.executable, "-c", _PROBE_CLIENT, self.addr[1], str(port), str(nbytes)]
            _run(self.exec_argv(0, client), timeout=timeout)
            out, _ = server.communicate(timeout=timeout)
            received, seconds = out.split()
            return int(received) * 8 / float(seconds) / 1e6
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=10)


_PROBE_SERVER = """
import socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
s.settimeout(60)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(60)
buf = bytearray(1 << 20)
n = c.recv_into(buf)
t0, total = time.perf_counter(), 0  # timed from the first chunk's arrival, which is not counted
n = c.recv_into(buf)
while n:
    total += n
    n = c.recv_into(buf)
print(total, time.perf_counter() - t0)
"""

_PROBE_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
chunk, left = bytes(1 << 20), int(sys.argv[3])
while left > 0:
    c.sendall(chunk[: min(left, len(chunk))])
    left -= len(chunk)
c.close()
"""


def loadavg() -> list[float]:
    """``os.getloadavg()`` as a list (1, 5, 15 minutes)."""
    return [round(x, 2) for x in os.getloadavg()]
