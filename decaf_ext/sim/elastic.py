"""The simulator's rounds under a churn schedule (``--churn``): only the live agents train, each present agent
(live or joining) mixes in its own row form as an agent process does (:func:`~decaf_ext.comm.agent_round.
round_inputs` on :class:`~decaf_ext.elastic.LiveMixing`'s W), and evaluations cover the present agents only, so
a simulated run gives the numbers of the same run in processes (docs/membership.md).

Example::

    >>> rounds = ElasticRounds(agents, ChurnSchedule.parse("join:5@3,leave:2@5", 6))
    >>> rounds.local_round(3); rounds.communicate(3)    # agent 5 listens in round 3
    >>> rounds.evaluate(4)["live"]
    [0, 1, 2, 3, 4, 5]
"""

from __future__ import annotations

from typing import Any

import torch

from decaf_ext.comm.agent_round import output_index, round_inputs
from decaf_ext.elastic import ChurnSchedule, LiveMixing
from decaf_ext.lora import Extras, FactorGroup, collect_extras, new_mixing_tally, select_agent, stack_agents, \
    write_extras
from decaf_ext.sim.agents import Agents
from decaf_ext.sim.evaluation import evaluation_record

SENT = "sent_by_agent"  # counters key: bytes each agent has sent so far (checkpointed with the counters)


class ElasticRounds:
    """The simulated rounds of `agents` (every agent of the run) under `churn`."""

    def __init__(self, agents: Agents, churn: ChurnSchedule) -> None:
        cfg = agents.config
        self.agents, self.churn = agents, churn
        self.mixing = LiveMixing.of(cfg, agents.schedule)
        agents.counters.setdefault(SENT, [0] * cfg.agents)

    def present(self, round_index: int) -> tuple[int, ...]:
        """The agents of round `round_index`: live or joining, ascending."""
        return tuple(sorted(self.churn.live(round_index) + self.churn.joining(round_index)))

    def local_round(self, round_index: int) -> None:
        """Local steps of the live agents (a joining agent listens first, it trains from the next round)."""
        self.agents.local_round(round_index, only=self.churn.live(round_index))

    def communicate(self, round_index: int) -> None:
        """Every present agent's own call of the strategy on its exact factors and its peers' as received."""
        agents = self.agents
        start = agents.clock()
        strategy, layout = agents.strategy, agents.layout
        live, joining = self.churn.live(round_index), self.churn.joining(round_index)
        present = self.present(round_index)
        W = self.mixing.at(round_index, live, joining)
        groups, extras = agents.collect(agents.models), collect_extras(agents.models)
        if strategy.bytes_per_message(*select_agent(groups, extras, 0)) == 0:
            return
        exact = layout.pack_each(groups, extras)
        heard = layout.received(exact)
        rows, received = [], {}
        for i in range(len(agents.models)):
            own = select_agent(groups, extras, i)
            if i not in present:
                rows.append(own)
                continue
            if strategy.decentralized:
                peers = [j for j in present if j != i and (W[i, j] > 0 or W[j, i] > 0)]
                inputs = [j for j in peers if W[i, j] > 0]
            else:
                peers = [j for j in present if j != i]
                inputs = [j for j in peers if j not in joining]
            order, W_round = round_inputs(strategy, i, W[i], inputs, [], joining=i in joining)
            data = torch.stack([exact[j] if j == i else heard[j] for j in order])
            inputs_i = layout.unpack(data, *own)
            mixed = strategy.communicate(*inputs_i, W_round)
            rows.append(select_agent(*mixed, output_index(order, i)))
            received[i] = (inputs_i[0], W_round[output_index(order, i)][None])
            server = not strategy.decentralized
            sent = layout.sent_bytes_of(i, server=server) * (1 if server else len(peers))
            agents.counters[SENT][i] += sent
            if sent and agents.config.optimizer_state == "reset":
                agents.optimizers[i].state.clear()
        new_groups, new_extras = stack_agents(rows)
        agents.write(agents.models, new_groups)
        write_extras(agents.models, new_extras)
        agents.counters["time_comm"] += agents.clock() - start
        for i, (inputs_i, row) in received.items():  # the mixing error of what each agent mixed (lora/mixing.py)
            agents.tally_mixing(i, inputs_i, row)

    def evaluate(self, rounds_done: int) -> dict[str, Any]:
        """The metrics record after `rounds_done` rounds over the agents present in the last of them (as the
        agent processes gather it: their per-agent numbers, factors and bytes sent so far), plus its membership."""
        agents = self.agents
        round_index = max(rounds_done - 1, 0)
        present = self.present(round_index) if rounds_done else self.churn.initial
        start = agents.clock()
        per_agent = [{**agents.evaluate_model(agents.models[i]), **agents.spent(i)} for i in present]
        groups, extras = self._select(present)
        average = agents.evaluate_model(agents.average_model(groups, extras))
        agents.counters["time_eval"] += agents.clock() - start
        record = evaluation_record(agents, rounds_done, per_agent, average, groups, agents.counters["loss_sum"],
                                   agents.counters["loss_steps"], sum(agents.counters[SENT][i] for i in present),
                                   [agents.counters["mixing"][i] for i in present])
        agents.counters["loss_sum"], agents.counters["loss_steps"] = 0.0, 0
        agents.counters["mixing"] = new_mixing_tally(len(agents.models))
        live = self.churn.live(round_index) if rounds_done else self.churn.initial
        joining = self.churn.joining(round_index) if rounds_done else ()
        return {**record, **self.mixing.fields(round_index, live, joining)}

    def _select(self, present: tuple[int, ...]) -> tuple[list[FactorGroup], Extras]:
        """The present agents' factors and extras, stacked (A [M, k, r, n], B [M, k, m, r], extras [k, ...])."""
        groups, extras = self.agents.collect(self.agents.models), collect_extras(self.agents.models)
        return stack_agents([select_agent(groups, extras, i) for i in present])
