"""decaf_ext.integrations.averager / decaf_ext.integrations.hf_callback: 3 agent processes on gloo (localhost), each with its own tiny peft
model and data shard, (a) in a plain PyTorch loop with DecentralizedAverager, for every registered strategy and
then with an agent killed mid-run, (b) in a Hugging Face Trainer with DecentralizedCallback. Every agent saves
its factors before and after each communication; the test gathers them and checks that every agent's new
factors are what the strategy computes from all agents' factors. Run as a script, this file is the body of one
agent process.
"""

from __future__ import annotations

import json
from functools import partial
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from decaf_ext.distributed import launch
from faults import Faults
from decaf_ext.robust import parse_robust
from decaf_ext.lora import FactorGroup, RankPadding, collect_extras, collect_factors
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.strategies import get_strategy, strategy_names
from decaf_ext.topology import make_schedule
from test_trainer import CLASSES, make_tiny_dataset, make_tiny_model
from user_strategy import NAME as USER_STRATEGY

AGENTS = 3
PERIOD = 2
STEPS = 6  # 3 communication rounds
ALGORITHMS = strategy_names()
DEAD = {"algorithm": "decaf", "faults": "2:exit@1"}  # agent 2 dies when round 1 is due (0-based)
# With a run key and a norm bound: agent 1 sends a wrong message tag in round 1, agent 2 its factors x 1000 in
# round 2 (finite, correctly tagged).
GUARDED = {"algorithm": "dlora", "faults": "1:badtag@1,2:scale@2=1000", "norm_bound": 10.0}
COMPRESSED = {"algorithm": "decaf", "message_dtype": "int8"}
RANKED = {"algorithm": "decaf", "lora_ranks": [2, 4, 8]}  # agent i has LoRA rank lora_ranks[i]
# agent 0 Byzantine in every round (x1e3, sign-flipped, random; tagged with the run key), under --robust, with int8
# messages and unequal ranks
ROBUST = {"algorithm": "decaf", "robust": "clipped_gossip:0.01", "message_dtype": "int8", "lora_ranks": [2, 4, 8],
          "faults": "0:scale@0=1000,0:flip@1,0:random@2"}


# ------------------------------------------------------------------------------------------- agent side


def tiny_agent(model_dir: str, data_dir: str, rank: int, lora_rank: int = 4):
    """(peft model, [n, 16] token ids, masks, labels) of agent `rank`: LoRA r=lora_rank on query/value + a head;
    this agent's shard of the tiny dataset (every AGENTS-th text)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(rank)  # agents start apart: the mixing has something to do from the first round
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(CLASSES))
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=lora_rank, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["query", "value"]))
    texts, labels = [], []
    for label, name in enumerate(sorted(CLASSES)):
        for path in sorted(Path(data_dir, name).iterdir()):
            texts.append(path.read_text())
            labels.append(label)
    tokens = AutoTokenizer.from_pretrained(model_dir)(texts[rank::AGENTS], truncation=True, max_length=16,
                                                      padding="max_length", return_tensors="pt")
    return model, tokens["input_ids"], tokens["attention_mask"], torch.tensor(labels[rank::AGENTS])


def snapshot(model, padding: RankPadding | None = None) -> dict:
    groups, extras = collect_factors([model], padding=padding), collect_extras([model])
    return {"groups": [(g.names, g.A.clone(), g.B.clone()) for g in groups],
            "extras": {k: x.clone() for k, x in extras.items()}}


def save_round(out: Path, rank: int, stats, before: dict, after: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"stats": vars(stats), "before": before, "after": after}, out / f"round{stats.round}_agent{rank}.pt")


def plain_loop(spec: dict, run: dict, store: dist.Store, out: Path) -> None:
    """The user's loop: AdamW steps on this agent's shard, DecentralizedAverager.step() after each."""
    from decaf_ext.integrations.averager import DecentralizedAverager

    rank = dist.get_rank()
    ranks = run.get("lora_ranks", [4] * AGENTS)
    model, ids, mask, labels = tiny_agent(spec["model"], spec["data"], rank, ranks[rank])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    averager = DecentralizedAverager(model, algorithm=run["algorithm"], topology="ring", period=PERIOD,
                                     process_group=dist.group.WORLD, store=store, optimizer=optimizer,
                                     round_timeout=spec["round_timeout"], norm_bound=run.get("norm_bound"),
                                     run_key_file=spec["key"] if {"norm_bound", "robust"} & set(run) else None,
                                     robust=run.get("robust"),
                                     message_dtype=run.get("message_dtype", "float32"),
                                     ranks=run.get("lora_ranks"),
                                     test_hooks=partial(Faults.parse, run.get("faults", "")))
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        batch = torch.randperm(len(labels), generator=generator)[:8]
        model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = snapshot(model, averager.padding)
        stats = averager.step()
        if stats is not None:
            save_round(out, rank, stats, before, snapshot(model, averager.padding))
    averager.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"events_agent{rank}.json").write_text(json.dumps(averager.stats.events))


def hf_trainer(spec: dict, out: Path) -> None:
    """The user's Hugging Face script: Trainer + peft, made decentralized by one callback."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from decaf_ext.integrations.hf_callback import DecentralizedCallback

    rank = int(os.environ["RANK"])
    model, ids, mask, labels = tiny_agent(spec["model"], spec["data"], rank)
    callback = DecentralizedCallback(model, algorithm="decaf", topology="ring", period=PERIOD,
                                     round_timeout=spec["round_timeout"])
    assert "RANK" not in os.environ  # the Trainer must not see torchrun's variables (it would run DDP)

    class Recorder(TrainerCallback):
        """Snapshots before (first in the list) and after (last) the decentralized callback's step."""

        def __init__(self) -> None:
            self.before = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.before is None:
                self.before = snapshot(model)
                return
            last = callback.averager.stats.last
            if last is not None and last.step == state.global_step:
                save_round(out, rank, last, self.before, snapshot(model))
            self.before = None

    recorder = Recorder()
    examples = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]
    args = TrainingArguments(str(out / f"hf{rank}"), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             seed=rank)
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[recorder, callback, recorder])
    trainer.train()
    assert callback.averager.stats.rounds == STEPS // PERIOD and callback.averager.stats.bytes_sent > 0


def agent_main(spec_text: str) -> None:
    spec = json.loads(spec_text)
    torch.set_num_threads(1)
    out = Path(spec["out"])
    if spec["mode"] == "hf":
        hf_trainer(spec, out / "hf")
        return
    dist.init_process_group("gloo")  # the user's own process group; the averager leaves it alone
    base = dist.distributed_c10d._get_default_store()
    for k, run in enumerate(spec["runs"]):
        plain_loop(spec, run, dist.PrefixStore(f"run{k}", base), out / f"run{k}")


# ------------------------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_tiny_dataset(root / "data")


def launch_agents(tiny, out: Path, **spec) -> list[int]:
    model, data = tiny
    (out / "key").write_text("a shared secret of this run")  # 16 bytes at least
    spec = {"model": model, "data": data, "out": str(out), "key": str(out / "key"), "round_timeout": 3.0, **spec}
    return launch([sys.executable, __file__, json.dumps(spec)], AGENTS)


@pytest.fixture(scope="module")
def plain_runs(tiny, tmp_path_factory):
    """One launch: every registered strategy in turn, a dlora run with a run key, a norm bound and faulty messages,
    a decaf run with int8 messages, one with LoRA ranks 2, 4, 8, one with a Byzantine agent under --robust, then a
    decaf run in which agent 2 dies."""
    assert USER_STRATEGY in ALGORITHMS
    out = tmp_path_factory.mktemp("loop")
    runs = [{"algorithm": name} for name in ALGORITHMS] + [GUARDED, COMPRESSED, RANKED, ROBUST, DEAD]
    return runs, out, launch_agents(tiny, out, mode="loop", runs=runs)


def stack(snapshots: list[dict]) -> tuple[list[FactorGroup], dict[str, torch.Tensor]]:
    """Agents' one-agent snapshots -> groups A [M, k, r, n], B [M, k, m, r] and extras [k, ...]."""
    groups = [FactorGroup(names, torch.cat([s["groups"][g][1] for s in snapshots], dim=1),
                          torch.cat([s["groups"][g][2] for s in snapshots], dim=1))
              for g, (names, _, _) in enumerate(snapshots[0]["groups"])]
    return groups, {k: torch.cat([s["extras"][k] for s in snapshots]) for k in snapshots[0]["extras"]}


def check_rounds(folder: Path, algorithm: str, agents: list[int]) -> list[dict]:
    """Every saved round of `agents` (the others' rounds are inputs only): their new factors equal the strategy's,
    computed here from the factors every agent had before the round (the [N, N] form when an agent heard from all
    its neighbours, else its row over the agents it mixed with, a missing neighbour's weight on its own factors)."""
    strategy = get_strategy(algorithm)
    W = make_schedule("ring", AGENTS).at(0)
    rounds = sorted({int(p.name.split("_")[0][5:]) for p in folder.glob("round*_agent*.pt")})
    seen = []
    for t in rounds:
        saved = {i: torch.load(folder / f"round{t}_agent{i}.pt") for i in range(AGENTS)
                 if (folder / f"round{t}_agent{i}.pt").exists()}
        everyone = len(saved) == AGENTS and all(s["stats"]["mixed_with"][0] == i for i, s in saved.items())
        full = strategy.communicate(*stack([saved[i]["before"] for i in range(AGENTS)]), W) if everyone else None
        for i, record in saved.items():
            if i not in agents:
                continue
            heard = record["stats"]["mixed_with"]
            if full is not None and sorted(heard) == list(range(AGENTS)):
                groups, extras = full
                expected = ([FactorGroup(g.names, g.A[:, i:i + 1], g.B[:, i:i + 1]) for g in groups],
                            {k: x[i:i + 1] for k, x in extras.items()})
            else:
                weights = W[i, heard].clone()
                weights[0] += W[i].sum() - weights.sum()
                expected = strategy.communicate(*stack([saved[j]["before"] for j in heard]), weights[None])
            got_groups, got_extras = stack([record["after"]])
            for got, want in zip(got_groups, expected[0], strict=True):
                torch.testing.assert_close(got.B @ got.A, want.B @ want.A, rtol=1e-4, atol=1e-6)
                if algorithm != "decaf":
                    torch.testing.assert_close(got.A, want.A, rtol=1e-4, atol=1e-6)
            for name, x in got_extras.items():
                torch.testing.assert_close(x, expected[1][name], rtol=1e-4, atol=1e-6)
            seen.append(record["stats"])
    return seen


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_plain_loop_mixes_as_the_strategy(plain_runs, algorithm):
    runs, out, statuses = plain_runs
    assert statuses[0] == statuses[1] == 0
    k = runs.index({"algorithm": algorithm})
    seen = check_rounds(out / f"run{k}", algorithm, list(range(AGENTS)))
    if algorithm == "local":  # sends nothing: no round at all
        assert seen == []
        return
    assert len(seen) == AGENTS * STEPS // PERIOD
    assert all(s["members"] == [0, 1, 2] and s["bytes_sent"] > 0 for s in seen)
    assert {s["step"] for s in seen} == set(range(PERIOD, STEPS + 1, PERIOD))


def test_plain_loop_with_unequal_ranks(plain_runs):
    """Agents of LoRA rank 2, 4 and 8 (ranks=[2, 4, 8]): each agent's new update s_i B_i A_i is the leading r_i
    directions of DeCAF on every agent's padded, scaled factors (RankPadding), computed here."""
    runs, out, statuses = plain_runs
    assert statuses[0] == statuses[1] == 0
    folder = out / f"run{runs.index(RANKED)}"
    W = make_schedule("ring", AGENTS).at(0)
    rounds = sorted({int(p.name.split("_")[0][5:]) for p in folder.glob("round*_agent*.pt")})
    assert len(rounds) == STEPS // PERIOD
    for t in rounds:
        saved = [torch.load(folder / f"round{t}_agent{i}.pt") for i in range(AGENTS)]
        expected, _ = get_strategy("decaf").communicate(*stack([s["before"] for s in saved]), W)
        for i, (record, r) in enumerate(zip(saved, RANKED["lora_ranks"])):
            for got, want in zip(stack([record["after"]])[0], expected, strict=True):
                assert not got.A[:, 0, r:].any() and not got.B[:, 0, :, r:].any()
                torch.testing.assert_close(got.B @ got.A, want.B[:, i:i + 1, :, :r] @ want.A[:, i:i + 1, :r],
                                           rtol=1e-4, atol=1e-6)


def test_plain_loop_with_int8_messages(plain_runs):
    """Every agent's new factors are the strategy's row on its own exact factors and its neighbours' as decoded
    from their int8 messages; bytes_sent counts the encoded messages."""
    runs, out, statuses = plain_runs
    assert statuses[0] == statuses[1] == 0
    folder = out / f"run{runs.index(COMPRESSED)}"
    strategy, W = get_strategy("decaf"), make_schedule("ring", AGENTS).at(0)
    rounds = sorted({int(p.name.split("_")[0][5:]) for p in folder.glob("round*_agent*.pt")})
    assert len(rounds) == STEPS // PERIOD
    for t in rounds:
        saved = {i: torch.load(folder / f"round{t}_agent{i}.pt") for i in range(AGENTS)}
        for i, record in saved.items():
            heard = record["stats"]["mixed_with"]
            assert heard == [i, *sorted(set(range(AGENTS)) - {i})]
            own = stack([record["before"]])
            layout = MessageLayout(*own, trains_A=True, message_dtype="int8")
            data = layout.pack_each(*stack([saved[j]["before"] for j in heard]))
            data = torch.cat([data[:1], layout.received(data[1:])])
            expected, _ = strategy.communicate(*layout.unpack(data, *own), W[i, heard][None])
            for got, want in zip(stack([record["after"]])[0], expected, strict=True):
                torch.testing.assert_close(got.B @ got.A, want.B @ want.A, rtol=1e-4, atol=1e-6)
            assert record["stats"]["bytes_sent"] == (AGENTS - 1) * layout.message_bytes < (AGENTS - 1) * (
                layout.data_numel * 4) / 3


def test_plain_loop_with_a_byzantine_agent_under_robust(plain_runs):
    """Agent 0 sends x1e3, sign-flipped and random factors with a valid tag (int8 messages, ranks 2, 4, 8): nothing is
    rejected, and every round each honest agent's (product, head) moves at most 2 tau sum_{j != i} W_ij (the clipped
    mix, then DeCAF's truncation)."""
    runs, out, statuses = plain_runs
    assert statuses[0] == statuses[1] == 0
    folder = out / f"run{runs.index(ROBUST)}"
    tau = parse_robust(ROBUST["robust"]).tau
    W = make_schedule("ring", AGENTS).at(0)
    rounds = sorted({int(p.name.split("_")[0][5:]) for p in folder.glob("round*_agent*.pt")})
    assert len(rounds) == STEPS // PERIOD
    for i in (1, 2):
        assert not [e for e in json.loads((folder / f"events_agent{i}.json").read_text()) if e["event"] == "rejected"]
        for t in rounds:
            record = torch.load(folder / f"round{t}_agent{i}.pt")
            assert record["stats"]["mixed_with"] == [i, *sorted(set(range(AGENTS)) - {i})]
            (before, head), (after, new_head) = stack([record["before"]]), stack([record["after"]])
            moved = sum((a.B @ a.A - b.B @ b.A).square().sum() for a, b in zip(after, before, strict=True))
            moved = moved + sum((new_head[k] - head[k]).square().sum() for k in head)
            assert moved.sqrt() <= 2 * tau * (1 - W[i, i]) * (1 + 1e-4)


def test_a_dead_agent_does_not_hang_the_others(plain_runs):
    runs, out, statuses = plain_runs
    assert statuses[2] == -9 and statuses[0] == statuses[1] == 0  # agent 2 was SIGKILLed in the last run
    seen = check_rounds(out / f"run{len(runs) - 1}", DEAD["algorithm"], [0, 1])
    by_round = {}
    for s in seen:
        by_round.setdefault(s["round"], []).append(s)
    assert [s["members"] for s in by_round[0]] == [[0, 1, 2]] * 2
    assert all(s["members"] == [0, 1] and sorted(s["mixed_with"]) == [0, 1] for t in (1, 2) for s in by_round[t])


def test_wrong_tags_and_oversized_products_are_rejected(plain_runs):
    runs, out, statuses = plain_runs
    folder = out / f"run{runs.index(GUARDED)}"
    seen = {(s["round"], s["mixed_with"][0]): s for s in check_rounds(folder, GUARDED["algorithm"], [0, 1, 2])}
    assert len(seen) == AGENTS * STEPS // PERIOD
    events = {i: json.loads((folder / f"events_agent{i}.json").read_text()) for i in range(AGENTS)}
    rejected = {i: [(e["round"], e["agent"], e["reason"]) for e in events[i] if e["event"] == "rejected"]
                for i in range(AGENTS)}
    assert rejected[0][0] == rejected[2][0] == (1, 1, "wrong message tag")
    assert [r[:2] for r in rejected[0][1:]] == [r[:2] for r in rejected[1]] == [(2, 2)]
    assert "LoRA product norm" in rejected[1][0][2]
    assert sorted(seen[1, 0]["mixed_with"]) == [0, 2] and sorted(seen[1, 1]["mixed_with"]) == [0, 1, 2]
    assert sorted(seen[2, 0]["mixed_with"]) == [0, 1] and sorted(seen[2, 2]["mixed_with"]) == [0, 1, 2]
    assert all(sorted(s["mixed_with"]) == [0, 1, 2] for (t, _), s in seen.items() if t == 0)


def test_hf_trainer_with_the_callback(tiny, tmp_path):
    statuses = launch_agents(tiny, tmp_path, mode="hf")
    assert statuses == [0] * AGENTS
    seen = check_rounds(tmp_path / "hf", "decaf", list(range(AGENTS)))
    assert len(seen) == AGENTS * STEPS // PERIOD and all(s["members"] == [0, 1, 2] for s in seen)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def one_agent_env(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")


@pytest.fixture(scope="module")
def lora_model(tiny):
    return tiny_agent(*tiny, 0)[0]


@pytest.mark.parametrize("changes, argument", [
    ({"period": 0}, "period"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"algorithm": "gossip"}, "algorithm"),
    ({"options": {"n_iters": 3}}, "n_iters"),
    ({"options": {"method": "svd"}}, "method"),
    ({"options": "method=svd"}, "options"),  # TypeError of ** before
    ({"topology": make_schedule("ring", 4)}, "process_group"),
    ({"topology": "hypercube"}, "topology"),
    ({"run_key_file": "/no/such/key"}, "run_key_file"),
    ({"optimizer_state": "forget"}, "optimizer_state"),
    ({"message_dtype": "int4"}, "message_dtype"),
    ({"startup_timeout": math.inf}, "startup_timeout"),  # timedelta overflowed
    ({"norm_bound": "2"}, "norm_bound"),  # TypeError
    ({"robust": "clipped_gossip:0"}, "robust"),
    ({"robust": "median"}, "robust"),
    ({"backend": "nccl", "startup_timeout": 1.0}, "backend"),  # the model is on the CPU
])
def test_bad_input_gives_one_line_errors(lora_model, one_agent_env, changes, argument):
    from decaf_ext.integrations.averager import DecentralizedAverager

    with pytest.raises(ValueError) as error:
        DecentralizedAverager(lora_model, store=dist.HashStore(), **changes)
    assert argument in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_period_warmup_and_optimizer_state(lora_model, monkeypatch, policy):
    """One agent alone (complete graph of 1): rounds after steps warmup + period, + 2 period, ...; "reset" drops the
    optimizer state of the communicated parameters after each round, "keep" leaves it."""
    from decaf_ext.integrations.averager import DecentralizedAverager

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    trainable = [p for p in lora_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    averager = DecentralizedAverager(lora_model, algorithm="dlora", topology="complete", period=3, warmup_steps=2,
                                     store=dist.HashStore(), optimizer=optimizer, optimizer_state=policy)
    rounds = []
    for step in range(1, 12):
        sum(p.sum() for p in trainable).backward()
        optimizer.step()
        optimizer.zero_grad()
        stats = averager.step()
        if stats is not None:
            rounds.append(step)
            assert stats.mixed_with == [0] and stats.bytes_sent == 0 and stats.disagreement == 0.0
            assert (len(optimizer.state) == 0) == (policy == "reset")
    assert rounds == [5, 8, 11] and averager.stats.rounds == 3
    averager.close()


def test_a_model_without_lora_layers_is_rejected(tiny, one_agent_env):
    from transformers import AutoModelForSequenceClassification

    from decaf_ext.integrations.averager import DecentralizedAverager

    plain = AutoModelForSequenceClassification.from_pretrained(tiny[0], num_labels=3)
    with pytest.raises(ValueError, match="^model: .*LoRA") as error:
        DecentralizedAverager(plain, store=dist.HashStore())
    assert "\n" not in str(error.value)


def test_a_model_with_nothing_to_train_is_rejected(tiny, one_agent_env):
    """A peft model loaded for inference (PeftModel.from_pretrained without is_trainable=True): StopIteration before."""
    from decaf_ext.integrations.averager import DecentralizedAverager

    model = tiny_agent(*tiny, 0)[0].requires_grad_(False)
    with pytest.raises(ValueError, match="^model: .*trainable") as error:
        DecentralizedAverager(model, store=dist.HashStore())
    assert "\n" not in str(error.value)


if __name__ == "__main__":
    agent_main(sys.argv[1])
