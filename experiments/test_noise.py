"""How much of the per-seed noise of DeCAF − DLoRA comes from scoring on 200 held-out documents:
``python experiments/test_noise.py [--partitions iid,dir0.1] [--seeds 0,1]``.

For each (partition, seed) it trains the algorithms suite's decaf and dlora runs again (the same overrides and
seed; evaluation only at the end, which does not change training) and scores every agent on every held-out
document of the split (425 of BBC News at test_fraction 0.2) instead of the suite's 200. It writes each
agent's per-document correctness to ``experiments/results/test_noise/<partition>-s<seed>.json`` with a mask of the
suite's 200 documents (the first max_test of the same seeded permutation, as ``Agents.build_data`` draws them), so
that experiments/report.py can check the rerun against the suite's run, agent by agent, and split the variance of
the paired difference into its part from training and its part from the sample of documents. A finished file is
skipped (resumable). Example output file::

    {"partition": "dir0.1", "seed": 0, "suite_docs": [true, false, ...],         # [425]
     "correct": {"decaf": [[1, 0, ...], ...], "dlora": [[...], ...]}}           # [agents][425], 0 or 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import RESULTS, SCRATCH, parse_seeds  # noqa: E402
from suites import BASE, FINAL_EVAL, PARTITIONS, SUITES  # noqa: E402

ALGORITHMS = ("decaf", "dlora")
FOLDER = os.path.join(RESULTS, "test_noise")


def suite_documents(config, n_train: int, n_test: int) -> np.ndarray:
    """bool [n_test]: which documents of the whole held-out split (ascending) the suite's run scores on."""
    rng = np.random.default_rng(config.seed)
    rng.permutation(n_train)  # the training draw comes first
    chosen = np.zeros(n_test, dtype=bool)
    chosen[rng.permutation(n_test)[:BASE["max_test"]]] = True
    return chosen


def correctness(partition: str, seed: int, algorithm: str, device: str) -> tuple[list[list[int]], np.ndarray]:
    """Train the suite's run of `algorithm` at `partition` and `seed` on `device` (the suite's runs: run.py's
    --device), scored on every held-out document: per agent 0/1 per document [agents][n_test], and the mask of
    the suite's documents [n_test]."""
    from decaf_ext.config import TrainConfig
    from decaf_ext.sim.trainer import Trainer

    run = next(r for r in SUITES["algorithms"].runs((seed,)) if r.name == f"{algorithm}-{partition}")
    scratch = os.path.join(SCRATCH, "test_noise", run.key)
    shutil.rmtree(scratch, ignore_errors=True)
    config = TrainConfig.from_dict({**run.overrides, **FINAL_EVAL, "max_test": 0, "output_dir": scratch,
                                    "device": device})
    trainer = Trainer(config)
    trainer.run()
    agents = trainer.agents
    labels = agents.test_set.labels.numpy()
    correct = [(agents.task.predictions(model, agents.test_set, batch_size=config.eval_batch_size,
                                        device=agents.device) == labels).astype(int).tolist()
               for model in agents.models]
    shutil.rmtree(scratch, ignore_errors=True)
    train, test = agents.task.load_data(config.dataset, test_fraction=config.test_fraction, seed=config.seed)
    assert len(test) == len(labels), "every held-out document is scored"
    return correct, suite_documents(config, len(train), len(test))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", default="iid,dir0.1", help="comma-separated, of " + ", ".join(PARTITIONS))
    parser.add_argument("--seeds", type=parse_seeds, default=(0, 1), help="comma-separated seeds (default 0,1)")
    parser.add_argument("--device", default="cpu", help="the device the suite's runs trained on (default cpu)")
    args = parser.parse_args(argv)
    partitions = [p for p in args.partitions.split(",") if p]
    if unknown := [p for p in partitions if p not in PARTITIONS]:
        parser.error(f"--partitions: unknown {', '.join(unknown)} (choose from {', '.join(PARTITIONS)})")
    os.makedirs(FOLDER, exist_ok=True)
    for seed in args.seeds:
        for partition in partitions:
            path = os.path.join(FOLDER, f"{partition}-s{seed}.json")
            if os.path.isfile(path):
                continue
            result = {"partition": partition, "seed": seed, "correct": {}}
            for algorithm in ALGORITHMS:
                result["correct"][algorithm], chosen = correctness(partition, seed, algorithm, args.device)
            result["suite_docs"] = chosen.tolist()
            with open(path + ".tmp", "w") as out:
                json.dump(result, out)
            os.replace(path + ".tmp", path)
            print(f"{path}: written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
