"""The compiled operators: DeCAF's consensus + truncated SVD (``consensus_tsvd``), a batched randomized SVD
(``tsvd``) and the dense consensus product (``weighted_product_sum``), with fake kernels for torch.compile;
:mod:`decaf_ext.ops.reference` holds the float64 references they are tested against."""

from decaf_ext.ops.consensus import CUDA_COMPILED, consensus_tsvd, tsvd, weighted_product_sum

__all__ = ["CUDA_COMPILED", "consensus_tsvd", "tsvd", "weighted_product_sum"]
