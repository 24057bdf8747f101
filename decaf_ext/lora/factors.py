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
Extras = dict[str, torch.Tensor]  # trainable parameters that are not LoRA factors (a head), by name: [N, ...]


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


def select_agent(groups: list[FactorGroup], extras: Extras, k: int) -> tuple[list[FactorGroup], Extras]:
    """Agent `k`'s slice of stacked groups (A [M, N, r, n], B [M, N, m, r]) and extras [N, ...], keeping the agent
    axis: A [M, 1, r, n], B [M, 1, m, r], extras [1, ...]."""
    return ([FactorGroup(g.names, g.A[:, k:k + 1], g.B[:, k:k + 1]) for g in groups],
            {name: x[k:k + 1] for name, x in extras.items()})


def stack_agents(agents: list[tuple[list[FactorGroup], Extras]]) -> tuple[list[FactorGroup], Extras]:
    """Inverse of :func:`select_agent` over every agent: one (groups, extras) per agent -> stacked along the agent
    axis (A [M, N, r, n], B [M, N, m, r], extras [N, ...])."""
    first_groups, first_extras = agents[0]
    return ([FactorGroup(g.names, torch.cat([a[0][m].A for a in agents], dim=1),
                         torch.cat([a[0][m].B for a in agents], dim=1)) for m, g in enumerate(first_groups)],
            {name: torch.cat([a[1][name] for a in agents]) for name in first_extras})


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
