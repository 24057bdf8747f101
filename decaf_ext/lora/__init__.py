"""LoRA adapters as the strategies see them: peft models <-> stacked factor tensors (one
:class:`FactorGroup` per module shape, :class:`RankPadding` for unequal ranks), and the consensus metrics
computed on those factors: the mixing error of a round (:mod:`decaf_ext.lora.mixing`) and the spectrum of each
update (:mod:`decaf_ext.lora.spectrum`)."""

from decaf_ext.lora.factors import DEFAULT_ADAPTER, Extras, FactorGroup, RankPadding, collect_extras, collect_factors, \
    lora_modules, select_agent, share_and_freeze_A, stack_agents, write_extras, write_factors
from decaf_ext.lora.metrics import consensus_error, consensus_interference, product_distance, product_norm
from decaf_ext.lora.mixing import add_mixing, mixing_error, mixing_residuals, new_mixing_tally
from decaf_ext.lora.spectrum import effective_rank, update_spectrum

__all__ = ["DEFAULT_ADAPTER", "Extras", "FactorGroup", "RankPadding", "add_mixing", "collect_extras", "collect_factors",
           "consensus_error", "consensus_interference", "effective_rank", "lora_modules", "mixing_error",
           "mixing_residuals", "new_mixing_tally", "product_distance", "product_norm", "select_agent",
           "share_and_freeze_A", "stack_agents", "update_spectrum", "write_extras", "write_factors"]
