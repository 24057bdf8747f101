"""decaf-train (decaf_ext.cli.main) and its plot subcommand, on the tiny model and data of test_trainer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decaf_ext.cli.commands import build_parser, main
from decaf_ext.config import TrainConfig, build_config
from decaf_ext.errors import ConfigError
from decaf_ext.sim.agents import Agents
from decaf_ext.sim.trainer import Trainer
from test_trainer import read_metrics, tiny_paths, without_times  # noqa: F401  (tiny_paths is a fixture)


def tiny_flags(paths: tuple[str, str], output_dir: Path, *extra: str) -> list[str]:
    model, data = paths
    return ["--model", model, "--dataset", data, "--agents", "4", "--rank", "4", "--lora-alpha", "8",
            "--max-len", "16", "--max-train", "none", "--max-test", "none", "--rounds", "2", "--local-steps", "2",
            "--batch-size", "8", "--eval-every", "1", "--device", "cpu", "--no-progress",
            "--output-dir", str(output_dir), *extra]


def test_run_prints_the_result_line(tiny_paths, tmp_path, capsys):
    assert main(tiny_flags(tiny_paths, tmp_path / "run", "--algorithm", "dlora")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = out[-1]
    assert out[1].split() == ["agent", "animals", "colors", "food", "total"]  # histogram kept with --no-progress
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    final = summary["final"]
    assert last.startswith("dlora ring x4 | round 2: ")
    assert f"test acc {final['acc_mean']:.4f} ± {final['acc_std']:.4f}" in last
    assert f"averaged model {final['avg_model_acc']:.4f}" in last and "consensus error" in last
    assert f"sent {final['bytes_sent'] / 1e6:.2f} MB" in last
    assert (tmp_path / "run" / "adapters" / "agent_03" / "adapter_config.json").is_file()


def test_yaml_config_is_overridden_by_flags(tiny_paths, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("algorithm: fedavg\nrank: 2\ntopology: complete\nlr: 0.005\ntarget_modules: [query]\n")
    assert main(tiny_flags(tiny_paths, tmp_path / "run", "--config", str(config), "--rank", "3")) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["algorithm"], saved["rank"], saved["topology"], saved["lr"]) == ("fedavg", 3, "complete", 0.005)
    assert saved["target_modules"] == ["query"] and saved["agents"] == 4


def test_compare_runs_every_algorithm_on_the_same_data(tiny_paths, tmp_path, capsys):
    assert main(tiny_flags(tiny_paths, tmp_path / "cmp", "--compare", "local,decaf")) == 0
    out = capsys.readouterr().out
    table = out[out.index("algorithm"):].splitlines()
    assert table[1].startswith("local ") and table[2].startswith("decaf ")
    compare = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(compare["runs"]) == ["local", "decaf"]
    assert compare["runs"]["local"]["final"]["bytes_sent"] == 0 < compare["runs"]["decaf"]["final"]["bytes_sent"]
    assert compare["runs"]["local"]["examples"] == compare["runs"]["decaf"]["examples"]
    # each compared run is exactly the run of that algorithm alone with the same flags
    assert main(tiny_flags(tiny_paths, tmp_path / "alone", "--algorithm", "decaf")) == 0
    assert without_times(read_metrics(str(tmp_path / "alone"))) == without_times(read_metrics(str(tmp_path / "cmp" / "decaf")))


def test_resume_continues_a_run(tiny_paths, tmp_path, capsys):
    assert main(tiny_flags(tiny_paths, tmp_path / "run")) == 0
    assert main(["--resume", str(tmp_path / "run"), "--rounds", "3", "--no-progress"]) == 0
    assert [r["round"] for r in read_metrics(str(tmp_path / "run"))] == [1, 2, 3]
    assert main(["--resume", str(tmp_path / "run"), "--rank", "2"]) == 2
    assert "may change when resuming" in capsys.readouterr().err


def test_resume_of_a_damaged_config_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"agents": 4,')
    assert main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("decaf-train: error: resume: cannot read ") and "config.json" in err and "\n" not in err


def test_plot_draws_every_run_of_a_compare_folder(tiny_paths, tmp_path):
    assert main(tiny_flags(tiny_paths, tmp_path / "cmp", "--compare", "fedavg,dlora")) == 0
    from decaf_ext.cli.plot import plot_runs

    figure = plot_runs([str(tmp_path / "cmp")], str(tmp_path / "acc.png"))
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    for algorithm in ("fedavg", "dlora"):
        history = read_metrics(str(tmp_path / "cmp" / algorithm))
        agents = lines[f"{algorithm} ring (agents)"]
        assert list(agents.get_xdata()) == [1, 2]
        assert list(agents.get_ydata()) == [r["acc_mean"] for r in history]
        assert list(lines[f"{algorithm} ring (averaged model)"].get_ydata()) == [r["avg_model_acc"] for r in history]
    assert main(["plot", str(tmp_path / "cmp" / "dlora"), "-o", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # accuracy against bytes: the same run with int8 messages is labelled apart and sends about a quarter
    assert main(tiny_flags(tiny_paths, tmp_path / "int8", "--compare", "dlora", "--message-dtype", "int8")) == 0
    figure = plot_runs([str(tmp_path / "cmp" / "dlora"), str(tmp_path / "int8")], str(tmp_path / "bytes.png"),
                       x="bytes_sent")
    lines = {line.get_label(): list(line.get_xdata()) for line in figure.axes[0].get_lines()}
    float32, int8 = lines["dlora ring (agents)"], lines["dlora ring int8 (agents)"]
    assert 0.25 < int8[-1] / float32[-1] < 0.35


@pytest.mark.parametrize("argv, expected", [
    (["--algorithm", "gossip"], "algorithm"),
    (["--topology", "hypercube"], "topology"),
    (["--agents", "1"], "agents"),
    (["--agents", "0"], "agents"),
    (["--agents", "-3"], "agents"),
    (["--lr", "inf"], "lr"),
    (["--lora-alpha", "inf"], "lora_alpha"),
    (["--weight-decay", "nan"], "weight_decay"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--device", "cuda:x"], "device"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**32)], "seed"),
    (["--rank", "0"], "rank"),
    (["--rank", "64"], "rank"),
    (["--rank", "four"], "rank"),
    (["--alpha", "0"], "alpha"),
    (["--agents", "100"], "agents"),
    (["--model", "/no/such/model"], "model"),
    (["--target-modules", "nothing_here"], "target_modules"),
    (["--compare", "decaf,gossip"], "gossip"),
    (["--message-dtype", "int4"], "message_dtype"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_user_mistakes_give_one_line_and_status_2(tiny_paths, tmp_path, capsys, argv, expected):
    assert main(tiny_flags(tiny_paths, tmp_path / "run", *argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decaf-train: error: ") and expected in lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("where", ["file", "file/run"])
def test_an_output_dir_that_cannot_be_made_is_one_line(tiny_paths, tmp_path, capsys, where):
    (tmp_path / "file").write_text("not a folder")
    assert main(tiny_flags(tiny_paths, tmp_path / where)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decaf-train: error: output_dir: cannot create ")
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("text, expected", [
    ("algorithm: [decaf\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("ranks: 4\n", "unknown option(s) ranks"),
    ("lr: fast\n", "lr expects float"),
])
def test_malformed_config_files(tiny_paths, tmp_path, capsys, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(tiny_flags(tiny_paths, tmp_path / "run", "--config", str(config))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("decaf-train: error: ") and expected in err and "\n" not in err


def test_missing_config_file_and_plot_errors(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].startswith("decaf-train: error: config: cannot read")
    assert errors[1].startswith("decaf-train plot: error: run_dirs:") and len(errors) == 2


def test_plot_of_a_damaged_or_incomplete_metrics_file_is_one_line(tmp_path, capsys):
    record = {"round": 1, "bytes_sent": 10, "acc_mean": 0.5, "acc_std": 0.1, "avg_model_acc": 0.5}
    for name, text, expected in [("damaged", json.dumps(record) + "\n{bad\n", "line 2 is not JSON"),
                                 ("listed", "[1, 2]\n", "line 1 is not a metrics record"),
                                 ("no_metric", json.dumps({k: v for k, v in record.items() if k != "acc_mean"}) + "\n",
                                  "line 1 has no 'acc_mean'")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
        assert main(["plot", str(tmp_path / name), "-o", str(tmp_path / "out" / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("decaf-train plot: error: run_dirs: ") and "\n" not in err
        assert str(tmp_path / name / "metrics.jsonl") in err and expected in err
    assert main(["plot", str(tmp_path / "no_metric"), "-o", str(tmp_path / "out" / "x.png"), "--metric", "train_loss"]) == 2
    assert "line 1 has no 'train_loss'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------- a fast command line


def python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with this checkout first on the path."""
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_registers_a_users_strategy_from_the_current_folder(tmp_path, monkeypatch, capsys):
    """--import MODULE runs before the options are checked, so --algorithm may name what MODULE registers; a
    missing module is one line, a module whose own import fails keeps its traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    (tmp_path / "cwd_strategy.py").write_text(
        "from decaf_ext.strategies import register_strategy\n"
        "from user_strategy import DampedDLoRA\n"
        "register_strategy('cwd_damped')(type('CwdDamped', (DampedDLoRA,), {}))\n")
    (tmp_path / "broken_strategy.py").write_text("import a_dependency_that_is_missing\n")
    assert main(["--import", "cwd_strategy", "--list"]) == 0
    assert "cwd_damped" in capsys.readouterr().out.splitlines()[0]
    assert build_config(None, {"algorithm": "cwd_damped"}).algorithm == "cwd_damped"  # now a known algorithm
    assert main(["--import", "no_such_strategy", "--list"]) == 2
    assert capsys.readouterr().err.strip() == \
        "decaf-train: error: import: no module named 'no_such_strategy' (in the current folder or on sys.path)"
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):
        main(["--import", "broken_strategy", "--list"])


def test_help_version_and_flag_mistakes_import_no_torch():
    done = python("import sys\nfrom decaf_ext.cli.commands import main\n"
                  "for argv in (['--help'], ['--version'], ['plot', '--help'], ['--rank', 'four'], ['--no-such']):\n"
                  "    try:\n        print('status', main(argv))\n    except SystemExit as exit:\n"
                  "        print('status', exit.code)\n"
                  "print('heavy', sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'matplotlib') "
                  "if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert "status 0\n" in done.stdout and "decaf-train 0.1.0" in done.stdout
    assert done.stdout.count("status 2") == 2 and "heavy []" in done.stdout
    assert "--nproc N" in done.stdout and "--round-timeout S" in done.stdout  # distributed flags in the main help


def test_package_import_is_light_and_exports_the_trainer():
    done = python("import sys, decaf_ext\nprint('torch' in sys.modules)\n"
                  "from decaf_ext import Trainer, TrainConfig, consensus_tsvd\nprint(Trainer.__module__, "
                  "TrainConfig.__module__, consensus_tsvd.__name__)")
    assert done.stdout.split() == ["False", "decaf_ext.sim.trainer", "decaf_ext.config", "consensus_tsvd"], done.stderr


def test_help_states_each_default_once():
    for action in build_parser()._actions:
        assert (action.help or "").count("default") <= 1, action.help


def test_dirichlet_alpha_and_its_old_spelling(tmp_path):
    assert build_parser().parse_args(["--alpha", "0.3"]).dirichlet_alpha == "0.3"
    config = tmp_path / "old.yaml"
    config.write_text("alpha: 0.25\n")
    assert build_config(str(config)).dirichlet_alpha == 0.25


def test_example_caps_apply_to_the_offline_default_only():
    assert TrainConfig().caps() == (600, 200)
    assert TrainConfig(dataset="mine.csv").caps() == (None, None)
    assert TrainConfig(dataset="mine.csv", max_train=50).caps() == (50, None)
    assert TrainConfig(max_train=0, max_test=0).caps() == (None, None)  # 0: every example


def test_python_api_is_quiet(tiny_paths, tmp_path, capfd):
    import warnings

    from test_trainer import tiny_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(tiny_config(tiny_paths, tmp_path / "run"))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert "LOAD REPORT" not in capfd.readouterr().err


# ------------------------------------------------------------------------------- user errors vs. bugs


def test_guarded_reports_user_errors_and_keeps_bug_tracebacks(monkeypatch, capsys):
    import decaf_ext.cli.commands as cli

    def mistake(config, announce):
        raise ConfigError("rank: a user mistake\nsecond line")

    monkeypatch.setattr(cli, "_run_one", mistake)
    assert main(["--no-progress"]) == 2
    assert capsys.readouterr().err == "decaf-train: error: rank: a user mistake\n"

    def bug(config, announce):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(cli, "_run_one", bug)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        main(["--no-progress"])


def test_topology_file_with_the_wrong_node_count(tiny_paths, tmp_path, capsys):
    graph = tmp_path / "triangle.txt"
    graph.write_text("0 1\n1 2\n2 0\n")
    assert main(tiny_flags(tiny_paths, tmp_path / "run", "--topology", "file", "--topology-file", str(graph))) == 2
    err = capsys.readouterr().err
    assert "has 3 nodes" in err and "there are 4 agents" in err and len(err.splitlines()) == 1


def test_own_columns_and_the_whole_dataset(tiny_paths, tmp_path):
    """A CSV with its own column names; no cap unless asked (the tiny set has 72 texts, 14 of them held out)."""
    model, data = tiny_paths
    rows = [(path.read_text(), path.parent.name) for path in sorted(Path(data).glob("*/*.txt"))]
    table = tmp_path / "mine.csv"
    table.write_text("topic,body\n" + "".join(f"{label},{text}\n" for text, label in rows))
    flags = [flag for flag in tiny_flags(tiny_paths, tmp_path / "run", "--rounds", "1") if flag != "none"]
    flags = [f for f in flags if f not in ("--max-train", "--max-test")]
    flags[flags.index(data)] = str(table)
    assert main([*flags, "--text-column", "body", "--label-column", "topic"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["label_names"] == ["animals", "colors", "food"]
    assert summary["examples"]["train"] + summary["examples"]["test"] == len({text for text, _ in rows})


def test_distributed_launch_is_quiet_and_speaks_as_decaf_train(tiny_paths, tmp_path, monkeypatch, capsys):
    import decaf_ext.distributed as distributed

    started = {}

    def launch(command, nproc, max_restarts=0):
        started.update(command=command, level=os.environ.get("TORCH_CPP_LOG_LEVEL"))
        return [0, 1, 0, 0]

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "TORCH_CPP_LOG_LEVEL"})
    monkeypatch.setattr(distributed, "launch", launch)
    assert main(tiny_flags(tiny_paths, tmp_path / "d", "--launcher", "dist", "--nproc", "4")) == 1
    assert started["level"] == "ERROR"  # no flood of c10d socket warnings while agents time out
    # -P: python -m would put the current folder first on each agent's sys.path
    assert started["command"][1:4] == ["-P", "-m", "decaf_ext.cli"]
    assert started["command"][-2:] == ["--launcher", "dist"]
    assert capsys.readouterr().err.startswith("decaf-train: agents [1] failed (exit status 1)")


def test_a_command_without_import_leaves_the_current_folder_off_sys_path(tmp_path, monkeypatch):
    """Before: the current folder was appended to sys.path even without --import, so a module missing from the venv
    (an optional package) was then imported from wherever the command was started."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    (tmp_path / "rogue_optional.py").write_text("raise SystemExit('imported from the current folder')\n")
    assert main(["--list"]) == 0
    assert os.getcwd() not in sys.path and importlib.util.find_spec("rogue_optional") is None


def test_launched_agents_import_nothing_from_the_current_folder(tiny_paths, tmp_path):
    """A real one-agent run launched (python -P -m decaf_ext.distributed --nproc 1 --tensorboard) from a folder
    holding a rogue tensorboard/ package. Before: each agent ran `python -m`, which put that folder first on its
    sys.path, and imported the rogue. --import still finds the user's module there, in the launcher and the agent."""
    cwd = tmp_path / "cwd"
    (cwd / "tensorboard").mkdir(parents=True)
    marker = f"open(os.path.join({str(tmp_path)!r}, '{{}}-' + os.environ.get('RANK', 'launcher')), 'w').close()"
    (cwd / "tensorboard" / "__init__.py").write_text(f"import os\n{marker.format('rogue')}\nraise ImportError\n")
    (cwd / "user_plugin.py").write_text(f"import os\n{marker.format('plugin')}\n")
    flags = tiny_flags(tiny_paths, tmp_path / "run", "--agents", "1", "--algorithm", "local", "--rounds", "1")
    # an empty PYTHONPATH entry would itself mean "the current folder": join only the non-empty ones
    paths = [str(Path(__file__).parents[1]), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-P", "-m", "decaf_ext.distributed", "--nproc", "1", "--tensorboard",
                           "--import", "user_plugin", *flags], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert sorted(path.name for path in tmp_path.glob("*-*")) == ["plugin-0", "plugin-launcher"], done.stderr
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------ killed runs


def test_a_killed_run_is_resumed_from_any_folder(tiny_paths, tmp_path, monkeypatch, capsys):
    """Relative paths, killed in round 2: re-running explains, --resume from elsewhere finishes it exactly."""
    model, data = tiny_paths
    monkeypatch.chdir(Path(data).parent)
    relative = tiny_flags(("model", "data"), Path("run"), "--rounds", "3")
    local_round = Agents.local_round

    def killed_in_round_2(self, round_index):
        if round_index == 1:
            raise KeyboardInterrupt
        local_round(self, round_index)

    monkeypatch.setattr(Agents, "local_round", killed_in_round_2)
    assert main(relative) == 130
    monkeypatch.setattr(Agents, "local_round", local_round)
    capsys.readouterr()
    assert main(relative) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run (1 rounds checkpointed)" in err and "decaf-train --resume run" in err
    saved = json.loads(Path("run", "config.json").read_text())
    assert (saved["model"], saved["dataset"]) == (str(Path(model).resolve()), str(Path(data).resolve()))
    run_dir = Path("run").resolve()
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(run_dir), "--no-progress"]) == 0
    assert main(tiny_flags(tiny_paths, tmp_path / "whole", "--rounds", "3")) == 0
    assert without_times(read_metrics(str(run_dir))) == without_times(read_metrics(str(tmp_path / "whole")))


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tiny_paths, tmp_path, monkeypatch):
    def killed(self, round_index):
        raise KeyboardInterrupt

    monkeypatch.setattr(Agents, "local_round", killed)
    assert main(tiny_flags(tiny_paths, tmp_path / "run", "--rounds", "1")) == 130
    monkeypatch.undo()
    assert main(["--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(tiny_flags(tiny_paths, tmp_path / "whole", "--rounds", "1")) == 0
    assert without_times(read_metrics(str(tmp_path / "run"))) == without_times(read_metrics(str(tmp_path / "whole")))


# ------------------------------------------------------------------------------------------- seeds


def test_seeds_give_mean_and_std_across_seeds(tiny_paths, tmp_path, capsys):
    flags = ("--rounds", "1", "--local-steps", "1")
    assert main(tiny_flags(tiny_paths, tmp_path / "cmp", *flags, "--compare", "local,dlora", "--seeds", "0,1")) == 0
    out = capsys.readouterr().out
    compare = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert compare["seeds"] == [0, 1] and list(compare["runs"]) == ["local", "dlora"]
    for name in ("local", "dlora"):
        accuracies = [compare["runs"][name][seed]["final"]["acc_mean"] for seed in ("0", "1")]
        stats = compare["across_seeds"][name]["acc_mean"]
        assert stats["mean"] == pytest.approx(np.mean(accuracies))
        assert stats["std"] == pytest.approx(np.std(accuracies, ddof=1))
        assert f"{stats['mean']:.4f} ± {stats['std']:.4f}" in out
    assert compare["runs"]["dlora"]["0"]["examples"] != compare["runs"]["dlora"]["1"]["examples"] or \
        compare["runs"]["dlora"]["0"]["final"] != compare["runs"]["dlora"]["1"]["final"]
    # a single configuration over seeds: the same runs as inside the comparison
    assert main(tiny_flags(tiny_paths, tmp_path / "seeds", *flags, "--algorithm", "dlora", "--seeds", "1")) == 0
    seeds = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert seeds["across_seeds"]["acc_mean"] == {"mean": seeds["runs"]["1"]["final"]["acc_mean"], "std": 0.0}
    assert without_times(read_metrics(str(tmp_path / "seeds" / "seed1"))) == \
        without_times(read_metrics(str(tmp_path / "cmp" / "dlora" / "seed1")))
    assert main(["--seeds", "0,x"]) == 2 and main(["--seeds", "1", "--seed", "2"]) == 2


# -------------------------------------------------------------------------------------------- plots


def test_plot_creates_its_folder_and_tells_equal_runs_apart(tiny_paths, tmp_path):
    for name in ("first", "second"):
        assert main(tiny_flags(tiny_paths, tmp_path / "runs" / name, "--rounds", "1")) == 0
    output = tmp_path / "missing" / "deeper" / "acc.png"
    assert main(["plot", str(tmp_path / "runs"), "-o", str(output)]) == 0
    assert output.read_bytes()[:4] == b"\x89PNG"
    from decaf_ext.cli.plot import plot_runs

    lines = plot_runs([str(tmp_path / "runs")], str(output)).axes[0].get_lines()
    labels = [line.get_label() for line in lines]
    assert len(set(labels)) == 4 and "decaf ring [runs/first] (agents)" in labels
    averaged = [line for line in lines if "averaged" in line.get_label()]
    assert all(len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "") for line in averaged)
