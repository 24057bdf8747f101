"""decaf_ext.distributed.runtime / decaf_ext.comm.transport: 4 agent processes on gloo (localhost) against the simulator,
faults (a killed agent, a stalled one, one sending NaN), resuming from checkpoints, and the pieces in-process.

The multi-process runs are launched once per module (one launch runs every registered strategy, a run with a
run key, a norm bound and faulty messages, then the faulty run; a second launch resumes the faulty run through the
command line). Run as a script, this file is the body
of one agent process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from decaf_ext.storage.checkpoint import latest_checkpoint, load_checkpoint
from decaf_ext.config import TrainConfig
from decaf_ext.errors import ConfigError
from decaf_ext.cli import main as cli_main
from decaf_ext.distributed import DistributedOptions, launch, run_distributed
from decaf_ext.distributed import runtime
from decaf_ext.distributed.evaluation_check import check_evaluation
from decaf_ext.distributed.runtime import AgentRuntime
from decaf_ext.comm.transport import Transport, check_buffer
from faults import Faults
from decaf_ext.lora import FactorGroup, collect_extras, collect_factors, product_norm
from decaf_ext.comm.guard import MessageGuard, TagContext, load_run_key
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.strategies import get_strategy, strategy_names
from decaf_ext.sim.trainer import Trainer
from conftest import files_of
from test_trainer import make_tiny_dataset, make_tiny_model, read_metrics, tiny_config, without_times
from user_strategy import NAME as USER_STRATEGY

ALGORITHMS = strategy_names()  # every registered strategy, the test's own included
# compressed runs against the simulator: name -> options (the simulator decodes what each agent receives)
COMPRESSED = {"decaf-int8": dict(algorithm="decaf", message_dtype="int8"),
              "dlora-int8": dict(algorithm="dlora", message_dtype="int8"),
              "fedavg-bfloat16": dict(algorithm="fedavg", message_dtype="bfloat16")}

# agents of unequal LoRA rank against the simulator
# the round-0 evaluation (before any training) on the members agreed at startup
EVAL_AT_START = {"decaf-round0": dict(algorithm="decaf", eval_at_start=True)}
RANKED = {"decaf-ranks": dict(algorithm="decaf", rank="cycle:2,4"),
          "decaf-ranks-int8": dict(algorithm="decaf", rank="cycle:2,4", message_dtype="int8"),
          "dlora_fa-ranks": dict(algorithm="dlora_fa", rank="cycle:2,4"),
          "fedavg-ranks": dict(algorithm="fedavg", rank="cycle:2,4")}
# --robust in the agents' own processes against the simulator (the automatic tau; product space with unequal ranks
# and int8 messages; a server strategy clipped around each agent)
ROBUST = {"decaf-robust-ranks-int8": dict(algorithm="decaf", robust="clipped_gossip", rank="cycle:2,4",
                                          message_dtype="int8"),
          "fedavg-robust": dict(algorithm="fedavg", robust="clipped_gossip")}

AGENTS = 4
KEY = b"a run key of 16+ bytes"
ROUND_TIMEOUT = 3.0
FAULTY = dict(algorithm="dlora", rounds=7, eval_every=1, checkpoint_every=1)
# Rounds 0-based. Agent 1 sends NaN in round 1; agent 2 is killed in round 2; agent 3 stalls past the timeout in
# round 3 and comes back 0.5 s after the others left it out; agent 0 stalls 2 s (within the timeout) in round 5,
# which holds the group until agent 3 has asked to join again.
FAULTS = f"1:nan@1,2:exit@2,3:stall@3={ROUND_TIMEOUT + 0.5},0:stall@5=2"
# With a shared run key, a norm bound and int8 messages (uint8 buffers): agent 1 sends a wrong message tag in
# round 0, agent 3 its factors x 1000 in round 1 (finite, correctly tagged); in the evaluations, agent 3 a wrong
# tag after round 0, agent 2 a NaN byte count (correctly tagged) after round 1.
GUARDED = dict(algorithm="decaf", rounds=2, norm_bound=10.0, message_dtype="int8")
GUARDED_FAULTS = "1:badtag@0,3:scale@1=1000,3:evalbadtag@0,2:evalnan@1"
# Agent 2 receives SIGTERM after its local steps of round 1 (as from `kill`): it finishes round 1, announces that
# it leaves, writes its checkpoint and goes on to the next run of the launch; the others do not wait for it.
LEAVING, LEAVING_FAULTS = dict(algorithm="decaf", rounds=4, eval_every=1), "2:term@1"
EXACT = ("round", "acc_mean", "acc_std", "macro_f1_mean", "avg_model_acc", "avg_model_macro_f1", "bytes_sent",
         "acc_agents")
CLOSE = ("train_loss", "consensus_error", "mixing_error", "effective_rank")
PER_AGENT = ("mixing_error_agents", "effective_rank_agents", "min_rank_energy_agents")  # lists, None = absent


def main(argv: list[str]) -> int:
    """``python -m decaf_ext.distributed ARGV`` in this process."""
    return cli_main([*argv, "--launcher", "dist"], prog="python -m decaf_ext.distributed")


def agent_main(spec: str) -> None:
    """One agent process: run the given configs one after the other, each with its own store prefix."""
    value = json.loads(spec)
    base, _, _ = next(dist.rendezvous("env://"))
    for k, (config, faults) in enumerate(value["runs"]):
        run_distributed(TrainConfig(**config), options=DistributedOptions(**value["options"]),
                        store=dist.PrefixStore(f"run{k}", base), test_hooks=partial(Faults.parse, faults))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Several processes share 2 cores here; more than one intra-op thread each only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    """The tiny BERT of test_trainer (hidden and attention dropout 0.1) and the tiny text set."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_tiny_dataset(root / "data")


@pytest.fixture(scope="module")
def launched(tiny, tmp_path_factory):
    """One launch of 4 agent processes: every registered strategy (3 rounds, no faults, dropout on the model and
    the LoRA input: every agent draws its masks from its own (seed, agent, round) stream), the guarded decaf run,
    then the faulty dlora run."""
    root = tmp_path_factory.mktemp("distributed")
    assert USER_STRATEGY in ALGORITHMS
    variants = {**COMPRESSED, **RANKED, **EVAL_AT_START, **ROBUST}
    runs = {name: tiny_config(tiny, root / name, **{"algorithm": name, **variants.get(name, {})},
                              lora_dropout=0.1, rounds=3) for name in (*ALGORITHMS, *variants)}
    faulty = tiny_config(tiny, root / "faulty", **FAULTY)
    (root / "key").write_text("a shared secret of this run\n")  # 16 bytes at least
    guarded = tiny_config(tiny, root / "guarded", run_key_file=str(root / "key"), **GUARDED)
    runs["leaving"] = tiny_config(tiny, root / "leaving", **LEAVING)
    faults = {"leaving": LEAVING_FAULTS}
    spec = {"runs": [(c.to_dict(), faults.get(name, "")) for name, c in runs.items()]
            + [(guarded.to_dict(), GUARDED_FAULTS), (faulty.to_dict(), FAULTS)],
            "options": {"round_timeout": ROUND_TIMEOUT, "startup_timeout": 120.0}}
    statuses = launch([sys.executable, __file__, json.dumps(spec)], AGENTS)
    return runs, faulty, statuses, guarded


def summary_of(run_dir: str, agent: int) -> dict:
    return json.loads(Path(run_dir, "agents", f"agent_{agent:02d}", "summary.json").read_text())


def events_of(run_dir: str, agent: int, kind: str) -> list[tuple[int, int | None]]:
    """(round, agent) of agent's recorded events of `kind`."""
    events = summary_of(run_dir, agent)["distributed"]["events"]
    return [(e["round"], e.get("agent")) for e in events if e["event"] == kind]


# ------------------------------------------------------------------------------------- multi-process runs


@pytest.mark.parametrize("run", [*ALGORITHMS, *COMPRESSED, *RANKED, *EVAL_AT_START, *ROBUST])
def test_distributed_run_matches_the_simulator(launched, tmp_path, run):
    runs, _, statuses, _ = launched
    assert statuses[0] == statuses[1] == statuses[3] == 0
    config = runs[run]
    simulator = Trainer(dataclasses.replace(config, output_dir=str(tmp_path / "simulated")))
    simulator.run()
    distributed = read_metrics(config.output_dir)
    assert [r["round"] for r in distributed] == list(range(0 if config.eval_at_start else 1, config.rounds + 1))
    assert [r.pop("members") for r in distributed] == [list(range(AGENTS))] * len(distributed)
    if run in COMPRESSED:  # smaller messages than the same run's in float32
        uncompressed = read_metrics(runs[COMPRESSED[run]["algorithm"]].output_dir)
        assert 0 < distributed[-1]["bytes_sent"] <= 0.55 * uncompressed[-1]["bytes_sent"]
    for expected, got in zip(without_times(simulator.history), without_times(distributed), strict=True):
        assert got.keys() == expected.keys()
        assert {k: got[k] for k in EXACT} == {k: expected[k] for k in EXACT}
        for key in CLOSE:  # train_loss is None at round 0 (no step yet)
            assert got[key] == (None if expected[key] is None else pytest.approx(expected[key], rel=1e-5, abs=1e-7))
        for key in PER_AGENT:  # the mixing error: each agent's own, computed in its process and in the simulator
            assert got[key] == [None if x is None else pytest.approx(x, rel=1e-4, abs=1e-6) for x in expected[key]]
    # each agent checkpointed only its own adapter, equal to the simulator's agent
    groups, extras = simulator.agents.collect(simulator.agents.models, raw=True), collect_extras(simulator.agents.models)
    for agent in range(AGENTS):
        saved = load_checkpoint(latest_checkpoint(os.path.join(config.output_dir, "agents", f"agent_{agent:02d}")))
        assert saved.round == config.rounds
        for k, group in enumerate(groups):
            for factor in "AB":
                mine = saved.tensors[f"factors/{k}/{factor}"]
                assert mine.shape[1] == 1
                torch.testing.assert_close(mine[:, 0], getattr(group, factor)[:, agent], rtol=1e-4, atol=1e-6)
        for name, stacked in extras.items():
            torch.testing.assert_close(saved.tensors[f"extras/{name}"][0], stacked[agent], rtol=1e-4, atol=1e-6)
    summary = json.loads(Path(config.output_dir, "summary.json").read_text())
    assert summary["final"] == without_times(read_metrics(config.output_dir))[-1]
    assert Path(config.output_dir, "adapters", "average", "adapter_model.safetensors").is_file()
    if run == "decaf":  # the adapters name a labelled base folder: they load on their own, with the run's labels
        from peft import AutoPeftModelForSequenceClassification

        from decaf_ext.storage.adapter_card import AdapterCard

        for name in ("agent_01", "average"):
            loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(Path(config.output_dir, "adapters",
                                                                                     name)))
            assert loaded.config.id2label == dict(enumerate(simulator.agents.label_names))
            card = AdapterCard.read(str(Path(config.output_dir, "adapters", name)))  # decaf-train predict reads it
            assert card.label_names == simulator.agents.label_names and card.model == config.model


def test_survivors_finish_without_a_killed_and_a_stalled_agent(launched):
    _, faulty, statuses, _ = launched
    assert statuses[2] == -9 and statuses[0] == statuses[1] == statuses[3] == 0  # agent 2 was SIGKILLed
    run_dir = faulty.output_dir
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == list(range(1, faulty.rounds + 1))
    members = [r["members"] for r in records]
    assert members[:2] == [[0, 1, 2, 3]] * 2
    assert members[2] == [0, 1, 3]  # round index 2: agent 2 is dead
    assert members[3] == [0, 1]  # round index 3: agent 3 stalls past the timeout
    assert members[5:] == [[0, 1, 3]] * 2  # agent 3 asked to join again and was admitted
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("train_loss", "acc_mean", "consensus_error", "avg_model_acc"))
        assert len(record["acc_agents"]) == len(record["members"])
    # the NaN buffers of agent 1 (round 1) were rejected by its ring neighbours 0 and 2 and never used
    assert events_of(run_dir, 0, "rejected") == [(1, 1)]
    assert (2, 2) in events_of(run_dir, 0, "peer_lost") and (3, 3) in events_of(run_dir, 0, "peer_lost")
    assert events_of(run_dir, 3, "left_out")[0] == (3, None)
    assert summary_of(run_dir, 0)["final"]["round"] == faulty.rounds
    # every agent's newest checkpoint is complete and finite; the killed agent's is from before it died
    for agent in range(AGENTS):
        folder = latest_checkpoint(os.path.join(run_dir, "agents", f"agent_{agent:02d}"))
        saved = load_checkpoint(folder)
        assert saved.round == (2 if agent == 2 else faulty.rounds)
        assert all(torch.isfinite(t).all() for t in saved.tensors.values())
        assert not [p for p in Path(folder).parent.iterdir() if p.name.startswith(".tmp")]


def test_an_agent_sent_sigterm_leaves_after_its_round_and_nobody_waits_for_it(launched):
    run_dir = launched[0]["leaving"].output_dir
    records = read_metrics(run_dir)
    assert [r["members"] for r in records] == [r["live"] for r in records] == [[0, 1, 2, 3]] * 2 + [[0, 1, 3]] * 2
    # W of the ring of 4 (weights 1/3): |lambda_2| = 1/3; re-linked over 3 agents, a triangle: W = J / 3, gap 1
    assert [r["spectral_gap"] for r in records] == pytest.approx([2 / 3] * 2 + [1.0] * 2)
    for j in (0, 1, 3):  # a departure, not a loss after the round timeout
        assert events_of(run_dir, j, "peer_left") == [(2, 2)] and events_of(run_dir, j, "peer_lost") == []
    assert [e["round"] for e in summary_of(run_dir, 2)["distributed"]["events"] if e["event"] == "leaving"] == [1]
    assert [r["round"] for r in read_metrics(os.path.join(run_dir, "agents", "agent_02"))] == [1, 2]
    assert load_checkpoint(latest_checkpoint(os.path.join(run_dir, "agents", "agent_02"))).round == 2


def test_an_agent_left_out_of_the_round_in_which_it_gets_sigterm_still_checkpoints_its_departure(monkeypatch):
    """AgentRuntime._train with stand-ins: SIGTERM in round 3 of 10 while this agent is left out of that round."""
    written, left, events = [], [], []
    monkeypatch.setattr(runtime, "write_checkpoint", lambda run_dir, agents, history, done: written.append(done))
    cfg = SimpleNamespace(rounds=10, comm_order="train_then_mix", eval_every=1, checkpoint_every=1,
                          eval_at_start=False, progress=False, algorithm="decaf", topology="ring", agents=4)
    transport = SimpleNamespace(fresh=False, latest=-1, leave=left.append,
                                record_event=lambda *a, **k: events.append(a))
    view = object()

    def communicate(round_index):
        transport.latest = round_index
        if round_index == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. Kubernetes drains the node
            return None  # this agent came late: left out of round 3
        return view

    fake = SimpleNamespace(
        config=cfg, agents=SimpleNamespace(privacy=None, local_round=lambda r: None), agent=1,
        _open=lambda resume: 0, churn=SimpleNamespace(joined_at=lambda a: 0, initial=[0, 1, 2, 3],
                                                        departure=lambda a: None),
        comm=SimpleNamespace(start=lambda own, join_at, initial: 0, restarted=False,
                             after_local_steps=lambda r: None),
        transport=transport, communicate=communicate, _crash_if_scheduled=lambda r: None,
        evaluate=lambda done, v: None, run_dir="/nonexistent", log=SimpleNamespace(history=[]),
        _finish=lambda wall: "finished", view=None)
    assert AgentRuntime._train(fake, False) == "finished"
    assert left == [4] and written == [1, 2, 3, 4]  # the departure's checkpoint too


def test_resume_brings_the_killed_agent_back_from_its_checkpoint(launched, capfd):
    _, faulty, _, _ = launched
    run_dir = faulty.output_dir
    status = main(["--nproc", str(AGENTS), "--resume", run_dir, "--rounds", str(faulty.rounds + 2),
                   "--round-timeout", str(ROUND_TIMEOUT), "--startup-timeout", "120"])
    assert status == 0
    assert f"round {faulty.rounds + 2}:" in capfd.readouterr().out  # printed by the reporting agent
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == list(range(1, faulty.rounds + 3))
    assert [r["members"] for r in records[-2:]] == [[0, 1, 2, 3]] * 2
    # agent 2 continued from its own round-2 checkpoint (its history up to then) and skipped to the group's round
    own = read_metrics(os.path.join(run_dir, "agents", "agent_02"))
    assert [r["round"] for r in own] == [1, 2, faulty.rounds + 1, faulty.rounds + 2]
    assert load_checkpoint(latest_checkpoint(os.path.join(run_dir, "agents", "agent_02"))).round == faulty.rounds + 2


def test_wrong_tags_and_oversized_products_are_rejected(launched):
    guarded = launched[3]
    run_dir = guarded.output_dir
    assert [r["members"] for r in read_metrics(run_dir)] == [[0, 1, 2], [0, 1, 3]]  # evaluations: 3, 2 rejected
    events = {agent: summary_of(run_dir, agent)["distributed"]["events"] for agent in range(AGENTS)}
    rejected = {agent: [(e["round"], e["agent"], e["reason"]) for e in events[agent]
                        if e["event"] == "rejected" and "what" not in e] for agent in range(AGENTS)}
    evaluations = {agent: [(e["round"], e["agent"]) for e in events[agent] if e.get("what") == "evaluation"]
                   for agent in range(AGENTS)}
    assert evaluations[0] == evaluations[1] == [(0, 3), (1, 2)]
    assert evaluations[2] == [(0, 3)] and evaluations[3] == [(1, 2)]
    assert all(math.isfinite(r["bytes_sent"]) for r in read_metrics(run_dir))
    # ring of 4: agent 1's neighbours are 0 and 2, agent 3's are 2 and 0
    assert rejected[0][0] == rejected[2][0] == (0, 1, "wrong message tag")
    assert [r[:2] for r in rejected[0][1:]] == [r[:2] for r in rejected[2][1:]] == [(1, 3)]
    assert "LoRA product norm" in rejected[0][1][2] and rejected[1] == rejected[3] == []
    for agent in range(AGENTS):
        saved = load_checkpoint(latest_checkpoint(os.path.join(run_dir, "agents", f"agent_{agent:02d}")))
        assert all(torch.isfinite(t).all() for t in saved.tensors.values())


# -------------------------------------------------------------------------------------------- in-process


def test_check_buffer():
    good = torch.ones(5)
    assert check_buffer(good, 5, torch.float32) is None
    assert "size" in check_buffer(torch.ones(4), 5, torch.float32)
    assert "size" in check_buffer(torch.ones(1, 5), 5, torch.float32)
    assert "dtype" in check_buffer(torch.ones(5, dtype=torch.float64), 5, torch.float32)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert "NaN or Inf" in check_buffer(torch.tensor([1.0, bad, 1.0, 1.0, 1.0]), 5, torch.float32)


def random_agents(n: int, seed: int = 0) -> tuple[list[FactorGroup], dict[str, torch.Tensor]]:
    """Two factor groups and two extras for n agents, float64."""
    g = torch.Generator().manual_seed(seed)
    groups = [FactorGroup(["q", "v"], torch.randn(2, n, 3, 7, generator=g, dtype=torch.float64),
                          torch.randn(2, n, 5, 3, generator=g, dtype=torch.float64)),
              FactorGroup(["o"], torch.randn(1, n, 3, 4, generator=g, dtype=torch.float64),
                          torch.randn(1, n, 6, 3, generator=g, dtype=torch.float64))]
    extras = {"head.weight": torch.randn(n, 2, 5, generator=g, dtype=torch.float64),
              "head.bias": torch.randn(n, 2, generator=g, dtype=torch.float64)}
    return groups, extras


def select(groups, extras, agents: list[int]):
    return ([FactorGroup(g.names, g.A[:, agents], g.B[:, agents]) for g in groups],
            {k: x[agents] for k, x in extras.items()})


@pytest.mark.parametrize("trains_A", [True, False])
def test_layout_round_trip(trains_A):
    groups, extras = random_agents(3)
    own = select(groups, extras, [1])
    layout = MessageLayout(*own, trains_A=trains_A)
    strategy = get_strategy("dlora" if trains_A else "dlora_fa")
    assert layout.numel * 8 == strategy.bytes_per_message(*own)  # the simulator's byte count for one agent
    buffers = torch.stack([layout.pack(*select(groups, extras, [j])) for j in range(3)])
    assert buffers.shape == (3, layout.numel)
    unpacked_groups, unpacked_extras = layout.unpack(buffers, *own)
    for got, expected in zip(unpacked_groups, groups):
        assert got.names == expected.names
        assert torch.equal(got.B, expected.B)
        assert torch.equal(got.A, expected.A if trains_A else expected.A[:, [1, 1, 1]])
    assert all(torch.equal(unpacked_extras[k], extras[k]) for k in extras)
    other = MessageLayout(*select(*random_agents(3), [0]), trains_A=not trains_A)
    assert other.fingerprint != layout.fingerprint
    tagged = MessageLayout(*own, trains_A=trains_A, trailer=32)
    assert tagged.numel == layout.numel + 32 and tagged.fingerprint != layout.fingerprint


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_row_form_equals_the_strategy_row(algorithm):
    """Agent i calling the strategy on its own and its neighbours' factors with its row of W ([1, k], own first)
    gets row i of the strategy on all agents (float64); a server strategy hears from every agent. With a
    neighbour missing, its weight on the own factors gives the row of a hand-built W."""
    n = 5
    groups, extras = random_agents(n)
    strategy = get_strategy(algorithm)
    if not strategy.trains_A:
        groups = [FactorGroup(g.names, g.A[:, :1].expand_as(g.A).contiguous(), g.B) for g in groups]
    W = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        W[i, i], W[i, (i + 1) % n], W[i, (i - 1) % n] = 0.5, 0.25, 0.25
    expected_groups, expected_extras = strategy.communicate(groups, extras, W)
    i = 2
    heard = [i, 1, 3] if strategy.decentralized else [i, 0, 1, 3, 4]
    got_groups, got_extras = strategy.communicate(*select(groups, extras, heard), W[i, heard][None])
    for got, expected in zip(got_groups, expected_groups):
        assert got.A.shape[1] == 1
        torch.testing.assert_close(got.B @ got.A, (expected.B @ expected.A)[:, i:i + 1])
        if algorithm != "decaf":
            torch.testing.assert_close(got.A, expected.A[:, i:i + 1])
    for name in extras:
        torch.testing.assert_close(got_extras[name], expected_extras[name][i:i + 1])
    if strategy.decentralized:  # neighbour 3 missing: weights (0.75, 0.25) on (own, neighbour 1)
        row = torch.zeros(1, n, dtype=torch.float64)
        row[0, i], row[0, 1] = 0.75, 0.25
        reference = strategy.communicate(groups, extras, torch.cat([torch.eye(n, dtype=torch.float64)[:i], row,
                                                                     torch.eye(n, dtype=torch.float64)[i + 1:]]))
        partial = strategy.communicate(*select(groups, extras, [i, 1]), torch.tensor([[0.75, 0.25]],
                                                                                    dtype=torch.float64))
        for got, expected in zip(partial[0], reference[0]):
            torch.testing.assert_close(got.B @ got.A, (expected.B @ expected.A)[:, i:i + 1])


def test_message_guard_tags_bind_the_whole_context():
    groups, extras = random_agents(2)
    layout = MessageLayout(*select(groups, extras, [0]), trains_A=True, trailer=32)
    data = layout.pack(*select(groups, extras, [0]))
    guard = MessageGuard(KEY)
    guard.bind(b"nonce-1")
    context = TagContext("mix", round=3, group=2, sender=0, incarnation=1, receiver=1)
    sealed = guard.seal(data, context)
    assert sealed.shape == (layout.numel,) and torch.equal(sealed[:-32], data)
    assert guard.open(sealed, context)[1] is None
    for changed in (dict(purpose="eval"), dict(round=4), dict(group=3), dict(sender=1), dict(incarnation=2),
                    dict(receiver=2)):
        assert guard.open(sealed, context._replace(**changed))[1] == "wrong message tag", changed
    other_run = MessageGuard(KEY)
    other_run.bind(b"nonce-2")  # the same key in another run or launch
    assert other_run.open(sealed, context)[1] == "wrong message tag"
    other_key = MessageGuard(b"another key of 16+ bytes")
    other_key.bind(b"nonce-1")
    assert guard.open(other_key.seal(data, context), context)[1] == "wrong message tag"
    assert "missing" in guard.open(torch.cat([data, torch.full((32,), 0.5, dtype=data.dtype)]), context)[1]
    tampered = sealed.clone()
    tampered[0] += 1
    assert guard.open(tampered, context)[1] == "wrong message tag"


def test_short_run_keys_are_refused(tmp_path):
    (tmp_path / "key").write_bytes(b"x")
    with pytest.raises(ConfigError, match="^run_key_file / DECAF_RUN_KEY: .*1 bytes"):
        load_run_key(str(tmp_path / "key"))
    with pytest.raises(ValueError, match="at least 16"):
        MessageGuard(b"fifteen bytes!!")


def test_evaluation_buffers_with_implausible_numbers_are_rejected():
    groups, extras = random_agents(2)
    own = select(groups, extras, [0])
    layout = MessageLayout(*own, trains_A=True)
    factors = layout.pack(*select(groups, extras, [1]))
    guard = MessageGuard(None, norm_cap=1e3)

    def numbers(loss_sum=2.5, loss_steps=3, bytes_sent=100, accuracy=0.5, macro_f1=0.4, dp_epsilon=0.0,
                mix_error=0.1, mix_reference=2.0, mix_rounds=2):
        return torch.tensor([loss_sum, loss_steps, bytes_sent, accuracy, macro_f1, dp_epsilon, mix_error,
                             mix_reference, mix_rounds], dtype=torch.float64)

    assert check_evaluation(numbers(), factors, layout, guard, *own) is None
    for bad in (dict(loss_sum=-1.0), dict(loss_steps=-1), dict(loss_steps=2.5), dict(bytes_sent=1.5),
                dict(accuracy=1.5), dict(macro_f1=-0.1), dict(dp_epsilon=-1.0), dict(mix_error=-1e-9),
                dict(mix_reference=-1.0), dict(mix_rounds=-1), dict(mix_rounds=0.5)):
        assert "implausible" in check_evaluation(numbers(**bad), factors, layout, guard, *own), bad
    assert "NaN" in check_evaluation(numbers(bytes_sent=float("nan")), factors, layout, guard, *own)
    assert "norm_cap" in check_evaluation(numbers(), factors * 1e6, layout, guard, *own)
    nan = factors.clone()
    nan[3] = float("nan")
    assert "NaN" in check_evaluation(numbers(), nan, layout, guard, *own)


def test_norm_bounds_absolute_and_relative_to_the_median():
    groups, extras = random_agents(2)
    own, own_extras = select(groups, extras, [0])
    scaled = [FactorGroup(g.names, g.A * 3, g.B) for g in own]
    norm = float(product_norm(own)[0])
    guard = MessageGuard(None, norm_bound=2.0)
    assert guard.check_relative({1: norm, 2: 1.5 * norm}, norm) == {}
    assert list(guard.check_relative({1: norm, 2: 3 * norm}, norm)) == [2]  # one outlier cannot move the median
    assert MessageGuard(None).check_relative({1: 1e30}, norm) == {}
    capped = MessageGuard(None, norm_cap=norm * 2)
    assert capped.check_values(own, own_extras) is None
    assert "norm_cap" in capped.check_values(scaled, own_extras)
    head = {name: x * 1e30 for name, x in own_extras.items()}
    assert "extra" in capped.check_values(own, head)  # extras are bounded too
    nan = {name: x * float("nan") for name, x in own_extras.items()}
    assert "NaN" in MessageGuard(None).check_values(own, nan)


def test_membership_protocol():
    """Agreed views through a store: startup, a late agent left out then waited for, a broken group replaced,
    an agent with another message layout refused."""
    store = dist.HashStore()
    transports = [Transport(store, j, 3, fingerprint="same", backend="gloo", timeout=1.0, startup_timeout=5.0)
                  for j in range(3)]

    def agree_all(round_index: int, delays=(0.0, 0.0, 0.0)):
        def one(j):
            time.sleep(delays[j])
            return transports[j].agree(round_index)
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(one, range(3)))

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(lambda t: t.start(0), transports)) == [0, 0, 0]
    views = agree_all(0)
    assert views[0] == views[1] == views[2] and views[0].agents == [0, 1, 2]
    # round 1: agent 2 arrives after the others' timeout: left out, asks to join
    views = agree_all(1, delays=(0.0, 0.0, 1.6))
    assert views[0] == views[1] and views[0].agents == [0, 1] and views[0].group == 1 and views[2] is None
    assert [e["event"] for e in transports[2].events] == ["left_out"]
    assert transports[0].events[-1] == {"round": 1, "event": "peer_lost", "agent": 2}
    # round 2: agent 2 is late again but within the timeout: the others wait for the joiner
    views = agree_all(2, delays=(0.0, 0.0, 0.3))
    assert all(v == views[0] for v in views) and views[0].agents == [0, 1, 2] and views[0].group == 2
    assert not store.check(["join/2"])
    # round 3: same members keep their group; round 4: a member reporting a failed group gets a new one
    assert {v.group for v in agree_all(3)} == {2}
    transports[1].broken = True
    assert {v.group for v in agree_all(4)} == {4}
    # an agent whose message layout differs from the run's cannot start, and is never admitted
    stranger = Transport(store, 2, 3, fingerprint="other", backend="gloo", timeout=1.0, startup_timeout=5.0)
    assert stranger.incarnation == 2
    with pytest.raises(ValueError, match="fingerprint: .*differs from the run's"):
        stranger.start(0)
    with ThreadPoolExecutor(3) as pool:
        views = list(pool.map(lambda t: t.agree(5), [transports[0], transports[1], stranger]))
    assert views[0].agents == [0, 1] and views[2] is None
    assert {"round": 5, "event": "refused", "agent": 2} in transports[0].events + transports[1].events


def test_faults_from_a_spec():
    spec = "2:exit@3, 1:nan@1,2:stall@4=1.5,2:nan@0,2:scale@1=10,2:badtag@2"
    faults = Faults.parse(spec, 2, restarted=False)
    assert faults.events == {"exit": {3: None}, "nan": {0: None}, "stall": {4: 1.5}, "scale": {1: 10.0},
                             "badtag": {2: None}}
    assert Faults.parse(spec, 2, restarted=True) == Faults()  # a restarted process runs cleanly
    guard = MessageGuard(KEY)
    guard.bind(b"nonce")
    context = TagContext("mix", 0, 0, 2, 1, 0)
    seal = lambda data: guard.seal(data, context)  # noqa: E731
    assert torch.isnan(faults.outgoing(0, torch.ones(3), seal)[:3]).all()
    assert torch.equal(faults.outgoing(1, torch.ones(3), seal)[:3], torch.full((3,), 10.0))
    assert guard.open(faults.outgoing(2, torch.ones(3), seal), context)[1] == "wrong message tag"
    assert torch.equal(faults.outgoing(3, torch.ones(3), seal), seal(torch.ones(3)))
    for bad in ("2:exit", "2:boom@1", "x:nan@1", "1:stall@2", "1:nan@2=3", "1:scale@2"):
        with pytest.raises(ConfigError, match="faults"):
            Faults.parse(bad, 1, restarted=False)


@pytest.mark.parametrize("env, changes, argument", [
    ({}, {}, "launcher"),
    ({"RANK": "0", "WORLD_SIZE": "3"}, {}, "agents"),
    ({"RANK": "0", "WORLD_SIZE": "4"}, {"backend": "mpi"}, "backend"),
    ({"RANK": "0", "WORLD_SIZE": "4"}, {"round_timeout": 0.0}, "round_timeout"),
    ({"RANK": "0", "WORLD_SIZE": "4"}, {"round_timeout": math.inf}, "round_timeout"),  # timedelta overflowed
    ({"RANK": "0", "WORLD_SIZE": "4"}, {"startup_timeout": 1e300}, "startup_timeout"),
    ({"RANK": "0", "WORLD_SIZE": "4"}, {"backend": "nccl"}, "backend"),
])
def test_run_distributed_rejects_bad_setups(tiny, tmp_path, monkeypatch, env, changes, argument):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        run_distributed(tiny_config(tiny, tmp_path / "run"), options=DistributedOptions(**changes))
    assert argument in str(error.value) and "\n" not in str(error.value)


def one_agent_run(tiny, tmp_path, monkeypatch):
    """A finished one-round run of one agent alone (RANK 0 of 1): its config."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    config = tiny_config(tiny, tmp_path / "run", algorithm="local", agents=1, rounds=1)
    run_distributed(config, store=dist.HashStore())
    return config


def test_resume_with_another_configuration_leaves_the_run(tiny, tmp_path, monkeypatch):
    """One agent alone: resuming with another configuration is refused before the run's config.json is rewritten."""
    config = one_agent_run(tiny, tmp_path, monkeypatch)
    before = files_of(tmp_path / "run")
    with pytest.raises(ConfigError, match="^lr: ") as error:
        run_distributed(dataclasses.replace(config, rounds=2, lr=0.5), resume=True, store=dist.HashStore())
    assert "\n" not in str(error.value)
    assert files_of(tmp_path / "run") == before


def test_the_simulator_refuses_to_resume_a_distributed_run(tiny, tmp_path, monkeypatch):
    """Its checkpoints are the agents' own: the simulator found none, trained from round 0 and overwrote the run."""
    config = one_agent_run(tiny, tmp_path, monkeypatch)
    before = files_of(tmp_path / "run")
    with pytest.raises(ConfigError, match="^resume: .*--launcher dist --nproc 1 --rounds N") as error:
        Trainer(dataclasses.replace(config, rounds=2)).run(resume=True)
    assert "\n" not in str(error.value)
    assert files_of(tmp_path / "run") == before


def test_a_finished_run_is_refused_with_a_command_that_continues_it(tiny, tmp_path, monkeypatch, capsys):
    """Started again into a finished run: one line naming the run folder (not an agent's folder), from the launcher
    before it starts any agent, or from each agent under torchrun; the command it gives continues the run."""
    from decaf_ext.cli.commands import main as cli_main

    config = one_agent_run(tiny, tmp_path, monkeypatch)
    before = files_of(tmp_path / "run")
    with pytest.raises(ConfigError) as error:  # an agent under torchrun
        run_distributed(config, store=dist.HashStore())
    advice = f"'decaf-train --resume {tmp_path / 'run'} --launcher dist --nproc 1 --rounds N'"
    assert str(error.value).startswith(f"output_dir: {str(tmp_path / 'run')!r} already holds a finished run")
    assert advice in str(error.value) and "agent_00" not in str(error.value)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "run.yaml").write_text(json.dumps(config.to_dict()))
    assert main(["--nproc", "1", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m decaf_ext.distributed: error: output_dir: ") and "\n" not in err and advice in err
    assert files_of(tmp_path / "run") == before
    assert cli_main(advice.strip("'").replace("--rounds N", "--rounds 2").split()[1:]) == 0
    assert [r["round"] for r in read_metrics(str(tmp_path / "run"))] == [1, 2]


def test_command_line_errors_are_one_line(capsys):
    assert main(["--nproc", "3", "--agents", "4"]) == 2
    assert main(["--nproc", "4", "--agents", "4", "--backend", "mpi"]) == 2
    assert main(["--nproc", "4", "--compare", "dlora,decaf"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": error: ")[1].split(" ")[0] for line in lines] == ["nproc:", "backend", "compare:"]


def test_launch_restarts_failed_processes(tmp_path):
    script = ("import os, pathlib, sys\n"
              f"marker = pathlib.Path({str(tmp_path)!r}, os.environ['RANK'])\n"
              "first = not marker.exists()\n"
              "marker.touch()\n"
              "sys.exit(3 if first and os.environ['RANK'] == '1' else 0)\n")
    assert launch([sys.executable, "-c", script], 3) == [0, 3, 0]
    for marker in tmp_path.iterdir():
        marker.unlink()
    assert launch([sys.executable, "-c", script], 3, max_restarts=1) == [0, 0, 0]


if __name__ == "__main__":
    agent_main(sys.argv[1])
