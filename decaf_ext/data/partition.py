"""How a training set is split over agents (iid, Dirichlet label skew, label shards, few-shot), and the
per-agent label histograms that show it.

Example::

    >>> parts = partition(labels, 10, "dirichlet", alpha=0.5, seed=0)   # 10 int64 index arrays
"""

from __future__ import annotations

import numpy as np

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "few_shot")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be a non-empty 1-D array of nonnegative integer class ids")
    return labels.astype(np.int64)


def _dirichlet(labels: np.ndarray, n_agents: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, shares q ~ Dirichlet(alpha * 1) of its shuffled examples; then every empty agent takes
    one random example from the currently largest agent (rebalance, so no agent is empty)."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(n_agents, alpha)))[:-1] * len(members)).astype(np.int64)
        for agent, chunk in enumerate(np.split(members, cuts)):
            chunks[agent].append(chunk)
    parts = [np.concatenate(c) for c in chunks]
    for agent in range(n_agents):
        if len(parts[agent]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            taken = rng.integers(len(parts[donor]))
            parts[agent] = parts[donor][taken : taken + 1]
            parts[donor] = np.delete(parts[donor], taken)
    return parts


def _shards(labels: np.ndarray, n_agents: int, shards: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Examples sorted by label (random order inside a class), cut into n_agents * shards contiguous
    shards; each agent gets `shards` shards drawn at random."""
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, n_agents * shards)
    owners = rng.permutation(n_agents * shards).reshape(n_agents, shards)
    return [np.concatenate([pieces[s] for s in row]) for row in owners]


def _few_shot(labels: np.ndarray, n_agents: int, shots: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`shots` distinct examples of every class per agent; the rest is left unassigned."""
    classes, counts = np.unique(labels, return_counts=True)
    if n_agents * shots > counts.min():
        raise ValueError(
            f"shots={shots} x n_agents={n_agents} exceeds the smallest class "
            f"(class {classes[counts.argmin()]} has {counts.min()} examples)"
        )
    per_class = [
        rng.permutation(np.flatnonzero(labels == c))[: n_agents * shots].reshape(n_agents, shots) for c in classes
    ]
    return [np.concatenate([block[agent] for block in per_class]) for agent in range(n_agents)]


def partition(
    labels: np.ndarray,
    n_agents: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    shards: int = 2,
    shots: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Sorted int64 indices into `labels` (int [n]) for each of n_agents agents; no agent empty, seeded.

    iid: a random split into near-equal parts. dirichlet: label skew, smaller `alpha` = more skew
    (empty agents are rebalanced, see ``_dirichlet``). shards: `shards` label-sorted shards per agent.
    few_shot: `shots` examples per class per agent. Every example goes to exactly one agent, except in
    few_shot, where each goes to at most one.
    """
    labels = _check_labels(labels)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(n_agents, (int, np.integer)) or n_agents < 1:
        raise ValueError(f"n_agents must be a positive int, got {n_agents!r}")
    if n_agents > len(labels):
        raise ValueError(f"n_agents={n_agents} exceeds the number of examples ({len(labels)})")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), n_agents)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        parts = _dirichlet(labels, n_agents, alpha, rng)
    elif scheme == "shards":
        if not isinstance(shards, (int, np.integer)) or shards < 1 or n_agents * shards > len(labels):
            limit = len(labels) // n_agents
            raise ValueError(f"shards must be an int in [1, n_examples / n_agents = {limit}], got {shards!r}")
        parts = _shards(labels, n_agents, shards, rng)
    else:
        if not isinstance(shots, (int, np.integer)) or shots < 1:
            raise ValueError(f"shots must be a positive int for scheme 'few_shot', got {shots!r}")
        parts = _few_shot(labels, n_agents, shots, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """int64 [n_agents, n_classes]: how many examples of each class every agent holds."""
    labels = _check_labels(labels)
    if labels.max() >= n_classes:
        raise ValueError(f"n_classes={n_classes} is not above the largest label {labels.max()}")
    return np.stack([np.bincount(labels[part], minlength=n_classes) for part in parts]).astype(np.int64)


def format_histograms(hist: np.ndarray, label_names: list[str]) -> str:
    """Text table of hist [n_agents, n_classes]: one row per agent plus a total row and column."""
    hist = np.asarray(hist)
    if hist.ndim != 2 or hist.shape[1] != len(label_names):
        raise ValueError(f"hist must have shape [n_agents, {len(label_names)}], got {list(hist.shape)}")
    header = ["agent", *label_names, "total"]
    rows = [[str(agent), *map(str, row), str(row.sum())] for agent, row in enumerate(hist)]
    rows.append(["total", *map(str, hist.sum(axis=0)), str(hist.sum())])
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])
