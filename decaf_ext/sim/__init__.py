"""The simulator: N agents in one process on one device, trained round by round (:class:`Trainer`)."""

from decaf_ext.sim.trainer import Trainer

__all__ = ["Trainer"]
