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

    python bench/messages.py                     # 1 GB over gloo and TLS
    python bench/messages.py --megabytes 64 --transports tls
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1024, help="message size in MB (2**20 bytes), float32")
    parser.add_argument("--transports", nargs="+", choices=("gloo", "tls"), default=["gloo", "tls"])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds of the round timeout")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
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
