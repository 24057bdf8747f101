"""How many directions each agent's LoRA update B·A really uses: its effective rank, and the share of its energy
in its top k singular directions (does the update collapse into the smallest rank agents share?).

Singular values of B A (B [m, r], A [r, n]) come from an r x r core: with B = Q_B R_B and A^T = Q_A R_A (thin QR),
B A = Q_B (R_B R_A^T) Q_A^T, so svdvals(B A) = svdvals(R_B R_A^T); float64, no m x n product is formed.

Effective rank (Roy and Vetterli, 2007): exp(H(p)) with p_k = sigma_k / sum_l sigma_l, H the Shannon entropy
(0 log 0 = 0): 1 for a rank-one update, k for k equal singular values, never above the rank.

Example::

    >>> ranks, energy = update_spectrum(groups, top=2)   # float64 [N] each: mean effective rank over modules, and
    ...                                                  # the share of ||B_i A_i||^2 in each module's top 2 directions
"""

from __future__ import annotations

import torch

from decaf_ext.lora.factors import FactorGroup


def singular_values(group: FactorGroup) -> torch.Tensor:
    """float64 [M, N, min(r, m, n)]: singular values of every module's and agent's B A, descending."""
    A, B = group.A.detach().cpu().double(), group.B.detach().cpu().double()  # [M, N, r, n], [M, N, m, r]
    R_B = torch.linalg.qr(B, mode="r")[1]  # [M, N, min(m, r), r]
    R_A = torch.linalg.qr(A.mT, mode="r")[1]  # [M, N, min(n, r), r]
    return torch.linalg.svdvals(R_B @ R_A.mT)


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """exp(entropy of sigma / sum(sigma)) over the last axis of nonnegative `sigma` [..., k]; 0 where sigma is 0."""
    total = sigma.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, sigma / total, torch.zeros_like(sigma))
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy))


def update_spectrum(groups: list[FactorGroup], top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per agent, float64 [N] each: (mean over the modules with B A != 0 of the effective rank of B A, or NaN when
    every module's B A is 0; share of sum over modules ||B A||_F^2 that lies in each module's `top` largest
    singular directions, NaN when it is all 0)."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    ranks, counted, energy_top, energy = (torch.zeros(groups[0].n_agents, dtype=torch.float64) for _ in range(4))
    for group in groups:
        sigma = singular_values(group)  # [M, N, k]
        ranks += effective_rank(sigma).sum(dim=0)
        counted += (sigma.amax(dim=-1) > 0).sum(dim=0)
        energy_top += sigma[..., :top].square().sum(dim=(0, 2))
        energy += sigma.square().sum(dim=(0, 2))
    return ranks / counted, energy_top / energy
