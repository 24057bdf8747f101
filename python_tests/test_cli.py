"""decaf-train (decaf_ext.train.main) and its plot subcommand, on the tiny model and data of test_trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decaf_ext.train import main
from test_trainer import read_metrics, tiny_paths, without_times  # noqa: F401  (tiny_paths is a fixture)


def tiny_flags(paths: tuple[str, str], output_dir: Path, *extra: str) -> list[str]:
    model, data = paths
    return ["--model", model, "--dataset", data, "--agents", "4", "--rank", "4", "--lora-alpha", "8",
            "--max-len", "16", "--max-train", "none", "--max-test", "none", "--rounds", "2", "--local-steps", "2",
            "--batch-size", "8", "--eval-every", "1", "--device", "cpu", "--no-progress",
            "--output-dir", str(output_dir), *extra]


def test_run_prints_the_result_line(tiny_paths, tmp_path, capsys):
    assert main(tiny_flags(tiny_paths, tmp_path / "run", "--algorithm", "dlora")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
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


def test_plot_draws_every_run_of_a_compare_folder(tiny_paths, tmp_path):
    assert main(tiny_flags(tiny_paths, tmp_path / "cmp", "--compare", "fedavg,dlora")) == 0
    from decaf_ext.plot import plot_runs

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
