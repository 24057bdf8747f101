"""decaf_ext.sim.tensorboard_log: the simulator's TensorBoard event files, read back with tensorboard's reader."""

from __future__ import annotations

import pytest

from decaf_ext.sim.tensorboard_log import SCALARS
from decaf_ext.sim.trainer import Trainer
from test_trainer import read_metrics, tiny_config, tiny_paths  # noqa: F401 (a fixture)

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_event_files_hold_every_record(tiny_paths, tmp_path):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", algorithm="decaf", rounds=3, tensorboard=True))
    trainer.run()
    records = read_metrics(trainer.run_dir)
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {*SCALARS, "bytes/per_round"}
    for tag, key in SCALARS.items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [r["round"] for r in records]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in records], rel=1e-6)
    per_round = [e.value for e in events.Scalars("bytes/per_round")]
    assert per_round == pytest.approx([records[0]["bytes_sent"]] * 3) and per_round[0] > 0


def test_round_zero_without_a_training_loss_is_logged(tiny_paths, tmp_path):
    """--eval-at-start: round 0 has no training loss (None); its other scalars are logged, the loss is not."""
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", rounds=1, tensorboard=True, eval_at_start=True))
    trainer.run()
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy/agents_mean")] == [0, 1]
    assert [e.step for e in events.Scalars("loss/train")] == [1]
