"""Kernel launches of one consensus_tsvd call on a GPU, counted by torch.profiler (every kernel, memcpy and
memset the device ran), for the shapes of csrc/tests/launch_count.cpp: 8, 16 and 32 agents, ring and complete,
W on the CPU and on the GPU, float32 and bfloat16, r = rank = 8. With --cpu-table (the output of
build/cmake/decaf_launch_count) each row also shows the count made on the CPU through the CUDA path.
scripts/gpu_check.sh runs it:

    python bench/launch_profile.py [--size 4096 --modules 16] [--cpu-table build/cmake/launch_count.txt]
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import decaf_ext


def weights(agents: int, complete: bool) -> torch.Tensor:
    """Uniform complete graph, or a ring with weights 1/3 (as launch_count.cpp)."""
    if complete:
        return torch.full((agents, agents), 1.0 / agents)
    W = torch.zeros(agents, agents)
    for i in range(agents):
        for d in (-1, 0, 1):
            W[i, (i + d) % agents] = 1.0 / 3.0
    return W


def device_ops(agents: int, complete: bool, w_device: str, dtype: torch.dtype, size: int, modules: int) -> int:
    """Kernels, memcpys and memsets the GPU ran during one exact call (after a warm-up call)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    A = torch.randn(modules, agents, 8, size, device="cuda", generator=g).to(dtype)
    B = torch.randn(modules, agents, size, 8, device="cuda", generator=g).to(dtype)
    W = weights(agents, complete).to(w_device)
    call = lambda: decaf_ext.consensus_tsvd(A, B, W, 8, method="exact", check_values=False)  # noqa: E731
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def cpu_counts(path: str | None) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(agents, topology, W on) -> (float32, bfloat16) from decaf_launch_count's table, if given."""
    rows: dict[tuple[str, str, str], tuple[str, str]] = {}
    if path:
        try:
            with open(path) as f:
                for line in f:
                    cells = line.split()
                    if len(cells) == 6 and cells[0].isdigit():
                        rows[(cells[0], cells[1], cells[2])] = (cells[4], cells[5])
        except OSError as err:
            print(f"(no CPU counts: {err})")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="m = n of each module (GPU preset: 4096)")
    parser.add_argument("--modules", type=int, default=16, help="modules per call (GPU preset: 16)")
    parser.add_argument("--cpu-table", help="decaf_launch_count's output, printed next to the profiler's counts")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    cpu = cpu_counts(args.cpu_table)
    print(f"device ops per call (profiler), {args.modules} modules of {args.size} x {args.size}, r = rank = 8"
          + ("; CPU counter's in brackets" if cpu else ""))
    print("agents topology W on  k*r  float32  bfloat16")
    for agents in (8, 16, 32):
        for complete in (False, True):
            for w_device in ("cpu", "cuda"):
                topology, w_on = ("complete" if complete else "ring"), ("gpu" if w_device == "cuda" else "cpu")
                counts = [device_ops(agents, complete, w_device, dtype, args.size, args.modules)
                          for dtype in (torch.float32, torch.bfloat16)]
                known = cpu.get((str(agents), topology, w_on))
                cells = [f"{n} [{c}]" if known else str(n) for n, c in zip(counts, known or ("", ""))]
                kr = agents * 8 if complete or w_on == "gpu" else 24
                print(f"{agents:6d} {topology:<8} {w_on:<4} {kr:5d} {cells[0]:>8} {cells[1]:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
