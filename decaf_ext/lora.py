"""Glue between peft LoRA models and the stacked factor tensors the strategies mix.

Each agent holds a peft model (``peft.get_peft_model(model, LoraConfig(...))``). An adapted module carries
``lora_A[adapter].weight`` A: [r, n] and ``lora_B[adapter].weight`` B: [m, r]; its update is
``s * B @ A`` with peft's scaling s (alpha / r). When every agent has the same rank, s is the same on every
agent, so mixing and consensus on ``B @ A`` ignore it: it multiplies every agent's product alike and commutes
with the mix. Agents with different ranks share one layout through :class:`RankPadding`: factors zero-padded
to the largest rank, with each agent's own scale folded in.

Modules are visited in ``named_modules`` order. Modules of identical shape (r, n, m) form one
:class:`FactorGroup`, so a strategy mixes a whole group with one batched call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

DEFAULT_ADAPTER = "default"


@dataclass
class FactorGroup:
    """LoRA factors of M same-shaped modules on N agents.

    names: the M module names (``named_modules`` names, identical on every agent).
    A: [M, N, r, n]; B: [M, N, m, r].
    """

    names: list[str]
    A: torch.Tensor
    B: torch.Tensor

    @property
    def n_agents(self) -> int:
        """N, the number of agents stacked in the group."""
        return self.A.shape[1]

    @property
    def rank(self) -> int:
        """r, the LoRA rank shared by the group's modules."""
        return self.A.shape[2]


@dataclass(frozen=True)
class RankPadding:
    """How agents whose LoRA ranks differ share one stacked layout (the runtime passes it to
    :func:`collect_factors` and :func:`write_factors`; None when every agent has the same rank).

    Collecting zero-pads every agent's factors to `rank` (the largest rank) and folds in the agent's own
    scale s_i (peft's ``scaling``, alpha / r_i): A_i, B_i -> sqrt(s_i) A_i, sqrt(s_i) B_i, so that B A is the
    update the agent applies, comparable across ranks. With frozen_A (A shared and not trained, as in
    dlora_fa) the whole scale goes on B: A_i, s_i B_i. Writing back keeps each agent's leading r_i directions
    and divides its scale out again. A strategy therefore mixes true updates: DeCAF's M_i = sum_j W_ij s_j B_j A_j
    truncated to the receiver's rank; DLoRA, DLoRA-FA and FedAvg average the padded factors and truncate.
    """

    rank: int
    frozen_A: bool = False
    scaled: bool = True  # False: padding only, the raw factors (checkpoints: exact round trip)

    def scales(self, scale: float) -> tuple[float, float]:
        """(factor on A, factor on B) folding an agent's update scale into its stacked factors."""
        if not self.scaled:
            return 1.0, 1.0
        return (1.0, scale) if self.frozen_A else (math.sqrt(scale), math.sqrt(scale))


class LoraModule(NamedTuple):
    """One adapted module of one agent: its name, lora_A and lora_B linears and update scale (alpha / r)."""

    name: str
    lora_a: nn.Linear
    lora_b: nn.Linear
    scale: float


def lora_modules(model: nn.Module, adapter_name: str) -> list[LoraModule]:
    """Every LoRA layer carrying `adapter_name`, in ``named_modules`` order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
            if lora_a.weight.dim() != 2 or lora_b.weight.dim() != 2:
                raise ValueError(f"models: LoRA module {name!r} has non-matrix factors (only linear LoRA is supported)")
            found.append(LoraModule(name, lora_a, lora_b, float(module.scaling[adapter_name])))
    return found


def _check_agents_agree(layouts: list[list[tuple]], what: str) -> None:
    """ValueError unless there is at least one agent and every agent's layout equals agent 0's."""
    if not layouts:
        raise ValueError("models must hold at least one agent's model")
    for i, layout in enumerate(layouts[1:], start=1):
        if layout != layouts[0]:
            raise ValueError(f"models: agent {i} has different {what} than agent 0")


def _agent_modules(models: Sequence[nn.Module], adapter_name: str, padding: RankPadding | None = None
                   ) -> list[list[LoraModule]]:
    """LoRA modules of every agent, checked to have the same names and shapes on every agent (with `padding`:
    the same names and (n, m), every rank at most padding.rank)."""
    per_agent = [lora_modules(model, adapter_name) for model in models]
    if padding is None:
        layouts = [[(m.name, m.lora_a.weight.shape, m.lora_b.weight.shape) for m in modules] for modules in per_agent]
    else:
        layouts = [[(m.name, m.lora_a.weight.shape[1], m.lora_b.weight.shape[0]) for m in modules]
                   for modules in per_agent]
        for i, modules in enumerate(per_agent):
            for m in modules:
                if m.lora_a.weight.shape[0] > padding.rank:
                    raise ValueError(f"models: agent {i}'s LoRA module {m.name!r} has rank "
                                     f"{m.lora_a.weight.shape[0]} > the padded rank {padding.rank}")
    _check_agents_agree(layouts, "LoRA modules or shapes")
    if not per_agent[0]:
        raise ValueError(f"models: no LoRA layer carries adapter_name={adapter_name!r}")
    return per_agent


def _stacked(module: LoraModule, padding: RankPadding | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One agent's A [r, n] and B [m, r] of `module` as stacked: detached weights, or padded and scaled."""
    A, B = module.lora_a.weight.detach(), module.lora_b.weight.detach()
    if padding is None:
        return A, B
    a_scale, b_scale = padding.scales(module.scale)
    r = A.shape[0]
    padded_A, padded_B = A.new_zeros(padding.rank, A.shape[1]), B.new_zeros(B.shape[0], padding.rank)
    padded_A[:r], padded_B[:, :r] = A * a_scale, B * b_scale
    return padded_A, padded_B


def collect_factors(models: Sequence[nn.Module], *, adapter_name: str = DEFAULT_ADAPTER,
                    padding: RankPadding | None = None) -> list[FactorGroup]:
    """Snapshot every agent's LoRA factors, stacked and grouped by shape (r, n, m).

    Groups come in order of first appearance; names within a group in ``named_modules`` order.
    Returns detached copies: A [M, N, r, n], B [M, N, m, r] per group (r = padding.rank with `padding`).
    """
    per_agent = _agent_modules(models, adapter_name, padding)
    slots: dict[tuple[int, int, int], list[int]] = {}
    for k, module in enumerate(per_agent[0]):
        r, n = module.lora_a.weight.shape
        slots.setdefault((r if padding is None else padding.rank, n, module.lora_b.weight.shape[0]), []).append(k)
    groups = []
    for indices in slots.values():
        stacked = [[_stacked(modules[k], padding) for modules in per_agent] for k in indices]
        groups.append(FactorGroup(names=[per_agent[0][k].name for k in indices],
                                  A=torch.stack([torch.stack([A for A, _ in agents]) for agents in stacked]),
                                  B=torch.stack([torch.stack([B for _, B in agents]) for agents in stacked])))
    return groups


@torch.no_grad()
def write_factors(models: Sequence[nn.Module], groups: list[FactorGroup], *, adapter_name: str = DEFAULT_ADAPTER,
                  padding: RankPadding | None = None) -> None:
    """Copy the groups' factors into every agent's LoRA weights in place (dtype/device of the weights kept).

    With `padding` (as collected): each agent keeps the leading r_i rows of A and columns of B, its scale
    divided out."""
    per_agent = [{m.name: m for m in modules} for modules in _agent_modules(models, adapter_name, padding)]
    for group in groups:
        if group.n_agents != len(models):
            raise ValueError(f"groups: {group.n_agents} agents stacked but {len(models)} models given")
        for k, name in enumerate(group.names):
            for i, modules in enumerate(per_agent):
                if name not in modules:
                    raise ValueError(f"groups: module {name!r} is not a LoRA module of agent {i}")
                module = modules[name]
                A, B = group.A[k, i], group.B[k, i]
                if padding is not None:
                    r = module.lora_a.weight.shape[0]
                    a_scale, b_scale = padding.scales(module.scale)
                    A, B = A[:r] / a_scale, B[:, :r] / b_scale
                if A.shape != module.lora_a.weight.shape or B.shape != module.lora_b.weight.shape:
                    raise ValueError(f"groups: factor shapes of {name!r} do not match the model's LoRA weights")
                module.lora_a.weight.copy_(A)
                module.lora_b.weight.copy_(B)


def _extra_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Trainable parameters of `model` that are not the adapter's LoRA factors, by parameter name."""
    factor_ids = {id(w) for m in lora_modules(model, adapter_name) for w in (m.lora_a.weight, m.lora_b.weight)}
    return {
        name: param
        for name, param in model.named_parameters()
        if param.requires_grad and id(param) not in factor_ids
    }


def _agent_extras(models: Sequence[nn.Module], adapter_name: str) -> list[dict[str, nn.Parameter]]:
    """Extra parameters of every agent, checked to have the same names and shapes on every agent."""
    per_agent = [_extra_parameters(model, adapter_name) for model in models]
    _check_agents_agree([[(name, p.shape) for name, p in extras.items()] for extras in per_agent],
                        "trainable non-LoRA parameters")
    return per_agent


def collect_extras(models: Sequence[nn.Module], *, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """Snapshot every trainable parameter that is not a LoRA factor (e.g. the classifier head peft keeps in
    ``modules_to_save``), keyed by parameter name and stacked over agents as [N, ...] (detached copies)."""
    per_agent = _agent_extras(models, adapter_name)
    return {name: torch.stack([extras[name].detach() for extras in per_agent]) for name in per_agent[0]}


@torch.no_grad()
def write_extras(
    models: Sequence[nn.Module], extras: dict[str, torch.Tensor], *, adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Copy stacked extras [N, ...] back into every agent's parameters in place."""
    per_agent = _agent_extras(models, adapter_name)
    for name, stacked in extras.items():
        if name not in per_agent[0]:
            raise ValueError(f"extras: {name!r} is not a trainable non-LoRA parameter of the models")
        if stacked.shape != (len(models), *per_agent[0][name].shape):
            raise ValueError(f"extras: {name!r} has shape {tuple(stacked.shape)}, expected "
                             f"{(len(models), *per_agent[0][name].shape)}")
        for i, params in enumerate(per_agent):
            params[name].copy_(stacked[i])


@torch.no_grad()
def share_and_freeze_A(models: Sequence[nn.Module], seed: int, *, adapter_name: str = DEFAULT_ADAPTER,
                       rank: int | None = None) -> None:
    """Give every agent the same A for every LoRA module and freeze it (requires_grad False).

    A is drawn like peft's default LoRA init (Kaiming uniform, a = sqrt(5)) from a generator seeded with
    `seed`, module by module in ``named_modules`` order, at `rank` rows (default: the largest rank among the
    models; every agent must draw at the same rank); an agent of rank r_i takes the leading r_i rows. Call it
    before building the optimizers.
    """
    ranks = [m.lora_a.weight.shape[0] for model in models for m in lora_modules(model, adapter_name)]
    rank = rank or max(ranks, default=1)
    if ranks and max(ranks) > rank:
        raise ValueError(f"rank: the models hold LoRA rank {max(ranks)} > rank={rank}")
    per_agent = _agent_modules(models, adapter_name, RankPadding(rank, frozen_A=True))
    generator = torch.Generator().manual_seed(seed)
    for k, module in enumerate(per_agent[0]):
        shared = torch.empty(rank, module.lora_a.weight.shape[1], dtype=torch.float32)
        nn.init.kaiming_uniform_(shared, a=math.sqrt(5), generator=generator)
        for modules in per_agent:
            weight = modules[k].lora_a.weight
            weight.copy_(shared[:weight.shape[0]])
            weight.requires_grad_(False)


def _centred_cores(group: FactorGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Agent 0's factors and every agent's offsets from them, in one orthonormal basis per module (float64).

    With [B_0, B_0 - B_0, B_1 - B_0, ..., B_{N-1} - B_0] = Q_B [F_0, F_1, ..., F_N] and likewise
    [A_0; A_0 - A_0; ...]^T = Q_A [G_0, ..., G_N] (QR), any sum of products of these factors is Q_B (core) Q_A^T with
    a core built from the F's and G's, of the same Frobenius norm: no m x n matrix is ever formed, and identical
    agents give exactly zero offsets. Returns F [M, N + 1, k, r] and G [M, N + 1, k', r] (k, k' <= (N + 1) r;
    index 0: agent 0's factors, index 1 + i: agent i's offsets).
    """
    A, B = group.A.double(), group.B.double()  # [M, N, r, n], [M, N, m, r]
    M, N, r = A.shape[:3]
    columns = torch.cat([B[:, :1], B - B[:, :1]], dim=1).permute(0, 2, 1, 3).reshape(M, B.shape[2], (N + 1) * r)
    rows = torch.cat([A[:, :1], A - A[:, :1]], dim=1).reshape(M, (N + 1) * r, A.shape[3]).transpose(1, 2)
    F = torch.linalg.qr(columns, mode="r")[1].unflatten(-1, (N + 1, r)).movedim(-2, 1)
    G = torch.linalg.qr(rows, mode="r")[1].unflatten(-1, (N + 1, r)).movedim(-2, 1)
    return F, G


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """sum over modules of numerator / denominator, a module with denominator 0 counting 0."""
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(numerator)).sum().item()


def consensus_error(groups: list[FactorGroup]) -> float:
    """Disagreement of the agents' LoRA products, summed over modules.

    Per module: mean_i ||B_i A_i - P̄||_F / ||P̄||_F with P̄ = mean_j B_j A_j (a module counts 0 when
    P̄ = 0). Computed in float64 on (N + 1) r-sized cores (:func:`_centred_cores`), never on m x n products, so it
    fits models whose dense products would not (LLaMA-2-7B with 10 agents: 86 GB).
    """
    total = 0.0
    for group in groups:
        F, G = _centred_cores(group)
        base, Gt = F[:, :1] @ G[:, :1].mT, G.mT
        offsets = F[:, 1:] @ Gt[:, :1] + F[:, :1] @ Gt[:, 1:] + F[:, 1:] @ Gt[:, 1:]  # B_i A_i - B_0 A_0
        mean_offset = offsets.mean(dim=1, keepdim=True)
        spread = torch.linalg.matrix_norm(offsets - mean_offset).mean(dim=1)
        total += _ratio(spread, torch.linalg.matrix_norm(base + mean_offset)[:, 0])
    return total


def _product_inner(left: list[FactorGroup], right: list[FactorGroup]) -> torch.Tensor:
    """float64 [N]: sum over modules of <B_i A_i, B'_i A'_i>_F per agent, from r x r matrices (no m x n product
    is formed): <B A, B' A'> = trace((B^T B') (A' A^T))."""
    total = torch.zeros((), dtype=torch.float64)
    for g, h in zip(left, right, strict=True):
        A, B, A2, B2 = g.A.double(), g.B.double(), h.A.double(), h.B.double()
        total = total + ((B.transpose(-1, -2) @ B2) * (A @ A2.transpose(-1, -2))).sum(dim=(-1, -2)).sum(dim=0)
    return total


def product_norm(groups: list[FactorGroup]) -> torch.Tensor:
    """float64 [N]: sqrt(sum over modules ||B_i A_i||_F^2) per agent."""
    return _product_inner(groups, groups).clamp_min(0).sqrt()


def product_distance(left: list[FactorGroup], right: list[FactorGroup]) -> torch.Tensor:
    """float64 [N]: sqrt(sum over modules ||B_i A_i - B'_i A'_i||_F^2) per agent (same modules and agents)."""
    squared = _product_inner(left, left) + _product_inner(right, right) - 2 * _product_inner(left, right)
    return squared.clamp_min(0).sqrt()


def consensus_interference(groups: list[FactorGroup]) -> float:
    """How far averaging the factors separately is from averaging the products, summed over modules.

    Per module: ||mean_i B_i A_i - (mean_i B_i)(mean_i A_i)||_F / ||mean_i B_i A_i||_F (a module counts 0 when
    mean_i B_i A_i = 0): the error DLoRA's separate averaging of A [M, N, r, n] and B [M, N, m, r] would make
    on these factors, relative to the true mean product. With offsets b_i = B_i - B_0, a_i = A_i - A_0 the gap is
    mean_i b_i a_i - (mean_i b_i)(mean_i a_i); float64, on the cores of :func:`_centred_cores`.
    """
    total = 0.0
    for group in groups:
        F, G = _centred_cores(group)
        Gt = G.mT
        own = F[:, 1:] @ Gt[:, 1:]  # b_i a_i
        mean_product = F[:, 0] @ Gt[:, 0] + (F[:, 1:] @ Gt[:, :1] + F[:, :1] @ Gt[:, 1:] + own).mean(dim=1)
        gap = own.mean(dim=1) - F[:, 1:].mean(dim=1) @ Gt[:, 1:].mean(dim=1)
        total += _ratio(torch.linalg.matrix_norm(gap), torch.linalg.matrix_norm(mean_product))
    return total
