"""Decentralized LoRA in a training loop you already have: :class:`DecentralizedAverager` after each optimizer
step, or :class:`DecentralizedCallback` in a Hugging Face ``Trainer``."""

from decaf_ext.integrations.averager import DecentralizedAverager
from decaf_ext.integrations.hf_callback import DecentralizedCallback

__all__ = ["DecentralizedAverager", "DecentralizedCallback"]
