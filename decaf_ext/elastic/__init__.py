"""Elastic membership: who is live in each round (a churn schedule of joins, graceful leaves and crashes) and the
mixing matrix re-weighted on the live graph (Metropolis-Hastings rows each agent computes locally). Nothing here
moves bytes: the simulator and every transport share it (see docs/membership.md).

Example::

    >>> churn = ChurnSchedule.parse("join:5@3,leave:2@5,kill:3@6", 6)
    >>> churn.live(6), churn.joining(3)
    ((0, 1, 4, 5), (5,))
"""

from decaf_ext.elastic.live_graph import LiveMixing, joiner_row, live_adjacency, metropolis_row
from decaf_ext.elastic.schedule import ChurnSchedule

__all__ = ["ChurnSchedule", "LiveMixing", "joiner_row", "live_adjacency", "metropolis_row"]
