"""LoRA adapters as the strategies see them: peft models <-> stacked factor tensors (one
:class:`FactorGroup` per module shape, :class:`RankPadding` for unequal ranks), and the consensus metrics
computed on those factors."""

from decaf_ext.lora.factors import DEFAULT_ADAPTER, Extras, FactorGroup, RankPadding, collect_extras, collect_factors, \
    lora_modules, select_agent, share_and_freeze_A, stack_agents, write_extras, write_factors
from decaf_ext.lora.metrics import consensus_error, consensus_interference, product_distance, product_norm

__all__ = ["DEFAULT_ADAPTER", "Extras", "FactorGroup", "RankPadding", "collect_extras", "collect_factors", "consensus_error",
           "consensus_interference", "lora_modules", "product_distance", "product_norm", "select_agent", "share_and_freeze_A",
           "stack_agents", "write_extras", "write_factors"]
