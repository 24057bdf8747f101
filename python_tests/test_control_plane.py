"""Attacks on the control plane (the rendezvous store every agent trusts) and what stops them.

Each test plays the attacker through the real pieces: a rogue process in a network namespace connecting to the
launcher's store, or a rogue store client (a second TCPStore client of the same server) writing crafted values
that the agents then read; the agents are in-process :class:`Transport` objects (one thread and one store
connection each), as in test_distributed's membership test.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from decaf_ext.comm.transport import Transport

ROOT = Path(__file__).resolve().parents[1]
KEY = b"a run key of 32 bytes, not less!"
FORGED_VIEW = json.dumps({"round": 0, "members": {"0": 1}, "group": 0})
FORGED_RECORD = json.dumps({"incarnation": 1, "fingerprint": "same", "round": 0, "broken": False})


# ------------------------------------------------------------------------------------- helpers


@pytest.fixture
def server():
    """The launcher's kind of store: a TCPStore server on the loopback interface, in this process."""
    from decaf_ext.distributed.launcher import loopback_store

    store = loopback_store()
    yield store
    del store


def client(server, prefix: str = "") -> dist.Store:
    """A store client of its own (one connection), as an agent process or a rogue process has; with `prefix`,
    the store of one run among several on the same server."""
    store = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30))
    return dist.PrefixStore(prefix, store) if prefix else store


def make(server, n: int, agents, key: bytes | None = None, timeout: float = 1.5, startup: float = 1.0,
         prefix: str = ""):
    """Transports of `agents` (of `n`), each on its own client connection; `key`: the run key (None: none)."""
    extra = {} if key is None else {"run_key": key}
    return [Transport(client(server, prefix), j, n, fingerprint="same", backend="gloo", timeout=timeout,
                      startup_timeout=startup, **extra) for j in agents]


def together(function, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(function, items))


def timed_rounds(transports, rounds):
    """[(seconds, views)] of rounds `rounds` agreed by `transports` together."""
    result = []
    for r in rounds:
        start = time.monotonic()
        views = together(lambda t: t.agree(r), transports)
        result.append((time.monotonic() - start, views))
    return result


def event_keys(transport, kind):
    return [e["key"] for e in transport.events if e["event"] == kind]


# ------------------------------------------------------------------ (1) the store is reachable from the network


AGENT = """
import os, pathlib, sys, time
from datetime import timedelta
import torch.distributed as dist
folder = pathlib.Path(sys.argv[1])
(folder / "port.tmp").write_text(os.environ["MASTER_PORT"])
os.rename(folder / "port.tmp", folder / "port")
deadline = time.monotonic() + 120
while not (folder / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                      timeout=timedelta(seconds=10))
(folder / "seen").write_bytes(store.get("members/0") if store.check(["members/0"]) else b"<absent>")
"""

ROGUE = """
import sys
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore(sys.argv[1], int(sys.argv[2]), is_master=False, timeout=timedelta(seconds=4))
store.set("members/0", "forged by a rogue")
print("rogue wrote members/0")
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _local_address() -> str | None:
    """A non-loopback IPv4 address of this machine, or None."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    found = [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line]
    return found[0] if found else None


@pytest.fixture
def network():
    """(server command prefix, rogue command prefix, address the rogue dials, how).

    Two network namespaces of our own joined by a veth pair: the launcher runs in one (192.0.2.1/24), the rogue
    in the other (192.0.2.2/24). Both addresses live only inside these namespaces: the root namespace is left
    alone (on this machine 192.0.2.0/24 is also eth0's network and 192.0.2.1 its gateway). Without namespaces the
    rogue dials a non-loopback address of this machine from the root namespace instead."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    tag = f"{os.getpid() % 100000}"
    server_ns, rogue_ns = f"decaf-b-srv-{tag}", f"decaf-b-rogue-{tag}"
    server_if, rogue_if = f"dcbs{tag}", f"dcbr{tag}"
    try:
        _ip("netns", "add", server_ns)
        _ip("netns", "add", rogue_ns)
        _ip("link", "add", server_if, "type", "veth", "peer", "name", rogue_if)
        _ip("link", "set", server_if, "netns", server_ns)
        _ip("link", "set", rogue_if, "netns", rogue_ns)
        for ns, interface, address in ((server_ns, server_if, "192.0.2.1/24"), (rogue_ns, rogue_if, "192.0.2.2/24")):
            _ip("-n", ns, "addr", "add", address, "dev", interface)
            _ip("-n", ns, "link", "set", interface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        usable = True
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        usable = False
    try:
        if usable:
            yield (["ip", "netns", "exec", server_ns], ["ip", "netns", "exec", rogue_ns], "192.0.2.1",
                   "rogue in its own network namespace")
        else:
            address = _local_address()
            if address is None:
                pytest.skip("ip netns refused and no non-loopback address to dial instead")
            how = f"ip netns refused: the rogue dials this machine's address {address} instead"
            warnings.warn(how)
            yield [], [], address, how
    finally:
        for ns in (server_ns, rogue_ns):  # deleting a namespace deletes the veth end inside it
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "delete", server_if], capture_output=True, timeout=30)


def test_a_rogue_on_the_network_cannot_reach_the_launchers_store(network, tmp_path):
    """Before the fix the launcher's TCPStore listened on every interface: the rogue in the other namespace wrote
    members/0 and the agent read it back. Now the listening socket is bound to 127.0.0.1: connection refused."""
    server_prefix, rogue_prefix, address, how = network
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen([*server_prefix, sys.executable, "-c",
                                 "import sys\nfrom decaf_ext.distributed.launcher import launch\n"
                                 "sys.exit(max(launch([sys.executable, '-c', sys.argv[1], sys.argv[2]], 1)))",
                                 AGENT, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "port").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the launcher did not start"
            time.sleep(0.1)
        port = (tmp_path / "port").read_text()
        rogue = subprocess.run([*rogue_prefix, sys.executable, "-c", ROGUE, address, port], env=env,
                               capture_output=True, text=True, timeout=120)
        (tmp_path / "go").touch()
        assert launcher.wait(timeout=120) == 0
    finally:
        (tmp_path / "go").touch()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert "rogue wrote" not in rogue.stdout and rogue.returncode != 0, how
    assert (tmp_path / "seen").read_bytes() == b"<absent>", how


# ------------------------------------------------------------- (1) forged and garbage values in the store


def forge(rogue: dist.Store, values: dict[str, str | bytes]) -> None:
    for key, value in values.items():
        rogue.set(key, value)


def test_forged_values_are_ignored_with_a_run_key(server):
    """A rogue store client (no key) forges the run's fingerprint, its startup view, views of rounds -1 and 0,
    latest, the nonce, agent 1's incarnation counter, and start / ready / join records of agent 3, which never
    comes. Without a key every one of them is believed (tested below with garbage); with one they are treated as
    absent and logged once per key: the agents agree on the right members, fast."""
    rogue = client(server)
    forged = {"fingerprint": "evil", "startup": FORGED_VIEW, "members/-1": FORGED_VIEW, "members/0": FORGED_VIEW,
              "latest": "7", "nonce": "00" * 16, "incarnation/1": "garbage", "start/3": FORGED_RECORD,
              "ready/0/3": FORGED_RECORD, "join/3": json.dumps({"incarnation": 1, "round": 0})}
    forge(rogue, forged)
    transports = make(server, 4, range(3), key=KEY)
    assert together(lambda t: t.start(0), transports) == [0, 0, 0]
    assert [t.current_view().agents for t in transports] == [[0, 1, 2]] * 3
    forge(rogue, {"members/0": FORGED_VIEW, "latest": "garbage"})  # overwrite agreed values mid-run
    rounds = timed_rounds(transports, range(3))
    assert [t.latest for t in transports] == [2, 2, 2]
    # a signed view moved to another round's key; an older signed latest written back (a replay)
    forge(rogue, {"members/3": rogue.get("members/1"), "members/2": FORGED_VIEW, "latest": rogue.get("latest")})
    rounds += timed_rounds(transports, range(3, 5))
    forge(rogue, {"latest": rogue.get("latest")[:64] + b"9"})  # its signature, another value
    for seconds, views in rounds:
        assert [v.agents for v in views] == [[0, 1, 2]] * 3 and seconds < 1.0  # nobody waited for agent 3
    assert [t.latest for t in transports] == [4, 4, 4]
    assert transports[1].incarnation == 1
    assert len({t.nonce for t in transports}) == 1 and transports[0].nonce != bytes(16)
    assert len(transports[0].nonce) == 16
    seen = set()
    for t in transports:
        keys = event_keys(t, "forged")
        assert len(keys) == len(set(keys))  # once per key
        seen.update(keys)
    assert set(forged) | {"members/2", "members/3"} <= seen


GARBAGE = {"startup": b"{not json", "members/-1": b"\xff\xfe", "members/1": b"[]", "latest": b"seven",
           "nonce": b"xyz", "incarnation/1": b"garbage", "start/3": b'{"incarnation": "x"}',
           "ready/0/3": b"null", "ready/1/3": b'{"fingerprint": 5}', "join/3": b"{]",
           "members/0": b"[" * 100_000}  # nested too deep for json.loads (RecursionError)


def test_garbage_values_do_not_crash_an_agent_without_a_key(server):
    """Before the fix json.loads (or int) of a rogue's garbage raised inside start / agree, and a garbage
    incarnation counter made the store server drop the agent's connection; now each is one event, the value is
    ignored and the run goes on with the right members."""
    rogue = client(server)
    forge(rogue, GARBAGE)
    transports = make(server, 4, range(3))
    assert together(lambda t: t.start(0), transports) == [0, 0, 0]
    for seconds, views in timed_rounds(transports, range(3)):
        assert [v.agents for v in views] == [[0, 1, 2]] * 3 and seconds < 1.0
    seen = set()
    for t in transports:
        keys = event_keys(t, "malformed")
        assert len(keys) == len(set(keys))
        seen.update(keys)
    assert seen == set(GARBAGE)


# ------------------------------------------------------------------------ (8) stale join requests


@pytest.mark.parametrize("who, slow", [("dead agent", [0]), ("rogue", [0]), ("rogue, far future", [])])
def test_a_stale_join_request_costs_one_round(server, who, slow):
    """Agent 3 files a join request and dies (or a rogue files one for it, dated now or far ahead). Before the
    fix every later round of the others waited the full round timeout for it; now a request counts only in the
    round after it was filed (a live agent left out re-files every round), then expires."""
    transports = make(server, 4, range(3), timeout=1.5, startup=0.5)
    assert together(lambda t: t.start(0), transports) == [0, 0, 0]
    if who == "dead agent":
        assert make(server, 4, [3])[0].start(0) == 0  # left out of the startup view: asks to join, then dies
    else:
        request = {"incarnation": 1, "fingerprint": "same", "round": -1 if who == "rogue" else 10 ** 9}
        client(server).set("join/3", json.dumps(request))
    rounds = timed_rounds(transports, range(5))
    assert all([v.agents for v in views] == [[0, 1, 2]] * 3 for _, views in rounds)
    assert [r for r, (seconds, _) in enumerate(rounds) if seconds >= 1.0] == slow, [round(t, 2) for t, _ in rounds]


# ------------------------------------------------------------------------------ incarnation counters


def test_a_rogue_can_only_reset_an_incarnation_count(server):
    """The incarnation of agent j counts its processes. It was a store.add counter: a garbage value made the
    TCPStore server drop the connection of agent j's next process (DistNetworkError: it could not run). Now it is
    a signed record: a rogue cannot pick the number; deleting or garbling it only resets the count, so agent j's
    next process reuses its predecessor's number and is taken for it (no join request, the previous group kept)
    instead of joining as a new member: a failed group for a round at most, never another member."""
    rogue = client(server)
    rogue.set("incarnation/0", "41")
    first = make(server, 3, [0], key=KEY)[0]
    assert first.incarnation == 1 and event_keys(first, "forged") == ["incarnation/0"]
    assert make(server, 3, [0], key=KEY)[0].incarnation == 2

    def restart_agent_2(reset: bool):
        prefix = f"reset{int(reset)}"
        transports = make(server, 3, range(3), prefix=prefix)
        assert together(lambda t: t.start(0), transports) == [0, 0, 0]
        before = together(lambda t: t.agree(0), transports)[0]
        if reset:
            client(server, prefix).delete_key("incarnation/2")
        transports[2] = make(server, 3, [2], prefix=prefix)[0]
        assert transports[2].start(1) == 1
        return before, together(lambda t: t.agree(1), transports)

    before, views = restart_agent_2(reset=False)  # a new member: a new process group
    assert views[0] == views[2] and views[0].members == {0: 1, 1: 1, 2: 2} and views[0].group == 1
    before, views = restart_agent_2(reset=True)  # taken for its predecessor: the old group is kept
    assert views[0] == views[2] and views[0].members == before.members and views[0].group == before.group



# ----------------------------------------------------------------------------- keys, nonce, output_dir


def test_run_keys_are_checked_and_derived_with_hkdf():
    from decaf_ext.comm.keys import check_run_key, derive_key
    from decaf_ext.errors import ConfigError

    for bad in (b"", b"x" * 15, "a string of 20 chars"):
        with pytest.raises(ConfigError, match=r"^run_key_file / DECAF_RUN_KEY: ") as error:
            check_run_key(bad)
        assert "\n" not in str(error.value)
    assert check_run_key(b"x" * 16) == b"x" * 16
    with pytest.raises(ConfigError, match="run_key_file / DECAF_RUN_KEY"):
        derive_key(b"short", "control plane")
    with pytest.raises(ConfigError, match="run_key_file / DECAF_RUN_KEY"):
        Transport(dist.HashStore(), 0, 1, fingerprint="f", backend="gloo", timeout=1.0, startup_timeout=1.0,
                  run_key=b"short")

    def rfc5869(key: bytes, info: bytes, salt: bytes) -> bytes:  # one 32-byte block of RFC 5869, by hand
        prk = hmac.new(salt or bytes(32), key, hashlib.sha256).digest()
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()

    derived = derive_key(KEY, "control plane")
    assert len(derived) == 32 and derived == rfc5869(KEY, b"decaf_ext control plane", b"")
    assert derive_key(KEY, "message tags", b"salt") == rfc5869(KEY, b"decaf_ext message tags", b"salt")
    assert len({derived, derive_key(KEY, "message tags"), derive_key(KEY, "control plane", b"s"),
                derive_key(KEY[::-1], "control plane")}) == 4


def test_the_run_nonce_is_shared_and_fresh_per_run():
    """Every agent of a run, a late one too, gets the same 16 random bytes; another run (another store prefix)
    gets others. Before start there is none."""
    base = dist.HashStore()

    def run(prefix):
        store = dist.PrefixStore(prefix, base)
        transports = [Transport(store, j, 3, fingerprint="same", backend="gloo", timeout=1.0, startup_timeout=0.5,
                                run_key=KEY) for j in range(3)]
        with pytest.raises(RuntimeError, match="^nonce: "):
            transports[0].nonce
        together(lambda t: t.start(0), transports[:2])
        transports[2].start(0)  # after the others: joins the running group
        assert len({t.nonce for t in transports}) == 1 and len(transports[0].nonce) == 16
        return transports[0].nonce

    assert run("one") != run("two")


def test_a_forged_output_dir_is_ignored_with_a_run_key():
    """Without --output-dir the agents agree on a run folder through the store: a rogue's value would send every
    agent's files where it likes. Signed, a forged one is replaced by the first agent's."""
    from decaf_ext.comm.control_store import shared_value

    store = dist.HashStore()
    store.set("output_dir", "/somewhere/else")
    assert shared_value(store, KEY, "output_dir", "runs/a") == "runs/a"
    assert shared_value(store, KEY, "output_dir", "runs/b") == "runs/a"
    plain = dist.HashStore()  # without a key nothing tells the rogue's value from an agent's
    plain.set("output_dir", "/somewhere/else")
    assert shared_value(plain, None, "output_dir", "runs/a") == "/somewhere/else"


def test_agent_comm_hands_the_run_key_to_its_transport():
    import torch

    from decaf_ext.comm.agent_comm import AgentComm
    from decaf_ext.lora import FactorGroup
    from decaf_ext.strategies import get_strategy

    groups = [FactorGroup(["q"], torch.randn(1, 1, 2, 3), torch.randn(1, 1, 4, 2))]
    store = dist.HashStore()
    comm = AgentComm(get_strategy("dlora"), groups, {}, store=store, agent=0, n_agents=1, backend="gloo",
                     device=torch.device("cpu"), run_key=KEY)
    assert comm.transport.control.signed
    assert store.get("incarnation/0")[64:] == b"1"  # signed: 64 hex characters of HMAC, then the count


def test_an_agent_with_another_layout_cannot_admit_itself_when_it_proposes(server):
    """An agent whose start was refused (another message layout) that still calls agree and happens to write the
    round's view proposes with the run's layout, not its own."""
    transports = make(server, 3, range(2), startup=0.5)
    together(lambda t: t.start(0), transports)
    stranger = Transport(client(server), 2, 3, fingerprint="other", backend="gloo", timeout=1.5, startup_timeout=0.5)
    with pytest.raises(ValueError, match="^fingerprint: "):
        stranger.start(0)
    for t in transports:  # their readiness for round 0 is posted: the stranger's wait ends first, it proposes
        t.control.set(f"ready/0/{t.agent}", t._record(broken=False))
    assert stranger.agree(0) is None
    assert [v.agents for v in together(lambda t: t.agree(0), transports)] == [[0, 1], [0, 1]]
