"""decaf_ext.privacy: DP-SGD through Opacus in the simulator, with one process per agent and in the user's own loop
(Opacus's API next to DecentralizedAverager), on the tiny BERT of test_trainer. Each promise of docs/privacy.md is
attacked here: the reported epsilon is Opacus's accountant for the steps taken, one example cannot move a step by
more than the clip norm allows, an unreachable budget or a bad option stops the run before training, a resumed run
spends what an uninterrupted one spends. Run as a script, this file is the body of one user-loop agent process.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from decaf_ext.cli import main as cli_main
from decaf_ext.cli.tables import format_result
from decaf_ext.config import TrainConfig
from decaf_ext.distributed import launch
from decaf_ext.errors import ConfigError
from decaf_ext.lora import collect_factors
from decaf_ext.privacy import DPBudget, PrivateAgent
from decaf_ext.privacy import dp_sgd
from decaf_ext.sim.trainer import Trainer
from test_trainer import make_tiny_dataset, make_tiny_model, read_metrics, tiny_config, without_times

DP = dict(dp_epsilon=3.0, eval_every=1)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Optimal order is the largest")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_tiny_dataset(root / "data")


def opacus_epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of Opacus's own accountant after `steps` steps of the subsampled Gaussian mechanism."""
    counter = create_accountant(accountant)
    counter.history = [(sigma, sample_rate, steps)]
    return counter.get_epsilon(delta=delta)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("changes, argument", [
    (dict(dp_epsilon=0.0), "dp_epsilon"), (dict(dp_epsilon=-1.0), "dp_epsilon"),
    (dict(dp_epsilon=math.nan), "dp_epsilon"), (dict(dp_epsilon=math.inf), "dp_epsilon"),
    (dict(dp_epsilon=1.0, dp_delta=1.0), "dp_delta"), (dict(dp_epsilon=1.0, dp_delta=0.0), "dp_delta"),
    (dict(dp_epsilon=1.0, dp_delta=-0.1), "dp_delta"), (dict(dp_epsilon=1.0, dp_max_grad_norm=0.0), "dp_max_grad_norm"),
    (dict(dp_max_grad_norm=-1.0), "dp_max_grad_norm"), (dict(dp_accountant="gdp"), "dp_accountant"),
    (dict(dp_epsilon=1.0, task="clip"), "task"), (dict(dp_epsilon=1.0, task="causal_lm"), "task"),
])
def test_bad_privacy_options_are_one_line_errors(changes, argument):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**changes).validate()
    message = str(caught.value)
    assert message.startswith(argument) and "\n" not in message, message


def test_privacy_without_opacus_installed_is_one_line(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opacus" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^dp_epsilon: DP-SGD needs the package opacus \(pip install"):
        TrainConfig(dp_epsilon=1.0).validate()


@pytest.mark.parametrize("argv, argument", [
    (["--dp-epsilon", "0"], "dp_epsilon"), (["--dp-epsilon", "1", "--dp-delta", "1"], "dp_delta"),
    (["--dp-epsilon", "1", "--dp-max-grad-norm", "-2"], "dp_max_grad_norm"),
])
def test_bad_privacy_flags_exit_2_before_training(tmp_path, capsys, argv, argument):
    assert cli_main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and argument in error, error
    assert not (tmp_path / "run").exists()


def test_unreachable_epsilon_stops_before_training(tiny, tmp_path):
    """epsilon 0.05 at delta 1e-5 in 40 steps: no noise multiplier reaches it (Opacus's search gives up); the run
    names the option and leaves nothing behind."""
    with pytest.raises(ConfigError, match=r"^dp_epsilon: 0.05 cannot be reached in 40 steps") as caught:
        Trainer(tiny_config(tiny, tmp_path / "run", dp_epsilon=0.05, dp_delta=1e-5, rounds=20))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_budget_that_needs_absurd_noise_is_refused():
    """epsilon 1 in 1000 full-batch steps needs a noise multiplier of about 129 (Opacus finds it): refused."""
    with pytest.raises(ConfigError, match=r"^dp_epsilon: 1 cannot be reached in 1000 steps .* above 100"):
        dp_sgd.noise_multiplier(DPBudget(1.0, 1e-5, 1.0), 1e-5, 1.0, 1000)
    assert dp_sgd.noise_multiplier(DPBudget(1.0, 1e-5, 1.0), 1e-5, 1.0, 500) <= dp_sgd.MAX_NOISE_MULTIPLIER


# ------------------------------------------------------------------------------------------- the simulator


def test_reported_epsilon_is_opacus_accountant_for_the_steps_taken(tiny, tmp_path):
    """Recomputed from the run's own numbers (examples per agent, batch size, rounds x local steps): the noise
    multiplier Opacus calibrates and, after every round, the epsilon its accountant gives for the steps so far."""
    config = tiny_config(tiny, tmp_path / "run", **DP)
    summary = Trainer(config).run()
    records = read_metrics(str(tmp_path / "run"))
    steps = config.rounds * config.local_steps
    for agent, n in enumerate(summary["examples"]["per_agent"]):
        sample_rate, delta = 1 / math.ceil(n / config.batch_size), 1 / n
        sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                     accountant="rdp", epsilon_tolerance=0.03)
        reported = summary["privacy"]["agents"][agent]
        assert reported["noise_multiplier"] == sigma and reported["sample_rate"] == sample_rate
        assert reported["delta"] == delta and reported["steps_taken"] == steps
        for record in records:
            assert record["dp_epsilon"][agent] == pytest.approx(
                opacus_epsilon(sigma, sample_rate, record["round"] * config.local_steps, delta), rel=1e-12)
        assert 3.0 - 0.03 <= records[-1]["dp_epsilon"][agent] <= 3.0
    assert summary["final"]["dp_epsilon"] == records[-1]["dp_epsilon"]
    assert all(record["train_loss"] is None for record in records)  # the training loss is not private
    assert f"| DP epsilon spent <= {max(records[-1]['dp_epsilon']):.3g} |" in format_result(summary)


@pytest.mark.parametrize("changes", [dict(algorithm="decaf", rank="cycle:2,4", message_dtype="int8"),
                                     dict(algorithm="dlora_fa", message_dtype="bfloat16"),
                                     dict(algorithm="fedavg", optimizer_state="reset")])
def test_privacy_composes_with_ranks_dtypes_and_strategies(tiny, tmp_path, changes):
    summary = Trainer(tiny_config(tiny, tmp_path / "run", agents=2, rounds=1, **DP, **changes)).run()
    assert all(0 < eps <= 3.0 for eps in summary["final"]["dp_epsilon"])
    assert math.isfinite(summary["final"]["acc_mean"])


def test_privacy_with_an_agent_leaving_the_run(tiny, tmp_path):
    """--churn: the record lists the epsilon of each agent present, the leaver's until it leaves."""
    Trainer(tiny_config(tiny, tmp_path / "run", agents=3, rounds=2, churn="leave:2@1", **DP)).run()
    first, last = read_metrics(str(tmp_path / "run"))
    assert first["live"] == [0, 1, 2] and last["live"] == [0, 1]
    assert len(first["dp_epsilon"]) == 3 and len(last["dp_epsilon"]) == 2
    assert all(0 < a < b <= 3.0 for a, b in zip(first["dp_epsilon"], last["dp_epsilon"]))


def test_resumed_run_spends_what_an_uninterrupted_run_spends(tiny, tmp_path, monkeypatch):
    """With the secret seeds fixed (test only), a run killed after its round-1 checkpoint and resumed ends bitwise
    where the uninterrupted run ends: the accountant, the noise multiplier and both generators come back. Asking the
    resumed run for more rounds than its noise was calibrated for is refused."""
    seeds = iter(range(10**6))
    monkeypatch.setattr(dp_sgd, "_secret_seed", lambda: next(seeds))
    config = dict(**DP, agents=2, rounds=2, checkpoint_every=1)
    straight = Trainer(tiny_config(tiny, tmp_path / "straight", **config))
    straight.run()

    seeds = iter(range(10**6))
    crashing = Trainer(tiny_config(tiny, tmp_path / "resumed", **config))

    def crash_in_round_1(round_index: int) -> None:
        if round_index == 1:
            raise KeyboardInterrupt
        Trainer.communicate(crashing, round_index)

    monkeypatch.setattr(crashing, "communicate", crash_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    with pytest.raises(ConfigError, match="^rounds: the run's DP noise was calibrated for 4 steps"):
        Trainer(tiny_config(tiny, tmp_path / "resumed", **{**config, "rounds": 3})).run(resume=True)
    resumed = Trainer(tiny_config(tiny, tmp_path / "resumed", **config))  # fresh generators, then restored
    resumed.run(resume=True)
    assert without_times(resumed.history) == without_times(straight.history)
    assert [r["dp_epsilon"] for r in resumed.history] == [r["dp_epsilon"] for r in straight.history]
    for a, b in zip(collect_factors(resumed.agents.models), collect_factors(straight.agents.models)):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


# ------------------------------------------------------------------------------- one agent, step by step


class Probe(nn.Module):
    """A tiny model with a Linear layer (Opacus's per-sample gradient hooks) and a per-example mean loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 3)
        self.x, self.y = torch.randn(20, 4), torch.randint(0, 3, (20,))

    def loss(self, examples: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        losses = nn.functional.cross_entropy(self.layer(self.x[examples]), self.y[examples], reduction="none")
        return (losses * (1 if scale is None else scale[examples])).mean()


def probe_agent(max_grad_norm: float = 0.1) -> tuple[Probe, PrivateAgent]:
    probe = Probe()
    optimizer = torch.optim.SGD(probe.parameters(), lr=1.0)
    private = PrivateAgent(probe, optimizer, np.arange(20), budget=DPBudget(3.0, None, max_grad_norm),
                           batch_size=5, steps=10, device=torch.device("cpu"))
    return probe, private


def test_one_example_cannot_move_a_step_beyond_the_clip_norm():
    """The attack: one example whose loss is scaled by 1e6. Plain SGD moves by ~1e5; DP-SGD (noise switched off
    here to see the clipping alone) moves by at most clip norm x batch / expected batch."""
    scale = torch.ones(20)
    scale[3] = 1e6
    probe = Probe()
    probe.loss(torch.arange(20), scale).backward()
    plain = torch.cat([p.grad.flatten() for p in probe.parameters()]).norm()
    assert plain > 1e3  # the attack works without DP-SGD

    probe, private = probe_agent()
    private.optimizer.noise_multiplier = 0.0
    taken = []
    private.sampler.sample_rate = 1.0  # every example, the scaled one included
    before = [p.detach().clone() for p in probe.parameters()]
    private.step(lambda examples: taken.append(examples) or probe.loss(examples, scale))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(probe.parameters(), before)]).norm()
    expected_batch = private.optimizer.expected_batch_size
    assert len(taken[0]) == 20 and 0 < moved <= 0.1 * 20 / expected_batch * (1 + 1e-5)


def test_per_sample_gradients_of_peft_lora_are_exact(tiny):
    """Opacus's hooks on a peft LoRA BERT give each example's own gradient (checked against one backward pass per
    example), over the LoRA factors and the classification head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny[0], num_labels=3, hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["query", "value"])).train()  # no dropout
    reference = copy.deepcopy(model)  # without Opacus's hooks: one backward pass per example
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    private = PrivateAgent(model, optimizer, np.arange(6), budget=DPBudget(3.0, None, 1.0), batch_size=3, steps=4,
                           device=torch.device("cpu"))
    torch.manual_seed(1)
    ids, labels = torch.randint(5, 20, (6, 8)), torch.tensor([0, 1, 2, 0, 1, 2])
    nn.functional.cross_entropy(model(input_ids=ids).logits, labels).backward()
    per_sample = [p.grad_sample.clone() for p in private.optimizer.params]
    private.optimizer.zero_grad(set_to_none=True)
    reference_params = [p for p in reference.parameters() if p.requires_grad]
    for i in range(6):
        loss = nn.functional.cross_entropy(reference(input_ids=ids[i:i + 1]).logits, labels[i:i + 1])
        for batch_grad, own in zip(per_sample, torch.autograd.grad(loss, reference_params)):
            torch.testing.assert_close(batch_grad[i], own, rtol=1e-4, atol=1e-6)
    assert len(per_sample) == len(trainable) == 10  # 2 layers x (query, value) x (A, B) + head weight and bias


def test_noise_and_sampling_do_not_follow_the_torch_seed():
    """Two agents built and stepped after the same torch.manual_seed (the run's seed, which config.json records)
    draw different samples and noise: nobody can subtract the noise from the seed."""
    moved = []
    for _ in range(2):
        torch.manual_seed(0)
        probe, private = probe_agent()
        private.step(probe.loss)
        moved.append(probe.layer.weight.detach().clone())
    assert not torch.equal(*moved)


def test_an_empty_poisson_sample_still_takes_a_noisy_step():
    """Skipping an empty sample would reveal its size: the step adds noise only and the accountant counts it."""
    probe, private = probe_agent()
    private.sampler.sample_rate = 0.0
    before = [p.detach().clone() for p in probe.parameters()]
    private.step(probe.loss)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(probe.parameters(), before))
    assert private.engine.accountant.history == [(private.noise_multiplier, 1 / 4, 1)]


def test_a_layer_that_mixes_examples_is_refused():
    """A trainable BatchNorm normalizes each example by its batch: Opacus refuses it, one line naming the model."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    with pytest.raises(ConfigError, match="^model: Opacus cannot compute its per-sample gradients .*BatchNorm") as caught:
        PrivateAgent(model, torch.optim.SGD(model.parameters(), lr=1.0), np.arange(20),
                     budget=DPBudget(3.0, None, 1.0), batch_size=5, steps=10, device=torch.device("cpu"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_is_opacus_get_noise_multiplier(accountant):
    budget = DPBudget(2.0, 1e-3, 1.0, accountant)
    sigma = dp_sgd.noise_multiplier(budget, 1e-3, 0.25, 40)
    assert sigma == get_noise_multiplier(target_epsilon=2.0, target_delta=1e-3, sample_rate=0.25, steps=40,
                                         accountant=accountant, epsilon_tolerance=0.02)
    assert 1.98 <= opacus_epsilon(sigma, 0.25, 40, 1e-3, accountant) <= 2.0 + 1e-2


# ---------------------------------------------------------------------- one process per agent, user loop


def test_distributed_agents_spend_what_the_simulator_reports(tiny, tmp_path):
    """Two agent processes (--launcher dist's runtime): each agent's epsilon after every round, gathered into the
    reporter's metrics.jsonl, is the simulator's for the same configuration (same data, steps and calibration)."""
    import test_distributed

    config = tiny_config(tiny, tmp_path / "dist", agents=2, **DP)
    spec = {"runs": [(config.to_dict(), "")], "options": {"round_timeout": 30.0, "startup_timeout": 120.0}}
    assert launch([sys.executable, test_distributed.__file__, json.dumps(spec)], 2) == [0, 0]
    simulated = Trainer(tiny_config(tiny, tmp_path / "sim", agents=2, **DP))
    simulated.run()
    distributed = read_metrics(str(tmp_path / "dist"))
    assert [r["dp_epsilon"] for r in distributed] == [r["dp_epsilon"] for r in simulated.history]
    for agent in range(2):
        own = json.loads(Path(tmp_path, "dist", "agents", f"agent_{agent:02d}", "summary.json").read_text())
        assert own["privacy"]["agents"] == [{**simulated.agents.privacy[agent].summary(), "agent": agent}]


def test_an_agent_restarted_without_a_checkpoint_leaves_a_private_run(tiny, tmp_path, monkeypatch):
    """Restarted by torchrun or the launcher before its first checkpoint, an agent may already have sent messages
    its new accountant would not count: it refuses to train again, one line."""
    import torch.distributed as dist
    from decaf_ext.distributed import run_distributed

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("TORCHELASTIC_RESTART_COUNT", "1")):
        monkeypatch.setenv(name, value)
    config = tiny_config(tiny, tmp_path / "run", algorithm="local", agents=1, rounds=1, **DP)
    with pytest.raises(ConfigError, match="^dp_epsilon: agent 0 restarted without a checkpoint") as caught:
        run_distributed(config, store=dist.HashStore())
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


EPOCHS = 2


def recipe_agent(spec_text: str) -> None:
    """One agent of the user-loop recipe of docs/privacy.md: the averager first (it may freeze A), then Opacus's
    make_private_with_epsilon on the same peft model, a plain loop, averager.step() after each DP step."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    import torch.distributed as dist
    from decaf_ext.integrations.averager import DecentralizedAverager
    from test_user_loop import tiny_agent

    spec = json.loads(spec_text)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, ids, mask, labels = tiny_agent(spec["model"], spec["data"], rank)
    averager = DecentralizedAverager(model, algorithm=spec["algorithm"], topology="ring", period=2,
                                     round_timeout=30.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine = PrivacyEngine(accountant="rdp")
    model.train()
    _, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(ids, mask, labels), batch_size=8),
        target_epsilon=3.0, target_delta=1 / len(labels), epochs=EPOCHS, max_grad_norm=1.0, wrap_model=False)
    before = collect_factors([model])[0].B.clone()
    steps = 0
    for _ in range(EPOCHS):
        for x, m, y in loader:
            model(input_ids=x, attention_mask=m, labels=y).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            averager.step()
            steps += 1
    averager.close()
    result = {"epsilon": engine.get_epsilon(1 / len(labels)), "delta": 1 / len(labels), "steps": steps,
              "history": engine.accountant.history, "rounds": averager.stats.rounds,
              "moved": bool(not torch.equal(before, collect_factors([model])[0].B))}
    Path(spec["out"], f"agent{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("algorithm", ["decaf", "dlora_fa"])
def test_user_loop_recipe_with_opacus_and_the_averager(tiny, tmp_path, algorithm):
    spec = {"model": tiny[0], "data": tiny[1], "out": str(tmp_path), "algorithm": algorithm}
    assert launch([sys.executable, __file__, json.dumps(spec)], 2) == [0, 0]
    for agent in range(2):
        result = json.loads((tmp_path / f"agent{agent}.json").read_text())
        (sigma, sample_rate, steps), = result["history"]
        assert steps == result["steps"] and result["rounds"] == steps // 2 and result["moved"]
        assert result["epsilon"] == opacus_epsilon(sigma, sample_rate, steps, result["delta"]) <= 3.0


if __name__ == "__main__":
    recipe_agent(sys.argv[1])


def test_an_agent_rejoining_a_run_that_went_on_draws_fresh_noise_and_accounts_the_rounds_it_missed():
    """An agent process that crashed after its checkpoint had already released the steps after it; restarted, it
    rejoins a run that went on (the runtime's `start` returns a later round). Restoring the checkpoint's generators
    alone redraws the very noise of those released steps, now on other inputs (the attack: two outputs with the
    same noise); `rejoin` draws fresh noise and accounts the missed steps as taken, so epsilon is not reported low."""
    def noise_of_next_step(private, probe) -> torch.Tensor:
        private.sampler.sample_rate = 0.0  # an empty sample: the step is noise only
        before = probe.layer.weight.detach().clone()
        private.step(probe.loss)
        private.sampler.sample_rate = 1 / 4
        return probe.layer.weight.detach() - before

    probe, private = probe_agent()
    private.step(probe.loss)
    checkpoint = private.state_dict()
    released = noise_of_next_step(private, probe)  # sent to the neighbours, then the process crashed
    probe, restored = probe_agent()
    restored.load_state_dict(checkpoint)
    assert torch.allclose(noise_of_next_step(restored, probe), released, atol=1e-6)  # what a plain restore does
    probe, rejoining = probe_agent()
    rejoining.load_state_dict(checkpoint)
    rejoining.rejoin(skipped_steps=3)
    assert not torch.allclose(noise_of_next_step(rejoining, probe), released, atol=1e-3)
    steps = sum(n for _, _, n in rejoining.engine.accountant.history)
    assert steps == 1 + 3 + 1
    assert rejoining.epsilon() == pytest.approx(opacus_epsilon(rejoining.noise_multiplier, 1 / 4, steps,
                                                               rejoining.delta))
