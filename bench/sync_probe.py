"""Which ATen op makes a consensus_tsvd call wait for the GPU: lists every CUDA runtime call that blocks the
host during one call (stream/device/event synchronizations, blocking memcpys), each with the innermost op
around it. Run on a machine with a GPU (scripts/gpu_check.sh does):

    python bench/sync_probe.py                 # float32 exact, check_values=False and True, W on GPU / CPU

A sync-free call prints "no blocking calls"; `check_values=True` is meant to show exactly one (its read-back).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import decaf_ext
from decaf_ext.topology import build_graph, mixing_matrix

BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
            "cudaFree")


def blocking_calls(fn) -> list[str]:
    """'runtime call <- innermost op <- its parents' for each blocking runtime call during fn()."""
    fn()  # warm up: library handles, allocator, caches
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    ops = [e for e in events if not e.name.startswith("cuda")]
    found = []
    for e in events:
        if e.name not in BLOCKING:
            continue
        around = sorted((o for o in ops if o.time_range.start <= e.time_range.start
                         and e.time_range.end <= o.time_range.end), key=lambda o: o.time_range.elapsed_us())
        found.append(" <- ".join([e.name] + [o.name for o in around[:4]]))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, nargs="+", default=[8, 16], help="ring sizes (k r = 32 and 64 at r = 4 "
                   "with W on the GPU)")
    p.add_argument("--modules", type=int, default=2)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--r", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/sync_probe.py needs a CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    for agents in args.agents:
        A = torch.randn(args.modules, agents, args.r, args.n, generator=gen).cuda()
        B = torch.randn(args.modules, agents, args.m, args.r, generator=gen).cuda()
        W = mixing_matrix(build_graph("ring", agents)).float()
        for where in ("cuda", "cpu"):
            Ww = W.to(where)
            for check in (False, True):
                calls = blocking_calls(lambda: decaf_ext.consensus_tsvd(A, B, Ww, args.r, method="exact",
                                                                        check_values=check))
                print(f"ring {agents}, r={args.r}, W on {where}, check_values={check}: "
                      f"{len(calls) or 'no'} blocking call(s)")
                for call in calls:
                    print(f"    {call}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
