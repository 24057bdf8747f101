"""Cost of the mutual-TLS transport against gloo: seconds per round and bytes on the wire for one round of a
decentralized strategy (every agent sends its message to each ring neighbour and receives theirs).

Agents are threads of this process, each with its own transport (gloo: :class:`Transport` on a shared in-memory
store, one gloo process group per round's members; tls: :class:`TlsTransport` with its own gRPC server and kit).
As root the whole benchmark re-runs itself in a network namespace of its own whose only interface is loopback, so
the loopback byte counter (IP and TCP headers, gloo's and gRPC/HTTP2/TLS framing included) counts this
benchmark's traffic only; elsewhere the bytes column is left empty.

    python bench/transport.py                         # 4 agents, ring, the offline default's message, 10 rounds
    python bench/transport.py --agents 8 --numel 1000000 --rounds 5

--numel defaults to 75,653 float32 values: the offline default's trainable parameters (MiniLM, LoRA r = 8 on
query/value, plus the classification head), what one decaf message carries. Times are medians over --rounds
rounds after --warmup rounds (connections made, handshakes done).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from decaf_ext.comm.kit import load_kit, provision
from decaf_ext.comm.tls_transport import TlsTransport
from decaf_ext.comm.transport import Transport

LOOPBACK = Path("/sys/class/net/lo/statistics")


def wire_bytes() -> int | None:
    """Bytes sent on loopback so far (received equals sent there), or None outside our own namespace."""
    if os.environ.get("DECAF_BENCH_NETNS") != "1":
        return None
    return int((LOOPBACK / "tx_bytes").read_text())


def gloo_agents(n: int, timeout: float) -> list[Transport]:
    store = dist.HashStore()
    return [Transport(store, j, n, fingerprint="bench", backend="gloo", timeout=timeout, startup_timeout=timeout)
            for j in range(n)]


def tls_agents(n: int, timeout: float, folder: str) -> list[TlsTransport]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]  # ports free now
    addresses = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    for sock in sockets:
        sock.close()
    folders = provision(n, addresses, os.path.join(folder, "kit"), topology="ring")
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda f: TlsTransport(load_kit(f), fingerprint="bench", timeout=timeout,
                                                    startup_timeout=timeout), folders))


def measure(transports, n: int, numel: int, rounds: int, warmup: int) -> tuple[float, float | None]:
    """(median seconds per round, bytes on the wire per round or None)."""
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda t: t.start(0), transports))
        message = torch.randn(numel)

        def one(transport, round_index):
            view = transport.agree(round_index)
            transport.connect(view)
            peers = [(transport.agent - 1) % n, (transport.agent + 1) % n]
            received = transport.send_and_receive(view, {j: message for j in set(peers)})
            assert len(received) == len(set(peers)), f"agent {transport.agent} missed messages in {round_index}"

        seconds, before = [], None
        for round_index in range(warmup + rounds):
            if round_index == warmup:
                before = wire_bytes()
            start = time.perf_counter()
            list(pool.map(lambda t: one(t, round_index), transports))
            seconds.append(time.perf_counter() - start)
        after = wire_bytes()
    for transport in transports:
        transport.close()
    per_round = None if before is None or after is None else (after - before) / rounds
    return statistics.median(seconds[warmup:]), per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--numel", type=int, default=75_653, help="float32 values per message")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if os.geteuid() == 0 and shutil.which("ip") and os.environ.get("DECAF_BENCH_NETNS") is None:
        namespace = f"decaf-bench-{os.getpid()}"
        if subprocess.run(["ip", "netns", "add", namespace], capture_output=True).returncode == 0:
            try:
                subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
                sys.exit(subprocess.run(["ip", "netns", "exec", namespace, sys.executable, *sys.argv],
                                        env={**os.environ, "DECAF_BENCH_NETNS": "1"}).returncode)
            finally:
                subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    payload = 2 * args.agents * args.numel * 4  # each agent sends to its two ring neighbours
    print(f"{args.agents} agents on a ring, {args.numel:,} float32 values per message ({args.numel * 4:,} bytes), "
          f"payload {payload:,} bytes per round; medians over {args.rounds} rounds after {args.warmup}")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        rows["gloo"] = measure(gloo_agents(args.agents, args.timeout), args.agents, args.numel, args.rounds,
                               args.warmup)
        rows["tls"] = measure(tls_agents(args.agents, args.timeout, folder), args.agents, args.numel, args.rounds,
                              args.warmup)
    print(f"| transport | seconds per round | bytes on the wire per round | wire / payload |")
    print("|---|---|---|---|")
    for name, (seconds, wire) in rows.items():
        on_wire = "n/a (not in a namespace of its own)" if wire is None else f"{wire:,.0f}"
        ratio = "" if wire is None else f"{wire / payload:.3f}"
        print(f"| {name} | {seconds:.4f} | {on_wire} | {ratio} |")
    (gloo_s, gloo_b), (tls_s, tls_b) = rows["gloo"], rows["tls"]
    print(f"tls / gloo: time x{tls_s / gloo_s:.2f}" + ("" if gloo_b is None else f", bytes x{tls_b / gloo_b:.3f}"))


if __name__ == "__main__":
    main()
