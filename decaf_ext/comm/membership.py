"""Graceful departures and late arrivals on the control plane (the run's store, through
:class:`~decaf_ext.comm.control_store.ControlStore`): an agent that leaves writes ``leave/<agent>`` (the first
round it no longer takes part in), and the transport neither waits for it nor admits it from that round on; a
joiner waits for the run to have started before it enters. The record is signed like every store value.

Example::

    >>> transport.leave(5)                          # agent 2's transport: it takes part in rounds 0..4 only
    >>> departed(control, 6, 5)
    {2}
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial

import torch.distributed as dist

from decaf_ext.comm.control_store import ControlStore
from decaf_ext.comm.round_view import parse_record


def departed(control: ControlStore, n_agents: int, round_index: int) -> set[int]:
    """The agents that announced leaving at or before round `round_index`."""
    parse = partial(parse_record, needs_round=True)
    records = {j: control.get(f"leave/{j}", parse) for j in range(n_agents)}
    return {j for j, record in records.items() if record is not None and record["round"] <= round_index}


def wait_for(store: dist.Store, key: str, seconds: float) -> bool:
    """Whether `key` exists in `store` within `seconds`."""
    try:
        store.wait([key], timedelta(seconds=seconds))
    except dist.DistStoreError:
        return False
    return True
