"""One process per agent on torch.distributed: the agent runtime and the one-machine launcher
(``python -m decaf_ext.distributed --nproc N``, or torchrun)."""

from decaf_ext.distributed.launcher import launch
from decaf_ext.distributed.runtime import AgentRuntime, DistributedOptions, run_distributed

__all__ = ["AgentRuntime", "DistributedOptions", "launch", "run_distributed"]
