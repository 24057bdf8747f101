"""The TLS transport as deployed: three agent processes, each in its own network namespace with its own kit folder,
joined by veth links to a bridge (in a fourth namespace), started on their own (no launcher, no store):

- every registered strategy, heterogeneous ranks and int8 messages equal the same runs over gloo (launched after
  them, on loopback) to 1e-6, and the message checks (tag, NaN) reject over TLS as over gloo;
- a rogue in a fifth namespace with a certificate of another CA, and with agent 1's valid certificate speaking to
  agent 2 (not its neighbour in a star), is refused while the run goes on and equals the run without it;
- an agent killed mid-run and restarted rejoins; an agent sent SIGTERM says Bye and nobody waits for it;
- tcpdump on agent 1's link sees TLS 1.3 records and none of the factor bytes (a plaintext control transfer on
  the same link is seen).

Addresses 192.0.2.11-14 live only inside the namespaces made here (this machine's own 192.0.2.0/24 is left
alone); every namespace is deleted afterwards, also when a test fails. Without network namespaces the agents
use 127.0.0.11-14 instead (a warning says so; no capture then). Run as a script, this file is one agent process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

from decaf_ext.comm.kit import provision
from decaf_ext.config import TrainConfig
from decaf_ext.distributed import DistributedOptions, launch, run_distributed
from decaf_ext.sim.trainer import Trainer
from decaf_ext.storage.checkpoint import latest_checkpoint, load_checkpoint
from decaf_ext.strategies import strategy_names
from faults import Faults
from processes import killed_at_exit
from test_distributed import EXACT, events_of, summary_of
from test_trainer import read_metrics, tiny_config, tiny_paths, without_times  # noqa: F401 (tiny_paths: a fixture)
from user_strategy import NAME as USER_STRATEGY

ROOT = Path(__file__).resolve().parents[1]
AGENTS = 3
EQUAL = {**{name: dict(algorithm=name) for name in strategy_names()},
         "decaf-ranks": dict(algorithm="decaf", rank="2,4,8"),
         "decaf-int8": dict(algorithm="decaf", message_dtype="int8")}
GUARDED, GUARDED_FAULTS = dict(algorithm="dlora"), "1:badtag@0,2:nan@1"  # with a run key
LEAVING, LEAVING_FAULTS = dict(algorithm="decaf", rounds=4), "2:term@1"  # agent 2 gets SIGTERM in round 1
ATTACKED = dict(algorithm="decaf", topology="star")  # agents 1 and 2 are not neighbours
# agent 2 pauses 4 s before entering round 1: with everyone in round 0, agent 1 is no neighbour of agent 2 in any
# live graph it may yet agree on, so the rogue's pushes meanwhile are refused before any byte of them is read
ATTACKED_FAULTS = "2:stall@1=4"
CONTROL = os.urandom(48)  # sent in plaintext over agent 1's link before the run: the capture must see it


def gloo_main(spec: str) -> None:
    """One agent process of the same runs over gloo (under the launcher: RANK, the store), each with its own prefix."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    base, _, _ = next(dist.rendezvous("env://"))
    for k, config in enumerate(json.loads(spec)):
        run_distributed(TrainConfig(**config), options=DistributedOptions(round_timeout=30.0, startup_timeout=120.0),
                        store=dist.PrefixStore(f"run{k}", base))


def agent_main(spec: str) -> None:
    """One agent process: run the given configs one after the other (each with its own kit)."""
    value = json.loads(spec)
    torch.set_num_threads(1)
    for config, faults in value["runs"]:
        run_distributed(TrainConfig(**config), resume=value.get("resume", False),
                        options=DistributedOptions(**value["options"]), test_hooks=partial(Faults.parse, faults))


# --------------------------------------------------------------------------------------------- network


@dataclasses.dataclass
class Network:
    prefixes: list[list[str]]  # command prefix of agents 0, 1, 2 and the rogue
    addresses: list[str]
    hub: list[str] | None  # command prefix in the bridge's namespace (None: no namespaces)
    link: str | None  # agent 1's link, as seen in the bridge's namespace


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def network():
    tag = f"{os.getpid() % 100000}"
    hub, spaces = f"dtls-hub-{tag}", [f"dtls-{k}-{tag}" for k in ("a0", "a1", "a2", "rogue")]
    addresses = [f"192.0.2.{11 + k}" for k in range(4)]
    usable = os.geteuid() == 0 and shutil.which("ip") is not None
    try:
        if usable:
            _ip("netns", "add", hub)
            _ip("-n", hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub, "link", "set", "br0", "up")
            for k, (space, address) in enumerate(zip(spaces, addresses)):
                inner, outer = f"dtl{k}a{tag}", f"dtl{k}h{tag}"
                _ip("netns", "add", space)
                _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                _ip("link", "set", inner, "netns", space)
                _ip("link", "set", outer, "netns", hub)
                _ip("-n", hub, "link", "set", outer, "master", "br0")
                _ip("-n", hub, "link", "set", outer, "up")
                _ip("-n", space, "addr", "add", f"{address}/24", "dev", inner)
                _ip("-n", space, "link", "set", inner, "up")
                _ip("-n", space, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        usable = False
    try:
        if usable:
            yield Network([["ip", "netns", "exec", s] for s in spaces], addresses, ["ip", "netns", "exec", hub],
                          f"dtl1h{tag}")
        else:
            warnings.warn("ip netns refused: the agents use loopback addresses 127.0.0.11-14 (no capture)")
            yield Network([[]] * 4, [f"127.0.0.{11 + k}" for k in range(4)], None, None)
    finally:
        for space in (hub, *spaces):  # deleting a namespace deletes the veth ends inside it
            subprocess.run(["ip", "netns", "delete", space], capture_output=True, timeout=30)


def environment() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "python_tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def start_agent(network: Network, agent: int, spec: dict, **env: str) -> subprocess.Popen:
    return subprocess.Popen([*network.prefixes[agent], sys.executable, __file__, json.dumps(spec)],
                            env={**environment(), **env})


def kit_of(network: Network, root: Path, name: str, port: int, topology: str = "ring") -> list[str]:
    return provision(AGENTS, [f"{network.addresses[k]}:{port}" for k in range(AGENTS)], str(root / f"kit-{name}"),
                     topology=topology)


def per_agent(config: TrainConfig, kits: list[str]) -> list[dict]:
    return [dataclasses.replace(config, transport="tls", kit=kits[k]).to_dict() for k in range(AGENTS)]


ROGUE = """
import json, os, sys, time, grpc
other_ca, agent_one, target_address, run, out, stop = sys.argv[1:7]
def push(folder, address, target, method):
    read = lambda name: open(os.path.join(folder, name), "rb").read()
    credentials = grpc.ssl_channel_credentials(read("ca.pem"), read("key.pem"), read("cert.pem"))
    header = json.dumps({"run": run, "round": 0, "seq": 0, "numel": 4, "dtype": "float32"}).encode()
    with grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", target)]) as channel:
        try:
            channel.stream_unary("/decaf.Peer/" + method)(iter([header, bytes(16)]), timeout=2.0)
            return ["OK", ""]
        except grpc.RpcError as error:
            return [error.code().name, error.details() or ""]
seen = {"other_ca": [], "non_neighbour": []}
deadline = time.monotonic() + 1500  # until the agents are done (the stop file): the attacked run is their last
while time.monotonic() < deadline and not os.path.exists(stop):
    seen["other_ca"].append(push(other_ca, target_address, "agent-2", "Mix"))
    seen["non_neighbour"].append(push(agent_one, target_address, "agent-2", "Mix"))
    time.sleep(0.5)
open(out, "w").write(json.dumps(seen))
"""

LISTEN = """
import socket, sys
server = socket.create_server((sys.argv[1], 47999)); server.settimeout(60)
connection, _ = server.accept(); connection.settimeout(60)
while connection.recv(65536): pass
"""


def control_transfer(network: Network) -> None:
    """CONTROL in plaintext from the rogue's namespace to agent 1's, over agent 1's link."""
    listener = subprocess.Popen([*network.prefixes[1], sys.executable, "-c", LISTEN, network.addresses[1]])
    sender = ("import socket, sys, time\nfor _ in range(100):\n    try:\n        s = socket.create_connection("
              "(sys.argv[1], 47999), timeout=5); break\n    except OSError: time.sleep(0.1)\n"
              "s.sendall(bytes.fromhex(sys.argv[2])); s.close()")
    subprocess.run([*network.prefixes[3], sys.executable, "-c", sender, network.addresses[1], CONTROL.hex()],
                   check=True, timeout=60)
    listener.wait(timeout=60)


@pytest.fixture(scope="module")
def launched(network, tiny_paths, tmp_path_factory):
    """One launch: every EQUAL run, the guarded run, the run agent 2 leaves on SIGTERM, then the star run under
    attack; tcpdump on agent 1's link."""
    root = tmp_path_factory.mktemp("tls")
    assert USER_STRATEGY in EQUAL
    (root / "key").write_text("a shared secret of this run\n")
    configs = {name: tiny_config(tiny_paths, root / name, agents=AGENTS, lora_dropout=0.1, **changes)
               for name, changes in {**EQUAL, "guarded": dict(GUARDED, run_key_file=str(root / "key")),
                                     "leaving": LEAVING, "attacked": ATTACKED}.items()}
    ports = {name: 47100 + 10 * k for k, name in enumerate(configs)}
    kits = {name: kit_of(network, root, name, ports[name], configs[name].topology) for name in configs}
    faults = {"guarded": GUARDED_FAULTS, "leaving": LEAVING_FAULTS, "attacked": ATTACKED_FAULTS}
    specs = [{"runs": [(per_agent(c, kits[n])[a], faults.get(n, "")) for n, c in configs.items()],
              "options": {"round_timeout": 30.0, "startup_timeout": 120.0}} for a in range(AGENTS)]
    capture = None
    if network.hub is not None and shutil.which("tcpdump"):
        capture = subprocess.Popen([*network.hub, "tcpdump", "-i", network.link, "-U", "-s", "0", "-c", "100000",
                                    "-w", str(root / "link.pcap"), "tcp"], stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        control_transfer(network)
    rogue_kit = kit_of(network, root, "rogue", 47099, "star")  # the same names, another CA
    run_id = json.loads(Path(kits["attacked"][2], "peers.json").read_text())["run"]
    rogue = subprocess.Popen([*network.prefixes[3], sys.executable, "-c", ROGUE, rogue_kit[1], kits["attacked"][1],
                              f"{network.addresses[2]}:{ports['attacked']}", run_id, str(root / "rogue.json"),
                              str(root / "stop")], env=environment())
    agents = [start_agent(network, a, specs[a]) for a in range(AGENTS)]
    try:
        statuses = [agent.wait(timeout=1200) for agent in agents]
    finally:
        (root / "stop").touch()
        try:
            rogue.wait(timeout=30)  # it writes what it saw, then ends
        finally:
            for process in (*agents, rogue, capture):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGINT if process is capture else signal.SIGTERM)
                    process.wait(timeout=60)
    gloo = {name: dataclasses.replace(configs[name], output_dir=str(root / f"gloo-{name}"))
            for name in (*EQUAL, "attacked")}
    assert launch([sys.executable, __file__, "gloo", json.dumps([c.to_dict() for c in gloo.values()])], AGENTS,
                  env={"PYTHONPATH": environment()["PYTHONPATH"]}) == [0] * AGENTS
    pcap = root / "link.pcap" if capture else None
    return configs, statuses, json.loads((root / "rogue.json").read_text()), pcap, gloo


def test_the_gloo_runs_equal_the_simulator_on_the_exact_fields(launched, tmp_path):
    """The reference below is the gloo run; it is the simulator's run (as test_distributed checks on 4 agents)."""
    gloo = launched[4]["decaf"]
    simulator = Trainer(dataclasses.replace(gloo, output_dir=str(tmp_path / "simulated")))
    simulator.run()
    assert [{k: r[k] for k in EXACT} for r in read_metrics(gloo.output_dir)] \
        == [{k: r[k] for k in EXACT} for r in simulator.history]


def close(value):
    """`value` for an approximate comparison; None (e.g. local's mixing error), alone or in a list, exactly."""
    if isinstance(value, list):
        return [close(v) for v in value]
    return value if value is None else pytest.approx(value, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("run", [*EQUAL, "attacked"])
def test_a_tls_run_across_namespaces_equals_the_gloo_run(launched, run):
    configs, statuses, _, _, gloo = launched
    assert statuses == [0] * AGENTS
    tls, reference = read_metrics(configs[run].output_dir), read_metrics(gloo[run].output_dir)
    assert [r["members"] for r in tls] == [list(range(AGENTS))] * configs[run].rounds
    for got, expected in zip(without_times(tls), without_times(reference), strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == (value if key == "members" else close(value)), key
    for agent in range(AGENTS):
        mine, theirs = (load_checkpoint(latest_checkpoint(os.path.join(c.output_dir, "agents", f"agent_{agent:02d}")))
                        for c in (configs[run], gloo[run]))
        assert mine.tensors.keys() == theirs.tensors.keys()
        for name, tensor in theirs.tensors.items():
            torch.testing.assert_close(mine.tensors[name], tensor, rtol=1e-6, atol=1e-9)


def test_the_message_checks_reject_over_tls_as_over_gloo(launched):
    configs, statuses, _, _, _ = launched
    run_dir = configs["guarded"].output_dir
    # ring of 3: everyone is everyone's neighbour; agent 1's tags are wrong in round 0, agent 2 sends NaN in round 1
    for agent in (0, 2):
        assert (0, 1) in events_of(run_dir, agent, "rejected")
    for agent in (0, 1):
        assert (1, 2) in events_of(run_dir, agent, "rejected")
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]


def test_an_agent_sent_sigterm_says_bye_and_nobody_waits_for_it(launched):
    """Agent 2 sends itself SIGTERM after its local steps of round 1: it finishes the round, says Bye, writes its
    checkpoint and goes on to the next run of its process; agents 0 and 1 go on without it and without a timeout."""
    configs = launched[0]
    run_dir = configs["leaving"].output_dir
    records = read_metrics(run_dir)
    assert [r["members"] for r in records] == [r["live"] for r in records] == [[0, 1, 2]] * 2 + [[0, 1]] * 2
    for j in (0, 1):
        assert events_of(run_dir, j, "peer_left") == [(2, 2)] and events_of(run_dir, j, "peer_lost") == []
    assert [r["round"] for r in read_metrics(os.path.join(run_dir, "agents", "agent_02"))] == [1, 2]
    assert load_checkpoint(latest_checkpoint(os.path.join(run_dir, "agents", "agent_02"))).round == 2


def test_a_rogue_and_a_non_neighbour_are_refused_and_the_run_goes_on(launched):
    configs, statuses, rogue, _, _ = launched
    assert statuses == [0] * AGENTS
    assert rogue["other_ca"] and all(code != "OK" for code, _ in rogue["other_ca"])
    # it reached the running agent; a push let in while agent 2's round was open is refused once it is agreed
    assert "PERMISSION_DENIED" in {code for code, _ in rogue["non_neighbour"]}
    assert all(code != "OK" for code, _ in rogue["non_neighbour"])
    run_dir = configs["attacked"].output_dir
    refused = events_of(run_dir, 2, "refused")
    assert refused and {agent for _, agent in refused} == {1}  # only agent 1's certificate got past the handshake
    assert events_of(run_dir, 0, "refused") == events_of(run_dir, 1, "refused") == []


@pytest.fixture(scope="module")
def restarted(network, tiny_paths, tmp_path_factory):
    """Three sites, each with its own run folder; agent 2 kills itself after its local steps of round 2 and is
    started again, once dead, with the command docs/deploy.md gives: decaf-train --resume FOLDER --launcher dist."""
    root = tmp_path_factory.mktemp("tls-restart")
    config = tiny_config(tiny_paths, root / "run", agents=AGENTS, algorithm="dlora", rounds=20, eval_every=1)
    kits = kit_of(network, root, "restart", 47300)
    sites = [dict(c, output_dir=str(root / f"site{k}")) for k, c in enumerate(per_agent(config, kits))]
    # agent 0 takes 3 s per round after the crash (within the round timeout): the others no longer wait a round
    # timeout for the dead agent in every round, and the run must still be going when it comes back
    faults = ",".join(["2:exit@2", *(f"0:stall@{r}=3" for r in range(3, config.rounds))])
    specs = [{"runs": [(c, faults)], "options": {"round_timeout": 6.0, "startup_timeout": 120.0}} for c in sites]
    agents = [start_agent(network, a, specs[a]) for a in range(AGENTS)]
    with killed_at_exit(agents):
        first = agents[2].wait(timeout=600)
        # restart only once agent 0 has finished a round without agent 2, so that the run shows the gap
        # however fast or slow this machine restarts a process
        records = Path(sites[0]["output_dir"], "metrics.jsonl")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (records.is_file() and any(
                json.loads(line)["members"] == [0, 1] for line in records.read_text().splitlines() if line)):
            time.sleep(0.5)
        agents[2] = subprocess.Popen([*network.prefixes[2], sys.executable, "-m", "decaf_ext.cli", "--resume",
                                      sites[2]["output_dir"], "--launcher", "dist", "--round-timeout", "6"],
                                     env=environment())
        statuses = [agent.wait(timeout=600) for agent in agents]
    return [site["output_dir"] for site in sites], config.rounds, first, statuses


@pytest.mark.slow  # 20 rounds, most of them waiting a round timeout for the dead agent: minutes
def test_a_killed_agent_restarted_rejoins_the_run(restarted):
    sites, rounds, first, statuses = restarted
    assert first == -signal.SIGKILL and statuses == [0] * AGENTS
    members = [r["members"] for r in read_metrics(sites[0])]  # agent 0 reports
    assert members[:2] == [[0, 1, 2]] * 2 and [0, 1] in members  # rounds 1, 2 with agent 2, then without it
    assert members[-1] == [0, 1, 2]  # back again
    own = [r["round"] for r in read_metrics(os.path.join(sites[2], "agents", "agent_02"))]
    assert own[:2] == [1, 2] and own[-1] == rounds and len(own) < rounds  # it skipped the rounds it missed
    joined = [e for e in summary_of(sites[2], 2)["distributed"]["events"] if e["event"] == "joining"]
    assert len(joined) == 1 and joined[0]["round"] >= 2
    assert (2, 2) in events_of(sites[0], 0, "peer_lost")


def test_a_capture_on_a_link_holds_tls_1_3_and_no_factor_bytes(launched):
    configs, _, _, pcap, _ = launched
    if pcap is None:
        pytest.skip("no network namespace or no tcpdump: nothing was captured")
    captured = pcap.read_bytes()
    assert CONTROL in captured  # the capture sees payload bytes on this link
    assert bytes.fromhex("002b00020304") in captured  # a ServerHello selecting TLS 1.3 (supported_versions)
    saved = load_checkpoint(latest_checkpoint(os.path.join(configs["decaf"].output_dir, "agents", "agent_01")))
    needles = [saved.tensors[f"factors/0/{f}"].double().flatten()[k:k + 4].numpy().tobytes()
               for f in "AB" for k in range(0, 64, 8)]  # the evaluation sends these float64 values
    needles += [saved.tensors["factors/0/A"].flatten()[k:k + 8].numpy().tobytes() for k in range(0, 64, 8)]
    assert not [n for n in needles if n in captured]


if __name__ == "__main__":
    gloo_main(sys.argv[2]) if sys.argv[1] == "gloo" else agent_main(sys.argv[1])
