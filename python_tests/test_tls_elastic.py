"""test_elastic's churn over the mutual-TLS transport: 6 agent processes on loopback (127.0.0.31-36), each started on
its own with its kit folder (no launcher, no store, no central point): 5 agents start, agent 5 joins in round 3,
agent 2 leaves gracefully in round 5, agent 3 is killed in round 6. The assertions are test_elastic's (every
survivor finishes, the leaver costs nobody a timeout, W's rows are doubly stochastic over the live set, the numbers
equal the simulator's). Run as a script, this file is one agent process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_elastic as elastic
from decaf_ext.comm.kit import provision
from decaf_ext.config import TrainConfig
from decaf_ext.distributed import DistributedOptions, run_distributed
from decaf_ext.sim.trainer import Trainer
from test_elastic import tiny  # noqa: F401 (a fixture)
from processes import killed_at_exit
from test_tls_transport import free_addresses

ROOT = Path(__file__).resolve().parents[1]
ROUND_TIMEOUT = 8.0  # the crash costs the others one; TLS agents on 2 shared cores need a little more than gloo's


def agent_main(spec: str) -> None:
    """One agent process of the churn run, the agent its kit names."""
    value = json.loads(spec)
    torch.set_num_threads(1)
    run_distributed(TrainConfig(**value["config"]), options=DistributedOptions(**value["options"]))


@pytest.fixture(scope="module")
def launched(tiny, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """The 6 agent processes, all started at once (the joiner waits for its round by itself), and the simulator."""
    root = tmp_path_factory.mktemp("tls-elastic")
    config = elastic.churn_config(tiny, root / "processes")
    kits = provision(elastic.AGENTS, free_addresses([f"127.0.0.{31 + k}" for k in range(elastic.AGENTS)]),
                     str(root / "kit"), topology=config.topology)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "python_tests"), os.environ.get("PYTHONPATH", "")])}
    environment = {k: v for k, v in environment.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    options = {"round_timeout": ROUND_TIMEOUT, "startup_timeout": 300.0}
    agents = [subprocess.Popen([sys.executable, __file__, json.dumps(
        {"config": dataclasses.replace(config, transport="tls", kit=kit).to_dict(), "options": options})],
        env=environment) for kit in kits]
    with killed_at_exit(agents):
        statuses = [agent.wait(timeout=900) for agent in agents]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        simulator = Trainer(dataclasses.replace(config, output_dir=str(root / "simulated")))
        simulator.run()
    finally:
        torch.set_num_threads(threads)
    return config, statuses, simulator


@pytest.mark.slow  # 6 processes starting on 2 cores and a crash that costs one round timeout: over a minute
def test_every_survivor_finishes_through_a_join_a_leave_and_a_crash_over_tls(launched):
    elastic.test_every_survivor_finishes_through_a_join_a_leave_and_a_crash(launched)


@pytest.mark.slow
def test_mixing_rows_are_doubly_stochastic_over_the_live_set_every_round_over_tls(launched):
    elastic.test_mixing_rows_are_doubly_stochastic_over_the_live_set_every_round(launched)


@pytest.mark.slow
def test_the_simulator_gives_the_numbers_of_the_tls_processes(launched):
    elastic.test_the_simulator_gives_the_numbers_of_the_processes(launched)


if __name__ == "__main__":
    agent_main(sys.argv[1])
