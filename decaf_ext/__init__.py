"""decaf_ext: decentralized LoRA fine-tuning with DeCAF (consensus on products + truncated SVD).

The compiled kernels are exposed as ``consensus_tsvd``, ``weighted_product_sum`` and ``tsvd``.
"""
from .ops import CUDA_COMPILED, consensus_tsvd, tsvd, weighted_product_sum

__all__ = ["CUDA_COMPILED", "consensus_tsvd", "tsvd", "weighted_product_sum"]
__version__ = "0.1.0"
