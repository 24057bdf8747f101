"""decaf_ext.elastic (churn schedule, live graph, Metropolis-Hastings rows), the simulator's ``--churn`` and the
same churn in 6 gloo agent processes: 5 agents start, agent 5 joins in round 3, agent 2 leaves gracefully in
round 5, agent 3 is killed in round 6 (0-based round indexes). Run as a script, this file is the body of one agent
process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from decaf_ext.cli import main as cli_main
from decaf_ext.comm.round_view import RoundView
from decaf_ext.comm.transport import Transport
from decaf_ext.config import TrainConfig
from decaf_ext.distributed import DistributedOptions, launch, run_distributed
from decaf_ext.distributed.graceful import leave_on_sigterm
from decaf_ext.elastic import ChurnSchedule, LiveMixing, joiner_row, live_adjacency, metropolis_row
from decaf_ext.errors import ConfigError
from decaf_ext.lora import collect_extras, select_agent, stack_agents, write_extras
from decaf_ext.sim.trainer import Trainer
from decaf_ext.storage.checkpoint import latest_checkpoint, load_checkpoint
from decaf_ext.topology import build_graph, mixing_matrix, validate_mixing
from test_trainer import make_tiny_dataset, make_tiny_model, read_metrics, tiny_config, without_times

AGENTS = 6
CHURN = "join:5@3,leave:2@5,kill:3@6"
ROUND_TIMEOUT = 6.0  # the crash costs the others one; generous for 6 processes on 2 shared cores
EXACT = ("round", "acc_mean", "acc_std", "macro_f1_mean", "avg_model_acc", "avg_model_macro_f1", "bytes_sent",
         "acc_agents", "live", "joining", "spectral_gap")
CLOSE = ("train_loss", "consensus_error", "consensus_interference")
# the live and joining agents of round index t (record "round" t + 1)
LIVE = [[0, 1, 2, 3, 4]] * 4 + [[0, 1, 2, 3, 4, 5], [0, 1, 3, 4, 5], [0, 1, 4, 5]]
JOINING = [[], [], [], [5], [], [], []]


def agent_main(spec: str) -> None:
    """One agent process of the churn run."""
    value = json.loads(spec)
    base, _, _ = next(dist.rendezvous("env://"))
    run_distributed(TrainConfig(**value["config"]), options=DistributedOptions(**value["options"]),
                    store=dist.PrefixStore("elastic", base))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_tiny_dataset(root / "data")


def churn_config(tiny, output_dir, **changes) -> TrainConfig:
    return tiny_config(tiny, output_dir, agents=AGENTS, rounds=7, churn=CHURN, lora_dropout=0.1, **changes)


# ------------------------------------------------------------------------------------- live graph, MH rows


def test_rings_and_exponential_graphs_relink_over_the_live_set_in_id_order():
    live = [0, 2, 3, 7]
    ring = live_adjacency(None, "ring", 8, live)
    assert {(i, j) for i, j in ring.nonzero().tolist() if i < j} == {(0, 2), (2, 3), (3, 7), (0, 7)}
    live = [1, 2, 4, 5, 6, 9]
    exponential = live_adjacency(None, "exponential", 10, live)
    index = torch.tensor(live)
    assert torch.equal(exponential[index[:, None], index[None, :]], build_graph("exponential", 6))
    assert exponential.sum() == build_graph("exponential", 6).sum()  # no edge to an agent that is not live


@pytest.mark.parametrize("topology", ["erdos_renyi", "torus"])
def test_random_graphs_keep_their_live_edges(topology):
    full = build_graph(topology, 12, seed=3)
    live = [0, 1, 3, 4, 5, 8, 10, 11]
    restricted = live_adjacency(full, topology, 12, live)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[live] = True
    assert torch.equal(restricted, full & mask[:, None] & mask[None, :])
    assert torch.equal(LiveMixing(topology, 12, seed=3).graph(0, live), restricted)


TOPOLOGIES = ["ring", "exponential", "erdos_renyi", "star", "torus", "one_peer_exponential", "bipartite", "complete"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("trial", range(3))
def test_metropolis_rows_are_symmetric_and_doubly_stochastic_over_the_live_set(topology, trial):
    n = 16
    generator = torch.Generator().manual_seed(trial)
    order = torch.randperm(n, generator=generator).tolist()
    live, joining = sorted(order[:n - 3 - trial]), sorted(order[n - 3 - trial:n - 1 - trial])
    mixing = LiveMixing(topology, n, seed=trial)
    W = mixing.at(trial, live, joining)
    index = torch.tensor(live)
    restricted = W[index[:, None], index[None, :]]
    validate_mixing(restricted, name=f"{topology} over {live}", require_connected=False)
    graph = mixing.graph(trial, live)
    # each live agent's row, computed from its own and its neighbours' live degrees, is the global MH matrix's
    torch.testing.assert_close(restricted, mixing_matrix(graph[index[:, None], index[None, :]], "metropolis"),
                               rtol=0, atol=1e-15)
    for i in live:
        assert torch.equal(W[i], metropolis_row(graph, i))
    assert W[index][:, joining].abs().sum() == 0  # no live row weights a joining agent
    extended = mixing.graph(trial, live + joining)
    for i in joining:  # a joiner: 1/k on each live neighbour, 0 on itself
        assert torch.equal(W[i], joiner_row(extended, i, live)) and W[i].sum() == pytest.approx(1.0)
        assert W[i, i] == (0.0 if extended[i, live].any() else 1.0)
    absent = sorted(set(range(n)) - set(live) - set(joining))
    assert torch.equal(W[absent], torch.eye(n, dtype=torch.float64)[absent])
    assert 0.0 <= mixing.spectral_gap(W, live) <= 1.0 + 1e-12


@pytest.mark.parametrize("topology", ["ring", "exponential", "erdos_renyi", "one_peer_exponential"])
def test_everybody_live_is_the_configured_W_bitwise(topology):
    mixing = LiveMixing(topology, 8, seed=1)
    for round_index in range(3):
        assert torch.equal(mixing.at(round_index, range(8)), mixing.schedule.at(round_index))
    torch.testing.assert_close(mixing.at(0, range(8), []), mixing_matrix(mixing.graph(0, range(8)), "metropolis"))


def test_rules_other_than_metropolis_keep_the_configured_W():
    """uniform / max_degree are not re-weighted (a missing neighbour's weight stays with the agent instead)."""
    for rule in ("uniform", "max_degree"):
        mixing = LiveMixing("ring", 6, rule=rule)
        assert not mixing.reweights and torch.equal(mixing.at(2, [0, 1, 4, 5], [3]), mixing.schedule.at(2))
    assert LiveMixing("ring", 6, rule="metropolis").reweights


# ----------------------------------------------------------------------------------------- schedule, input


def test_churn_schedule():
    churn = ChurnSchedule.parse(CHURN, AGENTS)
    assert churn.initial == (0, 1, 2, 3, 4) and churn.joined_at(5) == 3 and churn.departure(2) == ("leave", 5)
    assert [list(churn.live(t)) for t in range(7)] == LIVE
    assert [list(churn.joining(t)) for t in range(7)] == JOINING
    assert not ChurnSchedule.parse(None, 4).active and ChurnSchedule.parse(" ", 4).initial == (0, 1, 2, 3)


@pytest.mark.parametrize("spec, reason", [
    ("join:5", "cannot read 'join:5'"), ("join:five@3", "cannot read"), ("come:5@3", "cannot read"),
    ("join:5@-1", "cannot read"), ("join:6@3", "agent 6 of 'join:6@3' is not one of the run's 6 agents"),
    ("leave:9@2", "agent 9 of 'leave:9@2' is not one"), ("leave:1@2,kill:1@3", "agent 1 leaves twice"),
    ("join:5@0", "must come after round 0"), ("join:5@4,leave:5@3", "leaves (round 3) before it has joined"),
    (",".join(f"leave:{j}@{1 + (j == 5)}" for j in range(6)), "no agent is live in round 2")])
def test_malformed_churn_is_one_line_naming_churn(spec, reason):
    with pytest.raises(ConfigError, match="^churn: ") as error:
        ChurnSchedule.parse(spec, AGENTS)
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_bad_churn_on_the_command_line_exits_2_with_one_line(capsys):
    for argv in (["--churn", "join:5@x"], ["--agents", "6", "--churn", "join:6@3"], ["--churn", "leave:10@1"],
                 ["--churn", "join:5@3", "--mixing", "max_degree"]):
        assert cli_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": error: ")[1].split(" ")[0] for line in lines] == ["churn:"] * 3 + ["mixing:"]


def test_round_views_carry_their_joining_members():
    view = RoundView(3, {0: 1, 4: 2, 5: 1}, group=3, joining=(5,))
    assert RoundView.from_json(view.to_json()) == view and view.live == (0, 4)
    with pytest.raises(ValueError, match="not all members"):
        RoundView.from_json(json.dumps({"round": 3, "members": {"0": 1}, "group": 3, "joining": [5]}))


def test_a_leaver_is_not_waited_for_and_a_joiner_listens_in_its_round():
    """Through a store, in-process: 3 of 4 agents start; agent 2 announces it leaves before round 2; agent 3
    joins in round 2 without a state of its own (fresh). The round timeout is long: a leaver waited for would
    show as peer_lost after it."""
    store = dist.HashStore()
    transports = [Transport(store, j, 4, fingerprint="same", backend="gloo", timeout=60.0, startup_timeout=60.0)
                  for j in range(4)]
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda t: t.start(0, 0, [0, 1, 2]), transports[:3])) == [0, 0, 0]
    joiner = transports[3]
    assert joiner.start(0, join_at=2) == 2  # the run is running: it enters at round 2
    joiner.fresh = True
    with ThreadPoolExecutor(3) as pool:
        views = list(pool.map(lambda t: t.agree(0), transports[:3]))
        assert views[0].agents == [0, 1, 2] and views[0].joining == ()
        transports[2].leave(2)
        assert all(v.agents == [0, 1, 2] for v in pool.map(lambda t: t.agree(1), transports[:3]))
    with ThreadPoolExecutor(3) as pool:
        views = list(pool.map(lambda t: t.agree(2), [transports[0], transports[1], joiner]))
    assert all(v == views[0] for v in views) and views[0].agents == [0, 1, 3] and views[0].joining == (3,)
    assert {"round": 2, "event": "peer_left", "agent": 2} in transports[0].events
    assert not [e for e in transports[0].events if e["event"] == "peer_lost"]


def three_through_round_0(timeout: float) -> list[Transport]:
    """Three gloo transports on one in-process store, started and through round 0 together (round timeout
    `timeout` seconds)."""
    store = dist.HashStore()
    transports = [Transport(store, j, 3, fingerprint="same", backend="gloo", timeout=timeout, startup_timeout=20.0)
                  for j in range(3)]
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda t: t.start(0), transports)) == [0, 0, 0]
        assert all(v.agents == [0, 1, 2] for v in pool.map(lambda t: t.agree(0), transports))
    return transports


def test_a_departure_announced_while_the_others_wait_ends_their_wait():
    """Through a store, in-process: agents 0 and 1 already wait for agent 2's ready record of round 1 when agent 2
    announces that it leaves before round 1 (as on SIGTERM). They agree without it, as a departure (peer_left),
    not after the round timeout as a loss (peer_lost)."""
    transports = three_through_round_0(timeout=30.0)
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(t.agree, 1) for t in transports[:2]]
        time.sleep(1.5)  # both are inside their wait for agent 2
        transports[2].leave(1)
        views = [future.result(timeout=20) for future in waiting]
    assert all(v.agents == [0, 1] for v in views)
    for t in transports[:2]:
        assert {"round": 1, "event": "peer_left", "agent": 2} in t.events
        assert not [e for e in t.events if e["event"] == "peer_lost"]


# -------------------------------------------------------------------------------------------- simulator


@pytest.mark.parametrize("algorithm, heard", [("decaf", [0, 4]), ("dlora", [0, 4]), ("fedavg", [0, 1, 2, 3, 4])])
def test_a_simulated_joiner_starts_from_its_neighbours_consensus(tiny, tmp_path, algorithm, heard):
    """In its join round the joiner's adapter is the strategy's consensus of its live neighbours' (ring over the
    6 agents: 0 and 4; fedavg: every live agent); nobody else takes in the joiner's factors."""
    trainer = Trainer(tiny_config(tiny, tmp_path / "run", agents=AGENTS, rounds=4, churn="join:5@3",
                                  algorithm=algorithm))
    rounds, agents = trainer.elastic, trainer.agents
    for round_index in range(3):
        rounds.local_round(round_index)
        rounds.communicate(round_index)
    before = agents.collect(agents.models), collect_extras(agents.models)
    rounds.local_round(3)
    trained = agents.collect(agents.models), collect_extras(agents.models)
    assert all(torch.equal(a.A[:, 5], b.A[:, 5]) and torch.equal(a.B[:, 5], b.B[:, 5])
               for a, b in zip(before[0], trained[0]))  # the joiner did not train in its join round
    rounds.communicate(3)
    groups, extras = agents.collect(agents.models), collect_extras(agents.models)
    expected = agents.strategy.consensus(*stack_agents([select_agent(*trained, j) for j in heard]))
    joiner = select_agent(groups, extras, 5)
    for got, want in zip(joiner[0], expected[0]):
        torch.testing.assert_close(got.B @ got.A, want.B @ want.A, rtol=1e-5, atol=1e-7)
    for name in extras:
        torch.testing.assert_close(joiner[1][name], expected[1][name])
    # the members' results do not depend on the joiner's factors: the round again with the joiner's B x 1000
    scaled = [dataclasses.replace(g, B=torch.cat([g.B[:, :5], 1000 * g.B[:, 5:]], dim=1)) for g in trained[0]]
    agents.write(agents.models, scaled)
    write_extras(agents.models, trained[1])
    rounds.communicate(3)
    again = agents.collect(agents.models)
    for first, second in zip(groups, again):
        assert torch.equal(first.A[:, :5], second.A[:, :5]) and torch.equal(first.B[:, :5], second.B[:, :5])
    record = rounds.evaluate(4)
    assert record["live"] == [0, 1, 2, 3, 4] and record["joining"] == [5] and len(record["acc_agents"]) == 6
    assert record["spectral_gap"] == pytest.approx(LiveMixing("ring", 5).schedule.spectral_gap)


# ------------------------------------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def launched(tiny, tmp_path_factory):
    """One launch of 6 agent processes under the churn schedule (agent 5 waits for its round, agent 3 kills
    itself in round 6), and the same run in the simulator."""
    root = tmp_path_factory.mktemp("elastic")
    config = churn_config(tiny, root / "processes")
    spec = {"config": config.to_dict(), "options": {"round_timeout": ROUND_TIMEOUT, "startup_timeout": 120.0}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        statuses = launch([sys.executable, __file__, json.dumps(spec)], AGENTS)
        simulator = Trainer(dataclasses.replace(config, output_dir=str(root / "simulated")))
        simulator.run()
    finally:
        torch.set_num_threads(threads)
    return config, statuses, simulator


def own(run_dir: str, agent: int, name: str):
    path = Path(run_dir, "agents", f"agent_{agent:02d}", name)
    return json.loads(path.read_text()) if name.endswith(".json") else read_metrics(path.parent)


def test_every_survivor_finishes_through_a_join_a_leave_and_a_crash(launched):
    config, statuses, _ = launched
    assert statuses == [0, 0, 0, -9, 0, 0]  # agent 3 was SIGKILLed, agent 2 left and exited cleanly
    records = read_metrics(config.output_dir)
    assert [r["round"] for r in records] == list(range(1, 8))
    assert [r["live"] for r in records] == LIVE and [r["joining"] for r in records] == JOINING
    assert [r["members"] for r in records] == [sorted(a + j) for a, j in zip(LIVE, JOINING)]
    events = {j: own(config.output_dir, j, "summary.json")["distributed"]["events"] for j in (0, 1, 4, 5)}
    for j in (0, 1, 4):  # the leaver cost nobody a timeout; the crash was detected by one
        assert {"round": 5, "event": "peer_left", "agent": 2} in events[j]
        assert {"round": 6, "event": "peer_lost", "agent": 3} in events[j]
        assert not [e for e in events[j] if e["event"] == "peer_lost" and e["agent"] == 2]
    joiner = own(config.output_dir, 5, "summary.json")
    assert joiner["distributed"]["joined_round"] == 3 and joiner["final"]["round"] == 7
    assert [r["round"] for r in own(config.output_dir, 5, "metrics.jsonl")] == [4, 5, 6, 7]  # from its join
    assert load_checkpoint(latest_checkpoint(str(Path(config.output_dir, "agents", "agent_02")))).round == 5
    assert [r["round"] for r in own(config.output_dir, 2, "metrics.jsonl")][-1] == 5


def test_mixing_rows_are_doubly_stochastic_over_the_live_set_every_round(launched):
    """Each agent's own log holds the W row it computed locally in each round; stacked over the live agents
    they form a symmetric doubly stochastic matrix."""
    config, _, _ = launched
    rows: dict[int, dict[int, list[float]]] = {}
    for agent in range(AGENTS):
        for record in own(config.output_dir, agent, "metrics.jsonl"):
            rows.setdefault(record["round"] - 1, {})[agent] = record["mixing_row"]
    for round_index, (live, joining) in enumerate(zip(LIVE, JOINING)):
        assert sorted(rows[round_index]) == sorted(live + joining)
        W = torch.tensor([rows[round_index][i] for i in live], dtype=torch.float64)[:, live]
        validate_mixing(W, name=f"round {round_index}")
        for i in joining:
            assert rows[round_index][i][i] == 0.0 and sum(rows[round_index][i]) == pytest.approx(1.0)


def test_the_simulator_gives_the_numbers_of_the_processes(launched):
    config, _, simulator = launched
    processes = without_times(read_metrics(config.output_dir))
    for expected, got in zip(without_times(simulator.history), processes, strict=True):
        assert got.pop("members") == sorted(expected["live"] + expected["joining"])
        assert got.keys() == expected.keys()
        assert {k: got[k] for k in EXACT} == {k: expected[k] for k in EXACT}
        for key in CLOSE:  # sums in another order: seen ~1e-8 relative
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)
        assert got["mixing_error_agents"] == [None if x is None else pytest.approx(x, rel=1e-4, abs=1e-6)
                                              for x in expected["mixing_error_agents"]]
    groups = simulator.agents.collect(simulator.agents.models, raw=True)
    for agent in (0, 1, 4, 5):  # every survivor's final adapter is the simulated agent's
        saved = load_checkpoint(latest_checkpoint(str(Path(config.output_dir, "agents", f"agent_{agent:02d}"))))
        for k, group in enumerate(groups):
            for factor in "AB":
                torch.testing.assert_close(saved.tensors[f"factors/{k}/{factor}"][:, 0],
                                           getattr(group, factor)[:, agent], rtol=1e-4, atol=1e-6)



def test_an_agent_that_left_and_restarts_is_waited_for_again():
    """Through a store: agent 2 announces leaving before round 1 (as on SIGTERM); restarted with --resume, it asks
    to join and its departure no longer counts: half a second slower than the others, it is a member again."""
    transports = three_through_round_0(timeout=5.0)
    with ThreadPoolExecutor(2) as pool:
        transports[2].leave(1)
        assert all(v.agents == [0, 1] for v in pool.map(lambda t: t.agree(1), transports[:2]))
        back = Transport(transports[0].store, 2, 3, fingerprint="same", backend="gloo", timeout=5.0,
                         startup_timeout=20.0)
        assert back.start(1) == 2
        views = {}
        for r in (2, 3):
            waiting = [pool.submit(t.agree, r) for t in transports[:2]]
            time.sleep(0.5)
            mine = back.agree(r)
            views[r] = [f.result(timeout=30).agents for f in waiting] + [None if mine is None else mine.agents]
    assert views[2] == [[0, 1, 2]] * 3 and views[3] == [[0, 1, 2]] * 3


def test_waiting_a_round_timeout_for_a_crashed_agent_over_a_tcpstore_logs_no_store_warnings(capfd):
    """A launcher's store: agent 1 never posts its ready record; agent 0 waits the round timeout (3 s), reading
    the leave records meanwhile, without c10d's socket-timeout warning of each timed-out store wait."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    store = dist.PrefixStore("run", dist.TCPStore("127.0.0.1", server.port, is_master=False,
                                                  timeout=timedelta(seconds=30)))
    transport = Transport(store, 0, 2, fingerprint="f", backend="gloo", timeout=3.0, startup_timeout=3.0)
    capfd.readouterr()
    assert transport._wait_ready(0, {1}, set()) == set()  # agent 1 never posts ready/0/1 (crashed)
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if "timed out" in line or "likely a timeout" in line], err


def test_sigterm_asks_to_leave_once_and_a_second_one_reaches_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        with leave_on_sigterm() as leaving:
            assert not leaving.is_set() and signal.getsignal(signal.SIGINT) is interrupt  # Ctrl-C: unchanged
            os.kill(os.getpid(), signal.SIGTERM)
            assert leaving.is_set() and seen == []  # asked to leave after the round
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [signal.SIGTERM]  # the second: what the process did before (by default: it ends)
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] * 2  # the previous handler is back
        with ThreadPoolExecutor(1) as pool:  # outside the main thread nothing is installed
            assert not pool.submit(lambda: leave_on_sigterm().__enter__().is_set()).result()
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    agent_main(sys.argv[1])
