"""Differential privacy of each agent's local training: DP-SGD through Opacus, one accountant per agent.

Everything an agent sends (factors, extras, evaluation buffers) is computed from its DP-SGD outputs only, so
its (epsilon, delta) guarantee for one of its training examples holds whatever strategy, transport or message
dtype carries them (post-processing); see docs/privacy.md for what is and is not protected.

Example::

    >>> check_privacy(config)                       # one-line ConfigError for bad dp_* options, before training
    >>> private = PrivateAgent(model, optimizer, indices, budget=DPBudget(3.0, None, 1.0), batch_size=16,
    ...                        steps=50, device=torch.device("cpu"))
    >>> loss = private.step(lambda examples: task.loss(model, task.batch(train_set, examples, device)))
    >>> private.epsilon()                           # spent so far, by Opacus's accountant
"""

from decaf_ext.privacy.dp_sgd import PrivateAgent, private_agents
from decaf_ext.privacy.options import ACCOUNTANTS, DPBudget, check_privacy

__all__ = ["ACCOUNTANTS", "DPBudget", "PrivateAgent", "check_privacy", "private_agents"]
