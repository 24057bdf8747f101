"""Messages of any size: one message of --megabytes MB (default 1024: 268,435,456 float32 values) sent by one agent
to one neighbour over gloo and over the mutual-TLS transport, with its throughput and the peak memory it took.

Two agents, threads of this process, made by bench/transport.py's helpers (gloo on an in-memory store; TLS with a
kit and a gRPC server each, on loopback); agent 0 sends the message, agent 1 an empty one back. Per transport:

- throughput: message bytes / seconds from both agents' ``send_and_receive`` starting to both returning (the
  receiver's checks of the message included; connections made beforehand);
- peak: the process's peak resident memory above its baseline (its resident memory once the agents are up,
  before the message is made), as MB and as a multiple of the message's size. Method: the kernel's high-water
  mark VmHWM is reset by writing "5" to /proc/self/clear_refs (Linux >= 4.0) and read from /proc/self/status
  after the exchange; where clear_refs cannot be written, a thread samples VmRSS every 5 ms instead (it can miss
  a short spike; the output says which method ran).

The floor is 2.0 message sizes: both agents live in this process, so the sender's tensor and the receiver's
destination are both counted. A transport holding a second copy of the message at either end shows 3.0 or more.

``--round ALGORITHM`` measures one whole round of the strategy instead (:class:`AgentComm`: pack, encode, seal
with a run key, exchange over gloo, checks, decode, mix), both agents sending, each with a synthetic adapter of
4096 x 4096 modules at rank 64 whose message is about --megabytes: what a round holds beyond the transport.

    python bench/messages.py                     # 1 GB over gloo and TLS
    python bench/messages.py --megabytes 64 --transports tls
    python bench/messages.py --megabytes 128 --round decaf
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport import gloo_agents, tls_agents  # noqa: E402 (bench/transport.py, next to this file)

STATUS = Path("/proc/self/status")


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB (VmRSS, VmHWM)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def peak_rss() -> Iterator[dict[str, object]]:
    """Measures the peak resident memory above the resident memory at entry: yields a dict whose "bytes" and
    "method" are set on exit (module docstring)."""
    result: dict[str, object] = {}
    gc.collect()
    baseline = status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        sampler, stop, samples = None, None, []
    except OSError:
        stop, samples = threading.Event(), [baseline]

        def sample() -> None:
            while not stop.wait(0.005):
                samples.append(status_kb("VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    yield result
    if sampler is None:
        result["bytes"], result["method"] = (status_kb("VmHWM") - baseline) * 1024, "VmHWM after clear_refs"
    else:
        stop.set()
        sampler.join()
        result["bytes"], result["method"] = (max(samples) - baseline) * 1024, "VmRSS sampled every 5 ms"


def one_way(agents, numel: int) -> tuple[float, int, str]:
    """Agent 0 sends `numel` float32 values to agent 1 (which sends none back): (seconds, peak bytes above the
    baseline, method). AssertionError unless agent 1 received the message bit for bit."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda t: t.start(0), agents))
        views = list(pool.map(lambda t: t.agree(0), agents))
        list(pool.map(lambda tv: tv[0].connect(tv[1]), zip(agents, views)))
        with peak_rss() as peak:
            message = torch.rand(numel)
            outgoing = [({1: message}, {1: 0}), ({0: torch.empty(0)}, {0: numel})]
            start = time.perf_counter()
            got = list(pool.map(lambda k: agents[k].send_and_receive(views[k], outgoing[k][0],
                                                                      sizes=outgoing[k][1]), range(2)))
            seconds = time.perf_counter() - start
    for agent in agents:
        agent.close()
    assert 0 in got[1] and torch.equal(got[1][0], message), "agent 1 did not receive the message intact"
    return seconds, peak["bytes"], peak["method"]


def one_round(algorithm: str, megabytes: int, timeout: float) -> tuple[float, int, int, str]:
    """One round of `algorithm` between two agents (threads, gloo, run key), each with modules of 4096 x 4096 at
    rank 64 (2 MiB of float32 per module): (seconds, message bytes, peak bytes above the baseline, method)."""
    from decaf_ext.comm.agent_comm import AgentComm
    from decaf_ext.lora import FactorGroup
    from decaf_ext.strategies import get_strategy

    rank, side = 64, 4096
    modules = max(1, megabytes * (1 << 20) // (4 * rank * 2 * side))
    factors = [[FactorGroup([f"m{i}" for i in range(modules)], torch.randn(modules, 1, rank, side) / side,
                            torch.randn(modules, 1, side, rank) / side)] for _ in range(2)]
    strategy, store = get_strategy(algorithm), dist.HashStore()
    comms = [AgentComm(strategy, factors[j], {}, store=store, agent=j, n_agents=2, backend="gloo",
                       device=torch.device("cpu"), run_key=bytes(32), round_timeout=timeout) for j in range(2)]
    W = torch.full((2, 2), 0.5, dtype=torch.float64)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: c.start(0), comms))
        with peak_rss() as peak:
            start = time.perf_counter()
            mixed = list(pool.map(lambda j: comms[j].round(0, factors[j], {}, W)[1], range(2)))
            seconds = time.perf_counter() - start
    assert all(m is not None and m.agents == [j, 1 - j] for j, m in enumerate(mixed)), "an agent did not mix"
    return seconds, comms[0].layout.numel * 4, peak["bytes"], peak["method"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1024, help="message size in MB (2**20 bytes), float32")
    parser.add_argument("--transports", nargs="+", choices=("gloo", "tls"), default=["gloo", "tls"])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds of the round timeout")
    parser.add_argument("--round", metavar="ALGORITHM", help="one whole round of this strategy instead (gloo)")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.round:
        seconds, size, peak, method = one_round(args.round, args.megabytes, args.timeout)
        print(f"one {args.round} round, 2 agents each sending a message of {size:,} bytes to the other, threads of "
              f"one process; cpu_count={os.cpu_count()}, loadavg={[round(x, 2) for x in os.getloadavg()]}")
        print(f"{seconds:.2f} s; peak {peak / 2**20:.0f} MB above the baseline = {peak / size:.2f} messages for the "
              f"two agents ({method})")
        return
    numel = args.megabytes * (1 << 20) // 4
    size = numel * 4
    print(f"one message of {numel:,} float32 values ({size:,} bytes) from agent 0 to agent 1, threads of one "
          f"process on loopback; cpu_count={os.cpu_count()}, loadavg={[round(x, 2) for x in os.getloadavg()]}")
    print("peak = resident memory above the baseline; floor 2.0 x message: the sender's tensor and the receiver's "
          "destination, both in this process")
    print("| transport | seconds | throughput MB/s | peak MB | peak / message | method |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.transports:
            agents = gloo_agents(2, args.timeout) if name == "gloo" else tls_agents(2, args.timeout, folder)
            seconds, peak, method = one_way(agents, numel)
            print(f"| {name} | {seconds:.2f} | {size / seconds / 2**20:.0f} | {peak / 2**20:.0f} | "
                  f"{peak / size:.2f} | {method} |", flush=True)
            gc.collect()


if __name__ == "__main__":
    main()
