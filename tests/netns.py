"""Multi-node tests on one machine: N network namespaces joined by a bridge, one "node" each.

Each node is a network namespace (``ip netns``) with its own interface ``eth0`` and address
``10.213.0.<i+1>/24``, its own host name ``node<i>`` (a UTS namespace made by ``unshare --uts``) and
an ``/etc/hosts`` naming every node (``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts`` over
``/etc/hosts``). The nodes' veth peers sit on a bridge inside a private hub namespace, so nothing
is reachable from the host's network and nothing of the host's network from a node: traffic
between ranks of different nodes crosses a real TCP/IP path (veth + bridge), and a node's address
differs from every other node's, as on a cluster. ``GLOO_SOCKET_IFNAME=eth0`` makes gloo bind the
node's interface (not ``lo``).

::

    with Cluster(2) as c:
        p0 = c.torchrun(0, nproc=2, argv=[...], log=...)     # --rdzv-backend c10d by default
        p1 = c.torchrun(1, nproc=2, argv=[...], log=...)
        ...
        c.kill_node(1)                                        # every process of node 1

Names are unique per :class:`Cluster` (``ml<pid36><n>...``), and :meth:`Cluster.close` (also run
at interpreter exit and by ``__exit__`` on a failure) kills every process still inside a node and
deletes the namespaces, so a failed test leaves no namespace, interface or hosts file behind.
Namespaces of a dead test process (same prefix, pid gone) are removed when the next Cluster starts.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; :func:`unavailable_reason` says why not.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBNET = "10.213.0"          # private range (RFC 1918); node i is SUBNET.(i+1)
IFNAME = "eth0"              # the node's interface name inside its namespace
PREFIX = "mln"               # every namespace this module makes starts with it
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        n, r = divmod(n, 36)
        s = digits[r] + s
        if n == 0:
            return s


def unavailable_reason() -> Optional[str]:
    """None when namespaces can be made here, else the reason (for ``pytest.skip``)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = f"{PREFIX}probe{_b36(os.getpid())}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        r = _ip("netns", "exec", probe, "true", check=False)
        if r.returncode != 0:
            return f"`ip netns exec` failed: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _remove_stale() -> None:
    """Delete namespaces a killed test process left (our prefix, its pid no longer running)."""
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX) or "x" not in name:
            continue
        try:
            pid = int(name[len(PREFIX):name.index("x")], 36)
        except ValueError:
            continue
        if not psutil.pid_exists(pid):
            _delete_ns(name)


def _ns_pids(name: str) -> list[int]:
    r = _ip("netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _delete_ns(name: str) -> None:
    for _ in range(50):
        pids = _ns_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    _ip("netns", "del", name, check=False)
    shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)


class Cluster:
    """``n`` nodes on a private bridge (see the module docstring).

    Attributes:
        names: the namespaces, node i is ``names[i]``.
        addrs: node i's address (``10.213.0.<i+1>``).
        hosts: node i's host name (``node<i>``).
    """

    def __init__(self, n: int):
        _remove_stale()
        tag = f"{PREFIX}{_b36(os.getpid())}x{next(_counter)}"   # <= 12 chars: room for suffixes
        self.tag, self.n = tag, n
        self.hub = f"{tag}h"
        self.names = [f"{tag}n{i}" for i in range(n)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.hosts = [f"node{i}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{a} {h}\n" for a, h in zip(self.addrs, self.hosts))
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        hub = ("-n", self.hub)
        _ip(*hub, "link", "add", "br0", "type", "bridge")
        _ip(*hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            _ip("netns", "add", name)
            self._made.append(name)
            os.makedirs(os.path.join("/etc/netns", name), exist_ok=True)
            with open(os.path.join("/etc/netns", name, "hosts"), "w") as f:
                f.write(hosts)
            # the pair is made inside the hub (no name clash with the host's interfaces), then
            # one end moves into the node and is renamed eth0 there
            peer = f"p{i}"
            _ip(*hub, "link", "add", IFNAME + "t", "type", "veth", "peer", "name", peer)
            _ip(*hub, "link", "set", IFNAME + "t", "netns", name)
            _ip(*hub, "link", "set", peer, "master", "br0")
            _ip(*hub, "link", "set", peer, "up")
            node = ("-n", name)
            _ip(*node, "link", "set", IFNAME + "t", "name", IFNAME)
            _ip(*node, "addr", "add", f"{self.addrs[i]}/24", "dev", IFNAME)
            _ip(*node, "link", "set", IFNAME, "up")
            _ip(*node, "link", "set", "lo", "up")

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process inside the nodes, delete the namespaces and hosts files."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
        for name in reversed(self._made):
            _delete_ns(name)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._made.clear()

    # ---- processes ------------------------------------------------------------------------------
    def popen(self, i: int, argv: Sequence[str], env: dict, log: str,
              cwd: str = ROOT) -> subprocess.Popen:
        """Run ``argv`` on node ``i`` (its namespace, host name ``node<i>``), output to ``log``."""
        cmd = ["ip", "netns", "exec", self.names[i], "unshare", "--uts", "sh", "-c",
               'hostname "$0" && exec "$@"', self.hosts[i], *argv]
        env = dict(env, GLOO_SOCKET_IFNAME=IFNAME)
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        self.procs.append(p)
        return p

    def torchrun(self, i: int, nproc: int, argv: Sequence[str], env: dict, log: str,
                 port: int = 29400, rdzv: str = "c10d", torchrun_args: Sequence[str] = (),
                 script: str = "pretrain_llama.py") -> subprocess.Popen:
        """One torchrun agent on node ``i`` for a job of all ``n`` nodes.

        ``rdzv="c10d"``: ``--rdzv-backend c10d --rdzv-endpoint <node0>:port`` (elastic agent,
        ``--max-restarts`` in ``torchrun_args`` works); ``rdzv="static"``: ``--master-addr <node0>
        --master-port port --node-rank i`` (the examples' MASTER_ADDR/NODE_RANK style).
        """
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.n),
                  "--nproc-per-node", str(nproc), "--node-rank", str(i)]
        if rdzv == "c10d":
            launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.addrs[0]}:{port}",
                       "--rdzv-id", self.tag]
        else:
            launch += ["--master-addr", self.addrs[0], "--master-port", str(port)]
        return self.popen(i, [*launch, *torchrun_args, os.path.join(ROOT, script), *argv],
                          env, log)

    def node_env(self, i: int) -> dict:
        """The variables a cluster script reads on node ``i`` (examples/common_launch.sh)."""
        return {"NNODES": str(self.n), "NODE_RANK": str(i), "MASTER_ADDR": self.addrs[0]}

    def pids(self, i: int) -> list[int]:
        """Every process running inside node ``i``."""
        return _ns_pids(self.names[i])

    def worker_pids(self, i: int) -> list[int]:
        """Node ``i``'s training processes (those with ``LOCAL_RANK`` set by torchrun)."""
        out = []
        for pid in self.pids(i):
            try:
                if "LOCAL_RANK" in psutil.Process(pid).environ():
                    out.append(pid)
            except psutil.Error:
                pass
        return out

    def kill_node(self, i: int, workers_only: bool = False) -> list[int]:
        """SIGKILL every process of node ``i`` (agent included), or only its training ranks."""
        pids = self.worker_pids(i) if workers_only else self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


__all__ = ["Cluster", "IFNAME", "SUBNET", "unavailable_reason"]
