"""The mixing error: how far each agent's new LoRA product, after a strategy's mixing step, is from the exact
product consensus of what it received (the mechanism DeCAF and DLoRA differ in).

For output agent i of one call ``strategy.communicate(inputs, extras, W)`` and each adapted module:

    M_i = sum_j W_ij B_j A_j          (the exact consensus of the received products)
    P_i = B_i' A_i'                   (the product agent i holds after the round)

DLoRA's P_i = (sum_j W_ij B_j)(sum_j W_ij A_j), DeCAF's P_i = the rank-r truncation of M_i, DLoRA-FA's (A
shared) P_i = M_i, FedAvg's P_i = the plain means' product against the plain mean of products (its W is the
uniform row). M_i - P_i is a sum of rank-one terms b_c a_c^T over the K = N_in r + N_out r' columns of the stacked
inputs' and outputs' factors, with coefficients c (W_ij for input j's columns, -1 for output i's), so
||M_i - P_i||_F^2 = c^T (G_B * G_A) c with the K x K Gram matrices G_B = [B ...]^T [B ...] and G_A of the A^T's
(elementwise product): float64, no m x n product is formed. The quadratic form cannot resolve an error below
about 1e-8 of ||M_i||_F (cancellation; a negative rounding result counts 0), under the float32 rounding of the
factors themselves (about 1e-7).

Example::

    >>> squared_error, squared_reference = mixing_residuals(groups, W, mixed)   # float64 [N_out] each
    >>> mixing_error(groups, W, mixed)      # sqrt(squared_error / squared_reference), 0 where both are 0
    >>> tally = new_mixing_tally(len(W)); add_mixing(tally[0], squared_error[0].item(), squared_reference[0].item())
"""

from __future__ import annotations

import torch

from decaf_ext.lora.factors import FactorGroup


def mixing_residuals(inputs: list[FactorGroup], W: torch.Tensor, outputs: list[FactorGroup]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over modules ||M_i - P_i||_F^2, sum over modules ||M_i||_F^2), float64 [N_out] each.

    inputs: groups A [M, N_in, r, n], B [M, N_in, m, r] (what the agents mixed); W: [N_out, N_in], the weights
    of the call (output agent i's row); outputs: the same modules, A [M, N_out, r', n], B [M, N_out, m, r'] (the
    factors each output agent holds afterwards; r' may differ from r).
    """
    W = W.detach().to(device="cpu", dtype=torch.float64)
    n_out, n_in = W.shape
    squared_error = torch.zeros(n_out, dtype=torch.float64)
    squared_reference = torch.zeros(n_out, dtype=torch.float64)
    for given, held in zip(inputs, outputs, strict=True):
        if given.n_agents != n_in or held.n_agents != n_out or given.names != held.names:
            raise ValueError(f"inputs/outputs: modules {given.names} / {held.names} of {given.n_agents} / "
                             f"{held.n_agents} agents do not fit W of shape {list(W.shape)}")
        A, B = given.A.detach().cpu().double(), given.B.detach().cpu().double()  # [M, N_in, r, n], [M, N_in, m, r]
        A2, B2 = held.A.detach().cpu().double(), held.B.detach().cpu().double()
        r, r2 = A.shape[2], A2.shape[2]
        columns = torch.cat([B.permute(0, 2, 1, 3).flatten(2), B2.permute(0, 2, 1, 3).flatten(2)], dim=2)
        rows = torch.cat([A.flatten(1, 2), A2.flatten(1, 2)], dim=1)  # [M, K, n]
        gram = (columns.mT @ columns) * (rows @ rows.mT)  # [M, K, K]: <b_c, b_d> <a_c, a_d>
        given_part = W.repeat_interleave(r, dim=1)  # [N_out, N_in r]: M_i's coefficients
        held_part = -torch.eye(n_out, dtype=torch.float64).repeat_interleave(r2, dim=1)  # [N_out, N_out r']: -P_i's
        both = torch.cat([given_part, held_part], dim=1)
        padded = torch.cat([given_part, torch.zeros_like(held_part)], dim=1)
        squared_error += torch.einsum("ok,mkl,ol->o", both, gram, both).clamp_min(0)
        squared_reference += torch.einsum("ok,mkl,ol->o", padded, gram, padded).clamp_min(0)
    return squared_error, squared_reference


def relative(squared_error: torch.Tensor, squared_reference: torch.Tensor) -> torch.Tensor:
    """sqrt(squared_error / squared_reference) elementwise: 0 where both are 0, inf where only the reference is."""
    ratio = squared_error / squared_reference
    return torch.where(squared_error == 0, torch.zeros_like(ratio), ratio).sqrt()


def mixing_error(inputs: list[FactorGroup], W: torch.Tensor, outputs: list[FactorGroup]) -> torch.Tensor:
    """float64 [N_out]: ||M_i - P_i||_F / ||M_i||_F over all modules stacked (so a module weighs by ||M_i||^2);
    see :func:`mixing_residuals` for the arguments."""
    return relative(*mixing_residuals(inputs, W, outputs))


def new_mixing_tally(agents: int) -> list[list[float]]:
    """An empty tally for `agents` agents (JSON-serializable, kept in a runtime's counters and checkpoints): per
    agent [sum of ||M_i - P_i||^2, sum of ||M_i||^2, rounds mixed] since the last evaluation."""
    return [[0.0, 0.0, 0] for _ in range(agents)]


def add_mixing(tally: list[float], squared_error: float, squared_reference: float) -> None:
    """Add one round's :func:`mixing_residuals` of one agent to its row of a tally (in place)."""
    tally[0] += squared_error
    tally[1] += squared_reference
    tally[2] += 1
