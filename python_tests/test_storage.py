"""decaf_ext.storage under faults: the order of fsync and rename, a full disk (ENOSPC) part way through a checkpoint,
a JSON file or an adapter export, a rename that fails, and a second run started into a folder that a running run
(a rogue process) holds."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import decaf_ext.storage.files as files
from decaf_ext.cli.commands import main
from decaf_ext.distributed import run_distributed
from decaf_ext.errors import ConfigError
from decaf_ext.sim.evaluation import export_adapters
from decaf_ext.sim.trainer import Trainer
from decaf_ext.storage.checkpoint import Checkpoint, capture_rng, latest_checkpoint, load_checkpoint, save_checkpoint
from decaf_ext.storage.files import write_json

from conftest import files_of
from test_cli import tiny_flags
from test_trainer import tiny_config, tiny_paths  # noqa: F401  (tiny_paths is a fixture)

CHECKPOINT_FILES = ("tensors.safetensors", "optimizers.pt", "state.json")


def small_checkpoint(rounds: int) -> Checkpoint:
    return Checkpoint(round=rounds, tensors={"w": torch.full((3,), float(rounds))}, optimizers=[{"state": {}}],
                      state={"rounds": rounds}, rng=capture_rng())


def assert_loads(run_dir: Path, rounds: int) -> None:
    """The newest checkpoint of `run_dir` is the complete one of `rounds` rounds, alone in checkpoints/."""
    assert sorted(os.listdir(run_dir / "checkpoints")) == [f"round_{rounds:06d}"]
    saved = load_checkpoint(latest_checkpoint(str(run_dir)))
    assert saved.round == rounds and saved.state == {"rounds": rounds}
    assert torch.equal(saved.tensors["w"], torch.full((3,), float(rounds)))


def full_disk(*args, **kwargs):
    """Stands in for a writer (save_file, torch.save, json.dump): writes a few bytes of its file, then the disk is
    full."""
    target = args[1]
    if isinstance(target, str):
        Path(target).write_bytes(b"\0" * 7)
    else:
        target.write('{"rou')
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def calls(monkeypatch):
    """Every os.fsync (the path its descriptor names) and os.rename / os.replace, in order."""
    seen = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def record_fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record(kind, real):
        def moved(source, target):
            seen.append((kind, os.path.realpath(source), os.path.realpath(target)))
            real(source, target)
        return moved

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record("rename", rename))
    monkeypatch.setattr(os, "replace", record("replace", replace))
    return seen


# ------------------------------------------------------------------------------------------- durability


def test_a_checkpoint_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, calls, monkeypatch):
    """Before: no fsync at all, so a power cut after the rename could leave a renamed but empty checkpoint, the
    previous one already deleted."""
    save_checkpoint(str(tmp_path), small_checkpoint(1))
    root = os.path.realpath(tmp_path / "checkpoints")
    previous, final = os.path.join(root, "round_000001"), os.path.join(root, "round_000002")
    present_at_rename = []
    rename = os.rename

    def rename_seeing(source, target):
        present_at_rename.append(os.path.isdir(previous))
        rename(source, target)

    monkeypatch.setattr(os, "rename", rename_seeing)
    calls.clear()
    save_checkpoint(str(tmp_path), small_checkpoint(2))
    put = [k for k, call in enumerate(calls) if call[0] == "rename" and call[2] == final]
    assert len(put) == 1, calls
    temporary = calls[put[0]][1]
    synced = [call[1] for call in calls[:put[0]] if call[0] == "fsync"]
    assert {os.path.join(temporary, name) for name in CHECKPOINT_FILES} <= set(synced) and temporary in synced
    assert ("fsync", root) in calls[put[0] + 1:]
    assert present_at_rename == [True]  # the previous checkpoint stays until the new one is in place
    assert_loads(tmp_path, 2)


def test_write_json_fsyncs_the_file_before_its_rename_and_the_folder_after(tmp_path, calls):
    write_json(str(tmp_path / "summary.json"), {"a": 1})
    target = os.path.realpath(tmp_path / "summary.json")
    put = [k for k, call in enumerate(calls) if call[0] == "replace" and call[2] == target]
    assert len(put) == 1 and ("fsync", calls[put[0]][1]) in calls[:put[0]]
    assert ("fsync", os.path.realpath(tmp_path)) in calls[put[0] + 1:]


@pytest.mark.parametrize("writer", ["decaf_ext.storage.checkpoint.save_file", "torch.save", "json.dump"])
def test_a_full_disk_mid_checkpoint_leaves_no_temporary_and_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    """Before: the temporary checkpoint folder (.tmp-round_000002, with its half-written file) stayed behind."""
    save_checkpoint(str(tmp_path), small_checkpoint(1))
    monkeypatch.setattr(writer, full_disk)
    with pytest.raises(OSError) as error:
        save_checkpoint(str(tmp_path), small_checkpoint(2))
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert_loads(tmp_path, 1)


@pytest.mark.parametrize("rounds", [2, 1])
def test_a_failed_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch, rounds):
    """The new checkpoint's files are written, then its rename fails (2: a new round; 1: the same round saved again).
    Before: the temporary stayed, and a checkpoint of the same round was deleted before the rename."""
    save_checkpoint(str(tmp_path), small_checkpoint(1))
    rename = os.rename

    def failing(source, target):
        if ".tmp-" in os.path.basename(source):  # the complete new checkpoint, put in place
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        rename(source, target)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path), dataclasses.replace(small_checkpoint(rounds), state={"rounds": 99}))
    monkeypatch.undo()
    assert_loads(tmp_path, 1)


def test_leftovers_of_a_killed_save_are_never_loaded_and_go_with_the_next_save(tmp_path):
    """A process killed while it saved leaves a temporary folder or a moved-away previous one."""
    save_checkpoint(str(tmp_path), small_checkpoint(1))
    (tmp_path / "checkpoints" / "round_000003.old-99").mkdir()
    (tmp_path / "checkpoints" / "round_000004.tmp-99").mkdir()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "round_000001")
    save_checkpoint(str(tmp_path), small_checkpoint(2))
    assert_loads(tmp_path, 2)


@pytest.mark.parametrize("lines", [False, True])
def test_a_full_disk_mid_write_json_leaves_the_previous_file(tmp_path, monkeypatch, lines):
    path = tmp_path / "metrics.jsonl"
    write_json(str(path), [{"round": 1}], lines=lines)
    before = path.read_bytes()

    def full(handle, *args):
        handle.write('{"rou')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    dumps = json.dumps

    def full_at_round_2(value, *args, **kwargs):
        if value == {"round": 2}:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return dumps(value, *args, **kwargs)

    if lines:
        monkeypatch.setattr(files.json, "dumps", full_at_round_2)
    else:
        monkeypatch.setattr(files.json, "dump", lambda value, handle, **kw: full(handle))
    with pytest.raises(OSError):
        write_json(str(path), [{"round": 1}, {"round": 2}], lines=lines)
    assert os.listdir(tmp_path) == ["metrics.jsonl"] and path.read_bytes() == before


# ------------------------------------------------------------------------------------------- exported adapters


@pytest.fixture
def finished(tiny_paths, tmp_path) -> Trainer:
    trainer = Trainer(tiny_config(tiny_paths, tmp_path / "run", agents=2, rounds=1))
    trainer.run()
    return trainer


def full_disk_export(model, folder: str, *card_source) -> None:
    """Stands in for export_adapter: the disk fills up while the adapter's weights are written."""
    os.makedirs(folder, exist_ok=True)
    full_disk(None, os.path.join(folder, "adapter_model.safetensors"))


def failing_rename_into(name: str):
    """os.rename, failing when it moves a temporary folder to `name`."""
    rename = os.rename

    def failing(source, target):
        if ".tmp-" in os.path.basename(source) and os.path.basename(target) == name:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        rename(source, target)
    return failing


@pytest.mark.parametrize("fault", ["full disk", "rename"])
def test_a_failed_export_leaves_the_previous_adapters(finished, tmp_path, monkeypatch, fault):
    """Before: a failed rename of the new adapters folder left the previous one moved away (adapters.old-PID) and
    no adapters/ at all."""
    import decaf_ext.sim.evaluation as evaluation

    before = files_of(tmp_path / "run" / "adapters")
    if fault == "full disk":
        monkeypatch.setattr(evaluation, "export_adapter", full_disk_export)
    else:
        monkeypatch.setattr(os, "rename", failing_rename_into("adapters"))
    with pytest.raises(OSError):
        export_adapters(finished.agents, str(tmp_path / "run" / "adapters"))
    monkeypatch.undo()
    assert files_of(tmp_path / "run" / "adapters") == before
    assert sorted(name for name in os.listdir(tmp_path / "run") if name.startswith("adapters")) == ["adapters"]


@pytest.mark.parametrize("fault", ["full disk", "rename"])
def test_a_failed_agent_export_leaves_its_previous_adapter(tiny_paths, tmp_path, monkeypatch, fault):
    """A distributed agent (alone: RANK 0 of 1) resumed for a second round, whose export fails."""
    import decaf_ext.distributed.runtime as runtime

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    config = tiny_config(tiny_paths, tmp_path / "run", algorithm="local", agents=1, rounds=1)
    run_distributed(config, store=dist.HashStore())
    adapters = tmp_path / "run" / "adapters"
    before = files_of(adapters)
    if fault == "full disk":
        monkeypatch.setattr(runtime, "export_adapter", full_disk_export)
    else:
        monkeypatch.setattr(os, "rename", failing_rename_into("agent_00"))
    with pytest.raises(OSError):
        run_distributed(dataclasses.replace(config, rounds=2), resume=True, store=dist.HashStore())
    monkeypatch.undo()
    assert files_of(adapters) == before and sorted(os.listdir(adapters)) == ["agent_00", "average"]


def test_a_full_disk_while_an_agent_writes_the_labelled_base_leaves_no_temporary(tiny_paths, tmp_path, monkeypatch):
    """The labelled base model folder (in the cache) half-written: no temporary stays behind, in the cache or in
    the run's adapters."""
    from transformers import PretrainedConfig

    def full_base(model_config, folder, *args, **kwargs):
        full_disk(None, os.path.join(folder, "config.json"))

    monkeypatch.setenv("DECAF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(PretrainedConfig, "save_pretrained", full_base)
    with pytest.raises(OSError):
        run_distributed(tiny_config(tiny_paths, tmp_path / "run", algorithm="local", agents=1, rounds=1),
                        store=dist.HashStore())
    assert os.listdir(tmp_path / "run" / "adapters") == []
    assert os.listdir(tmp_path / "cache" / "labelled") == []


# ------------------------------------------------------------------------------------------- one run per folder

ROGUE_RUN = """
import json, sys
from decaf_ext.config import TrainConfig
from decaf_ext.sim.agents import Agents
from decaf_ext.sim.trainer import Trainer

local_round = Agents.local_round

def paused(self, round_index):
    if round_index == 1:
        print("training", flush=True)
        sys.stdin.read()
    local_round(self, round_index)

Agents.local_round = paused
Trainer(TrainConfig.from_dict(json.loads(sys.argv[1]))).run()
"""

ROGUE_LOCK = """
import fcntl, os, sys

fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("training", flush=True)
sys.stdin.read()
"""


@contextmanager
def rogue(script: str, argument: str):
    """A process running `script` with `argument`, paused once it prints 'training'; killed at the end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script, argument], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline() == "training\n"
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_second_run_into_a_folder_in_use_is_refused_and_touches_nothing(tiny_paths, tmp_path, capsys):
    """A real run (its own process, paused in round 2) holds the folder. Before: a --resume ran into the running
    run's files (and finished it), and a second fresh run was told to resume the run."""
    run = tmp_path / "run"
    config = tiny_config(tiny_paths, run, agents=2, rounds=2, checkpoint_every=1)
    with rogue(ROGUE_RUN, json.dumps(config.to_dict())) as process:
        before = files_of(run)
        expected = f"output_dir: {str(run)!r} is in use by another run (pid {process.pid})"
        for resume in (True, False):
            with pytest.raises(ConfigError) as error:
                Trainer(config).run(resume=resume)
            assert str(error.value) == expected
        assert main(tiny_flags(tiny_paths, run, "--agents", "2")) == 2
        assert main(["--resume", str(run), "--no-progress"]) == 2
        assert capsys.readouterr().err.splitlines() == [f"decaf-train: error: {expected}"] * 2
        assert files_of(run) == before
    # killed: the lock went with the process, the run continues from its checkpoint
    assert main(["--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2


def test_a_distributed_agent_refuses_a_folder_in_use(tiny_paths, tmp_path, monkeypatch, capsys):
    """Each agent holds its own agents/agent_XX folder: another agent 0 (under torchrun) and the launcher are
    refused while a rogue process holds its lock. Before: the resumed agent trained into the folder."""
    import decaf_ext.distributed as distributed

    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    config = tiny_config(tiny_paths, run, algorithm="local", agents=1, rounds=1)
    run_distributed(config, store=dist.HashStore())
    with rogue(ROGUE_LOCK, str(run / "agents" / "agent_00")) as process:
        before = files_of(run)
        with pytest.raises(ConfigError, match=r"^output_dir: .* is in use by another run \(pid \d+\)$") as error:
            run_distributed(dataclasses.replace(config, rounds=2), resume=True, store=dist.HashStore())
        assert f"(pid {process.pid})" in str(error.value)
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setattr(distributed, "launch", lambda *args, **kwargs: pytest.fail("launched"))
        flags = tiny_flags(tiny_paths, run, "--agents", "1", "--algorithm", "local", "--rounds", "1")
        assert main([*flags, "--launcher", "dist", "--nproc", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"decaf-train: error: output_dir: {str(run)!r} is in use by another run (pid {process.pid})"
        assert files_of(run) == before
