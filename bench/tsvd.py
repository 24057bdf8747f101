"""Benchmark of decaf_ext.consensus_tsvd against dense baselines, with accuracy next to every time.

For N agents holding LoRA factors A [modules, N, r, n], B [modules, N, m, r] and a mixing matrix
W [N, N], every method computes the rank-`rank` truncated SVD of M_i = sum_j W[i, j] B_j A_j:
  (a) dense:      form every M_i (weighted_product_sum), torch.linalg.svd, truncate;
  (b) lowrank:    form every M_i, torch.svd_lowrank(q = rank + oversample, niter);
  (c) exact:      consensus_tsvd(method="exact", check_values=False) (also timed with checks);
  (d) randomized: consensus_tsvd(method="randomized", check_values=False);
  (e) floor:      the all-pairs Gram products of the stacked factors in the input dtype (any method
                  that uses every factor reads them at least once), plus a memory-bandwidth estimate;
  (f) floor:      each agent's Gram products of its neighbor-stacked factors, the faster of two ways
                  (one bmm over the contiguous neighbor stacks; (e) and a gather of each agent's blocks).
Each floor's inputs are laid out untimed, and each is the fastest implementation measured of its work.
`--scaling` instead prints a table of (c), (d), (e) and (f) over agents and topologies.
Times are medians over repeats after warmup (CUDA synchronized). Accuracy is measured against (a)
on the modules and agents where (a) ran. Run `python bench/tsvd.py --help` for the options.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

try:
    import resource  # page-fault counts (Unix)
except ImportError:
    resource = None

import decaf_ext
from decaf_ext.topology import build_graph, mixing_matrix

PRESETS: dict[str, dict] = {
    "cpu": dict(agents=8, modules=12, m=768, n=768, r=8, rank=8, topology=["ring"], dtype="float32",
                device="cpu", repeats=10, dense_repeats=3, dense_modules=1, dense_agents=None, chunk=None),
    "complete16": dict(agents=16, modules=12, m=768, n=768, r=8, rank=8, topology=["complete"], dtype="float32",
                       device="cpu", repeats=3, dense_repeats=1, dense_modules=1, dense_agents=1, chunk=None),
    "complete32": dict(agents=32, modules=12, m=768, n=768, r=8, rank=8, topology=["complete"], dtype="float32",
                       device="cpu", repeats=3, dense_repeats=1, dense_modules=1, dense_agents=1, chunk=None),
    "gpu": dict(agents=16, modules=16, m=4096, n=4096, r=8, rank=8, topology=["ring", "complete"],
                dtype="float32", device="cuda", repeats=10, dense_repeats=1, dense_modules=1, dense_agents=1,
                chunk=4),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# (ratio, op, bound, when): `when` is "always", "ring" (sparse graphs), "complete" or "wide" (k r >= 4 rank).
CPU_TARGETS = (("(a)/(c)", ">=", 50.0, "always"), ("(b)/(c)", ">=", 5.0, "always"), ("(c)/(f)", "<=", 3.0, "ring"),
               ("(c)/(e)", "<=", 10.0, "complete"), ("(c)/(d)", ">=", 2.0, "wide"))
GPU_TARGETS = (("(c)/(e)", "<=", 3.0, "always"), ("(c)/(bw)", "<=", 3.0, "always"))
RATIOS = ("(a)/(c)", "(b)/(c)", "(c)/(e)", "(c)/(f)", "(c)/(d)", "(a)/(d)", "(b)/(d)", "(d)/(e)")

# Truncated SVD as (left [..., m, rank], right [..., rank, n], S [..., rank]): product left @ right.
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Timing:
    """Median wall time of one method; `scale` > 1 marks a time extrapolated from a subset."""
    label: str
    median_s: float
    repeats_s: list[float]
    scale: float = 1.0
    note: str = ""
    product_error: float | None = None
    s_error: float | None = None


@dataclass
class TopologyResult:
    topology: str
    timings: dict[str, Timing] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)
    targets: list[dict] = field(default_factory=list)
    stages: dict[str, list[dict]] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Preset values, overridden by any flag given explicitly."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--agents", type=int, help="number of agents N")
    p.add_argument("--modules", type=int, help="LoRA modules of one shape (leading batch dim)")
    p.add_argument("--m", type=int, help="rows of B (output features)")
    p.add_argument("--n", type=int, help="columns of A (input features)")
    p.add_argument("--r", type=int, help="LoRA rank of the inputs")
    p.add_argument("--rank", type=int, help="target rank of the truncated SVD")
    p.add_argument("--topology", nargs="+", help="one or more topologies of decaf_ext.topology")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--device")
    p.add_argument("--repeats", type=int, help="timed repeats of (c)-(e)")
    p.add_argument("--dense-repeats", type=int, help="timed repeats of (a) and (b)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--dense-modules", type=int, help="modules on which (a) runs (time scaled to all)")
    p.add_argument("--dense-agents", type=int, help="receiving agents on which (a) runs (default: all)")
    p.add_argument("--skip-dense", action="store_true", help="skip (a); accuracy is then not measured")
    p.add_argument("--chunk", type=int, help="modules per dense call of (a) and (b) (bounds memory)")
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--n-iter", type=int, default=2)
    p.add_argument("--bandwidth", type=float, help="device memory bandwidth in GB/s (default: measured copy)")
    p.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                   help="profile (c) and (d) once and print the ops with the largest self time")
    p.add_argument("--spread", type=float,
                   help="agents' factors = common + spread * own (default: independent per agent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--warm-heap", action="store_true",
                   help="free one 30 MiB block before timing, as a training step's activations do (CPU, glibc: "
                        "freed memory is then kept for reuse, see bench/README.md)")
    p.add_argument("--json", help="write the figures to this path")
    p.add_argument("--scaling", nargs="*", type=int, metavar="AGENTS",
                   help="table of (c), (d), (e), (f) for these agent counts (default 8 16 32) on --topology")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.chunk = args.chunk or args.modules
    args.dense_agents = args.dense_agents or args.agents
    for name in ("agents", "modules", "m", "n", "r", "rank", "repeats", "dense_repeats", "dense_modules",
                 "dense_agents", "chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rank > min(args.m, args.n):
        p.error(f"--rank must be <= min(m, n) = {min(args.m, args.n)}, got {args.rank}")
    args.dense_modules = min(args.dense_modules, args.modules)
    args.dense_agents = min(args.dense_agents, args.agents)
    return args


def machine_info(device: torch.device) -> dict:
    """Versions, device name and thread counts (and the load average: the CPU may be shared)."""
    info = {"torch": torch.__version__, "decaf_ext": decaf_ext.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    allocator = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if os.environ.get(k)}
    if allocator:  # the host allocator decides how often fresh outputs page-fault
        info["allocator_env"] = allocator
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 without the resource module)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
              warmup_fn: Callable[[], object] | None = None,
              faults: list[float] | None = None) -> tuple[list[float], object]:
    """Wall times (s) of `repeats` calls of fn after `warmup` calls of warmup_fn (default fn);
    returns the times and the last result, and appends the minor page faults per timed call to
    `faults` when given."""
    for _ in range(warmup):
        (warmup_fn or fn)()
    synchronize(device)
    times, out = [], None
    faults_before = minor_faults()
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if faults is not None:
        faults.append((minor_faults() - faults_before) / max(repeats, 1))
    return times, out


def make_factors(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian LoRA factors A [modules, N, r, n] (rows of norm ~1) and B [modules, N, m, r].

    Independent per agent by default (M_i then has N_i r similar singular values: the hard case for
    randomized methods); with --spread s every agent holds a common factor plus s times its own.
    """
    gen = torch.Generator().manual_seed(args.seed)

    def draw(*shape: int) -> torch.Tensor:
        own = torch.randn(args.modules, args.agents, *shape, generator=gen)
        if args.spread is None:
            return own
        common = torch.randn(args.modules, 1, *shape, generator=gen)
        return (common + args.spread * own) / math.sqrt(1.0 + args.spread**2)

    A = draw(args.r, args.n) / math.sqrt(args.n)
    B = draw(args.m, args.r) / math.sqrt(args.r)
    dtype = DTYPES[args.dtype]
    return A.to(device, dtype), B.to(device, dtype)


def svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch's SVDs take float32/float64 only: half-precision products are decomposed in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def dense_svd(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, rank: int, chunk: int) -> list[Factors]:
    """(a) per chunk of modules: M = weighted_product_sum, full SVD, truncated to `rank`."""
    out = []
    for s in range(0, A.shape[0], chunk):
        M = decaf_ext.weighted_product_sum(A[s:s + chunk], B[s:s + chunk], W, check_values=False)
        U, S, Vh = torch.linalg.svd(M.to(svd_dtype(M.dtype)), full_matrices=False)
        out.append((U[..., :rank] * S[..., None, :rank], Vh[..., :rank, :], S[..., :rank]))
    return out


def lowrank_svd(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, rank: int, chunk: int, oversample: int,
                n_iter: int) -> list[Factors]:
    """(b) per chunk of modules: M = weighted_product_sum, torch.svd_lowrank, truncated to `rank`."""
    out = []
    for s in range(0, A.shape[0], chunk):
        M = decaf_ext.weighted_product_sum(A[s:s + chunk], B[s:s + chunk], W, check_values=False)
        q = min(rank + oversample, *M.shape[-2:])
        U, S, V = torch.svd_lowrank(M.to(svd_dtype(M.dtype)), q=q, niter=n_iter)
        out.append((U[..., :rank] * S[..., None, :rank], V[..., :rank].mT, S[..., :rank]))
    return out


def consensus(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, rank: int, method: str, args: argparse.Namespace,
              check_values: bool = False) -> Factors:
    """(c)/(d): the fused op; returns (B_new, A_new, S)."""
    A_new, B_new, S = decaf_ext.consensus_tsvd(A, B, W, rank, method=method, oversample=args.oversample,
                                               n_iter=args.n_iter, seed=args.seed, check_values=check_values)
    return B_new, A_new, S


def gram_floor(A_stack: torch.Tensor, B_stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e) Gram matrices [modules, N r, N r] of the stacked A rows and B columns, input dtype.

    A_stack: [modules, N r, n], B_stack: [modules, N r, m] (B columns as rows, laid out beforehand).
    """
    return torch.bmm(A_stack, A_stack.mT), torch.bmm(B_stack, B_stack.mT)


def neighbor_rows(W: torch.Tensor, r: int) -> list[torch.Tensor]:
    """Each agent's neighbor-stacked rows of the stacked factors (indices < N r), grouped by neighbor
    count k: one [agents, k r] index tensor per k, on W's device."""
    by_k: dict[int, list[list[int]]] = {}
    for i in range(W.shape[0]):
        nbrs = torch.nonzero(W[i].cpu()).flatten().tolist()
        by_k.setdefault(len(nbrs), []).append([j * r + x for j in nbrs for x in range(r)])
    return [torch.tensor(rows, device=W.device) for rows in by_k.values()]


def floor_implementations(A_stack: torch.Tensor, B_stack: torch.Tensor,
                          rows: list[torch.Tensor]) -> dict[str, dict[str, Callable[[], object]]]:
    """The floors' work, each in the ways timed, inputs laid out here (untimed): (e) the all-pairs Grams;
    (f) every agent's Grams of its neighbor-stacked factors [modules, agents, k r, k r], either as one
    bmm over the neighbor stacks laid out contiguously (A rows and B columns as rows, [modules agents,
    k r, n | m]) or as (e) and a gather of each agent's blocks, which computes each product of agents
    that share neighbors once and reads the factors once (the faster where neighbor sets overlap)."""
    stacks = [S[:, idx].flatten(0, 1).contiguous() for idx in rows for S in (A_stack, B_stack)]
    NR = A_stack.shape[1]
    # Each agent's block as entries of the flattened all-pairs Gram: one index_select per neighbor count.
    blocks = [((idx.unsqueeze(-1) * NR + idx.unsqueeze(-2)).flatten(), (*idx.shape, idx.shape[1])) for idx in rows]

    def gathered() -> list[torch.Tensor]:
        grams = gram_floor(A_stack, B_stack)
        return [G.flatten(1).index_select(1, flat).view(G.shape[0], *shape) for flat, shape in blocks for G in grams]

    return {"e": {"bmm": lambda: gram_floor(A_stack, B_stack)},
            "f": {"neighbor stacks bmm": lambda: [torch.bmm(S, S.mT) for S in stacks],
                  "all-pairs bmm + gather": gathered}}


def fastest(ways: dict[str, Callable[[], object]], device: torch.device, repeats: int,
            warmup: int) -> tuple[list[float], str]:
    """Times each way of doing one piece of work; returns the fastest one's times and a note naming it,
    with every way's median when there are several."""
    timed = {name: time_call(fn, device, repeats, warmup)[0] for name, fn in ways.items()}
    best = min(timed, key=lambda name: statistics.median(timed[name]))
    if len(timed) == 1:
        return timed[best], best
    medians = ", ".join(f"{name} {statistics.median(t) * 1e3:.3f} ms" for name, t in timed.items())
    return timed[best], f"fastest of: {medians}"


def copy_bandwidth(device: torch.device, warmup: int) -> float:
    """Bytes read + written per second by a device copy of 256 MiB (a rough memory bandwidth)."""
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    times, _ = time_call(x.clone, device, repeats=5, warmup=max(warmup, 1))
    return 2 * x.numel() * x.element_size() / statistics.median(times)


def stage_breakdown(fn: Callable[[], object], device: torch.device, calls: int = 3, top: int = 6) -> list[dict]:
    """Where one call's time goes: the ops with the largest self time (device time on CUDA), per call.

    For consensus_tsvd on the CPU: aten::bmm is the Gram products and the write-back, aten::index_select
    the gathered stacks, aten::_linalg_eigh / aten::_linalg_svd the small cores, aten::geqrf /
    aten::ormqr the Householder path (CPU fallback), aten::copy_ the casts and layout copies. On CUDA
    (device time, kernel names): GEMMs, the Cholesky and triangular-solve kernels and small_eigh_kernel of
    the batched Gram path. The first row, "device busy", is the device time of all kernels per call:
    far below the call's wall time means the call is bound by launches and host work, not by the GPU.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    events = prof.key_averages()
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    rows = [{"name": e.key, "ms_per_call": self_us(e) / 1e3 / calls, "share": self_us(e) / total} for e in ranked]
    if cuda:
        rows.insert(0, {"name": "device busy", "ms_per_call": total / 1e3 / calls, "share": 1.0})
    return rows


def relative_errors(ref: Factors, got: Factors) -> tuple[float, float]:
    """Largest relative Frobenius error over matrices of the rank-r product and of S (float64)."""
    (rl, rr, rs), (gl, gr, gs) = ref, got
    worst_p, worst_s = 0.0, 0.0
    for k in range(rl.shape[0]):  # one module at a time bounds memory
        P_ref = rl[k].double() @ rr[k].double()
        P = gl[k].double() @ gr[k].double()
        e_p = torch.linalg.matrix_norm(P - P_ref) / torch.linalg.matrix_norm(P_ref)
        e_s = torch.linalg.vector_norm(gs[k].double() - rs[k].double(), dim=-1) / torch.linalg.vector_norm(
            rs[k].double(), dim=-1)
        worst_p, worst_s = max(worst_p, e_p.max().item()), max(worst_s, e_s.max().item())
    return worst_p, worst_s


def concat(parts: list[Factors]) -> Factors:
    return tuple(torch.cat(t) for t in zip(*parts))  # type: ignore[return-value]


def subset(f: Factors, modules: int, agents: int) -> Factors:
    return tuple(t[:modules, :agents] for t in f)  # type: ignore[return-value]


def ratio(num: Timing | None, den: Timing | None) -> float | None:
    return num.median_s / den.median_s if num and den else None


def run_topology(topology: str, A: torch.Tensor, B: torch.Tensor, args: argparse.Namespace,
                 device: torch.device, bandwidth: float, bandwidth_note: str) -> TopologyResult:
    """Times (c)-(f) first, then the slower (d), (b) and (a), each printed when measured (a run cut off by a
    time limit keeps what it measured); then their accuracy against (a), ratios and targets."""
    res = TopologyResult(topology)
    W = mixing_matrix(build_graph(topology, args.agents)).to(device, svd_dtype(A.dtype))
    run = dict(device=device, warmup=args.warmup)
    outputs: dict[str, Factors] = {}

    def record(key: str, label: str, times: list[float], scale: float = 1.0, note: str = "") -> None:
        res.timings[key] = Timing(label, statistics.median(times) * scale, times, scale, note)
        print(f"  [{topology}] {label.strip()}: {res.timings[key].median_s * 1e3:.3f} ms", flush=True)

    def consensus_row(key: str, method: str) -> None:
        faults: list[float] = []
        times, out = time_call(lambda: consensus(A, B, W, args.rank, method, args), repeats=args.repeats,
                               faults=faults, **run)
        record(key, f"({key}) consensus_tsvd {method}", times,
               note=f"check_values=False; {faults[0]:.0f} page faults per call")
        outputs[key] = out

    consensus_row("c", "exact")
    times, _ = time_call(lambda: consensus(A, B, W, args.rank, "exact", args, check_values=True),
                         repeats=args.repeats, **run)
    record("c_checked", "    exact, check_values=True", times)
    if device.type == "cuda":  # W on the CPU is read to plan: sparse supports, identical rows once
        W_cpu = W.cpu()
        times, _ = time_call(lambda: consensus(A, B, W_cpu, args.rank, "exact", args), repeats=args.repeats, **run)
        record("c_cpu_w", "    exact, W on the CPU", times, note="check_values=False")
    A_stack = A.reshape(args.modules, args.agents * args.r, args.n)
    B_stack = B.mT.reshape(args.modules, args.agents * args.r, args.m).contiguous()
    floors = floor_implementations(A_stack, B_stack, neighbor_rows(W, args.r))
    for key, work in (("e", "all-pairs Gram"), ("f", "neighbor Gram")):
        times, note = fastest(floors[key], repeats=args.repeats, **run)
        record(key, f"({key}) floor: {work} {args.dtype}", times, note=f"{note}; inputs laid out untimed")
    factor_bytes = (A.numel() + B.numel()) * A.element_size()
    record("bw", "    bandwidth floor", [factor_bytes / bandwidth],
           note=f"{factor_bytes / 1e6:.1f} MB read once at {bandwidth / 1e9:.1f} GB/s ({bandwidth_note})")
    consensus_row("d", "randomized")
    q = min(args.rank + args.oversample, args.m, args.n)
    times, out = time_call(lambda: lowrank_svd(A, B, W, args.rank, args.chunk, args.oversample, args.n_iter),
                           repeats=args.dense_repeats, **run)
    record("b", f"(b) dense M + svd_lowrank q={q}", times, note=f"{args.dense_repeats} repeats")
    outputs["b"] = concat(out)
    dm, da = args.dense_modules, args.dense_agents
    if not args.skip_dense:
        Ad, Bd, Wd = A[:dm], B[:dm], W[:da]
        scale = (args.modules / dm) * (args.agents / da)
        times, out = time_call(lambda: dense_svd(Ad, Bd, Wd, args.rank, args.chunk), repeats=args.dense_repeats,
                               warmup_fn=lambda: dense_svd(Ad[:1], Bd[:1], Wd[:1], args.rank, 1), **run)
        note = f"{args.dense_repeats} repeats; warmup on 1 matrix"
        if scale != 1.0:
            note += f"; EXTRAPOLATED x{scale:g} from {dm} module(s) x {da} agent(s)"
        record("a", "(a) dense M + linalg.svd", times, scale, note)
        outputs["a"] = concat(out)
    if args.stages:
        for key, method in (("c", "exact"), ("d", "randomized")):
            res.stages[key] = stage_breakdown(lambda: consensus(A, B, W, args.rank, method, args), device)
    res.timings = {key: res.timings[key] for key in ("a", "b", "c", "d", "c_checked", "c_cpu_w", "e", "f", "bw")
                   if key in res.timings}  # the printed table's order

    if "a" in outputs:
        ref = subset(outputs["a"], dm, da)
        for key in ("a", "b", "c", "d"):
            t = res.timings[key]
            t.product_error, t.s_error = relative_errors(ref, subset(outputs[key], dm, da))

    tm = res.timings
    pairs = {"(a)/(c)": ("a", "c"), "(b)/(c)": ("b", "c"), "(c)/(e)": ("c", "e"), "(c)/(f)": ("c", "f"),
             "(c)/(d)": ("c", "d"), "(a)/(d)": ("a", "d"),
             "(b)/(d)": ("b", "d"), "(d)/(e)": ("d", "e"), "(c)/(bw)": ("c", "bw"), "(d)/(bw)": ("d", "bw")}
    res.ratios = {name: ratio(tm.get(num), tm.get(den)) for name, (num, den) in pairs.items()}
    k_max = int((W != 0).sum(1).max())
    applies = {"always": True, "ring": topology != "complete", "complete": topology == "complete",
               "wide": k_max * args.r >= 4 * args.rank}
    for name, op, bound, when in (GPU_TARGETS if device.type == "cuda" else CPU_TARGETS):
        if not applies[when]:
            continue
        value = res.ratios[name]
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        res.targets.append({"ratio": name, "op": op, "bound": bound, "value": value, "pass": ok})
    return res


def fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def print_result(res: TopologyResult, args: argparse.Namespace) -> None:
    data = "independent factors" if args.spread is None else f"factors common + {args.spread:g} x own"
    print(f"\ntopology {res.topology}: {args.agents} agents, {args.modules} modules of {args.m}x{args.n}, "
          f"r={args.r}, rank={args.rank}, {args.dtype}, {args.device}, {data}")
    print(f"{'method':36s} {'median ms':>11s} {'err B@A':>9s} {'err S':>9s}  note")
    for key, t in res.timings.items():
        errs = ("ref", "ref") if key == "a" else (fmt_err(t.product_error), fmt_err(t.s_error))
        print(f"{t.label:36s} {t.median_s * 1e3:11.3f} {errs[0]:>9s} {errs[1]:>9s}  {t.note}".rstrip())
    shown = [f"{n} = {res.ratios[n]:.1f}x" for n in RATIOS + ("(c)/(bw)", "(d)/(bw)") if res.ratios[n] is not None]
    print("ratios (same run): " + ", ".join(shown))
    for key, rows in res.stages.items():
        kind = "device" if args.device.startswith("cuda") else "cpu"
        print(f"({key}) self {kind} time by op: " + ", ".join(
            f"{r['name']} {r['ms_per_call']:.2f} ms ({r['share']:.0%})" for r in rows))
    for t in res.targets:
        verdict = "SKIP" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        print(f"{verdict} [{res.topology}] (c) target {t['ratio']} {t['op']} {t['bound']:g}: {value}")


def scaling_table(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """(c), (d), (e), (f) medians for each agent count x topology, printed as a Markdown table."""
    rows = []
    cpu_w = device.type == "cuda"  # one more column: exact with W on the CPU (the host plan)
    print("\n| agents | topology | k r | exact (c) ms | " + ("exact, W on the CPU ms | " if cpu_w else "") +
          "randomized (d) ms | all-pairs Gram (e) ms | neighbor Gram (f) ms | (c)/(e) | (c)/(f) | (c)/(d) |")
    print("|---" * (11 if cpu_w else 10) + "|")
    for agents in args.scaling or [8, 16, 32]:
        sub = argparse.Namespace(**{**vars(args), "agents": agents})
        A, B = make_factors(sub, device)
        A_stack = A.reshape(args.modules, agents * args.r, args.n)
        B_stack = B.mT.reshape(args.modules, agents * args.r, args.m).contiguous()
        for topology in args.topology:
            W = mixing_matrix(build_graph(topology, agents)).to(device, svd_dtype(A.dtype))
            floors = floor_implementations(A_stack, B_stack, neighbor_rows(W, args.r))
            W_cpu = W.cpu()
            calls = [("c", lambda: consensus(A, B, W, args.rank, "exact", args))]
            if cpu_w:
                calls.append(("c_cpu_w", lambda: consensus(A, B, W_cpu, args.rank, "exact", args)))
            calls.append(("d", lambda: consensus(A, B, W, args.rank, "randomized", args)))
            med = {key: statistics.median(time_call(fn, device, args.repeats, args.warmup)[0]) * 1e3
                   for key, fn in calls}
            for key, ways in floors.items():
                med[key] = statistics.median(fastest(ways, device, args.repeats, args.warmup)[0]) * 1e3
            kr = int((W != 0).sum(1).max()) * args.r
            rows.append({"agents": agents, "topology": topology, "kr": kr, **{f"{k}_ms": v for k, v in med.items()}})
            print(f"| {agents} | {topology} | {kr} | {med['c']:.1f} | " +
                  (f"{med['c_cpu_w']:.1f} | " if cpu_w else "") +
                  f"{med['d']:.1f} | {med['e']:.2f} | {med['f']:.2f} | {med['c'] / med['e']:.1f} | "
                  f"{med['c'] / med['f']:.1f} | {med['c'] / med['d']:.1f} |")
    by = {(r["agents"], r["topology"]): r["c_ms"] for r in rows}
    for topology in args.topology:
        counts = sorted(a for a, t in by if t == topology)
        if len(counts) > 1:
            print(f"{topology}: exact {counts[-1]} agents / {counts[0]} agents = "
                  f"{by[(counts[-1], topology)] / by[(counts[0], topology)]:.2f}")
    return rows


def warm_heap() -> None:
    """Allocate, touch and free one 30 MiB block, as a training step's activations do. glibc's malloc
    then raises its mmap threshold to that size and its trim threshold to twice it (mallopt(3): the
    dynamic thresholds follow freed blocks up to 32 MiB), so the op's freed outputs and temporaries
    stay in the heap for reuse instead of being returned and faulted in again on the next call."""
    torch.empty(30 * 2**18).fill_(0.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # svd_lowrank draws its test matrix from the global generator
    info = machine_info(device)
    if args.warm_heap:
        warm_heap()
        info["warm_heap"] = "30 MiB freed before timing"
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if args.bandwidth is not None:
        bandwidth, bandwidth_note = args.bandwidth * 1e9, "given"
    else:
        bandwidth, bandwidth_note = copy_bandwidth(device, args.warmup), "measured copy"
    if args.scaling is not None:
        rows = scaling_table(args, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": vars(args), "machine": info, "scaling": rows}, f, indent=2)
        return
    A, B = make_factors(args, device)
    results = []
    for topology in args.topology:
        results.append(run_topology(topology, A, B, args, device, bandwidth, bandwidth_note))
        print_result(results[-1], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "machine": info, "bandwidth_bytes_per_s": bandwidth,
                       "results": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
