"""decaf_ext: decentralized LoRA fine-tuning with DeCAF (consensus on products + truncated SVD).

The compiled kernels are exposed as ``consensus_tsvd``, ``weighted_product_sum`` and ``tsvd``; the simulator as
``Trainer`` and ``TrainConfig``; your own loop's averager as ``DecentralizedAverager`` / ``DecentralizedCallback``;
strategies through ``register_strategy`` / ``get_strategy``. The package map is in docs/architecture.md. Every name is imported on first use, so ``import decaf_ext`` stays light
(no torch until a name that needs it is touched).

Example::

    from decaf_ext import TrainConfig, Trainer
    summary = Trainer(TrainConfig(algorithm="dlora", rounds=2)).run()
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "CUDA_COMPILED": "decaf_ext.ops", "consensus_tsvd": "decaf_ext.ops", "tsvd": "decaf_ext.ops",
    "weighted_product_sum": "decaf_ext.ops", "TrainConfig": "decaf_ext.config", "ConfigError": "decaf_ext.errors",
    "Trainer": "decaf_ext.sim", "register_strategy": "decaf_ext.strategies", "get_strategy": "decaf_ext.strategies",
    "DecentralizedAverager": "decaf_ext.integrations", "DecentralizedCallback": "decaf_ext.integrations",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'decaf_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
