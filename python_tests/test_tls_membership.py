"""decaf_ext.comm.tls_membership and the membership of TlsTransport in one process, on loopback: the planned live
set of a churn schedule, an absent agent not waited for until it speaks again, the Mix sender check on the
re-linked live graph, a graceful leaver's Bye, a crashed agent left out then back after a restart, two agents that
disagree about one round and agree again the next; bad input on both transports (another model / algorithm / run
key, an id beyond the run's, a second process on a live agent's address). The same churn as processes over TLS is
test_tls_elastic.py.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist

from decaf_ext.cli import main as cli_main
from decaf_ext.comm import tls_peer
from decaf_ext.comm.kit import _certificate, agent_name, load_kit
from decaf_ext.comm.run_identity import difference, key_digest, run_identity
from decaf_ext.comm.tls_membership import REASONS_LOGGED, LiveSet, notice
from decaf_ext.comm.tls_transport import TlsTransport
from decaf_ext.comm.transport import Transport
from decaf_ext.elastic import ChurnSchedule, LiveMixing
from decaf_ext.errors import ConfigError
from decaf_ext.topology import validate_mixing
from test_tls_transport import loopback_kit, raw_push, told
from test_trainer import tiny_config, tiny_paths  # noqa: F401 (a fixture)

KEY = b"the run key of this test, 32 b.."
IDENTITY = run_identity("760:torch.float32:0123456789abcdef", "decaf", KEY)
CHURN = "join:5@3,leave:2@5,kill:3@6"


def started(folders: list[str], timeout: float, identity: str = IDENTITY, topology: str = "ring",
            churn: str | None = None) -> list[TlsTransport]:
    """One started TlsTransport per kit folder, re-weighting on the live `topology` graph."""
    n = load_kit(folders[0]).n_agents
    mixing, schedule = LiveMixing(topology, n), ChurnSchedule.parse(churn, n)
    with ThreadPoolExecutor(len(folders)) as pool:
        made = list(pool.map(lambda f: TlsTransport(load_kit(f), fingerprint=identity, timeout=timeout,
                                                    startup_timeout=20.0, mixing=mixing, churn=schedule), folders))
        list(pool.map(lambda t: t.start(0), made))
    return made


def mix(made: list[TlsTransport], round_index: int, topology: str = "ring") -> list[tuple[list[int], list[int]]]:
    """Round `round_index` for every transport in `made` at once: agree, then push [4] ones to the neighbours in
    the agent's own live graph. Returns (members, agents heard from) per transport."""
    with ThreadPoolExecutor(len(made)) as pool:
        return list(pool.map(lambda t: one_round(t, round_index, topology), made))


def one_round(transport: TlsTransport, round_index: int, topology: str = "ring") -> tuple[list[int], list[int]]:
    view = transport.agree(round_index)
    graph = LiveMixing(topology, transport.n_agents).graph(round_index, view.agents)
    peers = [j for j in view.agents if bool(graph[transport.agent, j])]
    received = transport.send_and_receive(view, {j: torch.ones(4) for j in peers})
    return view.agents, sorted(received)


def events(transport: TlsTransport, kind: str) -> list[tuple[int, int]]:
    return [(e["round"], e["agent"]) for e in transport.events if e["event"] == kind]


@pytest.fixture
def closing():
    made: list[TlsTransport] = []
    yield made
    for transport in made:
        transport.close()


# --------------------------------------------------------------------------------------------- LiveSet


def test_the_planned_live_set_follows_the_schedule_but_not_its_crashes():
    live = LiveSet(0, 6, IDENTITY, ChurnSchedule.parse(CHURN, 6))
    assert live.planned(0) == {0, 1, 2, 3, 4} and live.planned(3) == {0, 1, 2, 3, 4, 5}
    assert live.planned(5) == {0, 1, 3, 4, 5}  # the leaver is not expected from its round on
    assert live.planned(6) == {0, 1, 3, 4, 5}  # the crash is not known in advance: found by the round timeout
    live.on_bye(4, 7)
    assert live.planned(7) == {0, 1, 3, 5} and live.planned(6) == {0, 1, 3, 4, 5}


def test_an_absent_agent_is_not_waited_for_until_it_speaks_again():
    live = LiveSet(0, 3, IDENTITY)
    assert live.on_ready(1, 0, False, IDENTITY) is None
    assert live.wait(0, fresh=False, timeout=0.05) == ([0, 1], (), {2})
    assert live.candidates(1) == {0, 1}  # not waited for in the next rounds
    live.on_ready(1, 1, False, IDENTITY)
    assert live.wait(1, fresh=False, timeout=60.0) == ([0, 1], (), set())  # returns at once: 1 was all it needed
    assert live.on_ready(2, 3, True, IDENTITY) is None  # agent 2 restarted: it enters round 3, without a state
    assert live.candidates(2) == {0, 1} and live.candidates(3) == {0, 1, 2}
    live.on_ready(1, 3, False, IDENTITY)
    assert live.wait(3, fresh=False, timeout=60.0) == ([0, 1, 2], (2,), set())
    for round_index in range(4, 40):  # an insider announcing many rounds: only its newest Readys are kept
        live.on_ready(1, round_index, False, IDENTITY)
    assert sorted(live.ready[1]) == [36, 37, 38, 39]


def test_an_agent_the_others_went_on_without_continues_with_their_round():
    live = LiveSet(0, 3, IDENTITY)
    live.on_ready(1, 7, False, IDENTITY)
    assert live.behind(5, [0, 2]) is None  # one agent ahead, one with it: not behind
    live.on_ready(2, 8, False, IDENTITY)
    assert live.behind(5, [0]) == 7  # alone in round 5, both others announced later rounds: it goes to round 7
    assert LiveSet(0, 3, IDENTITY, run=bytes(16)).behind(5, [0]) is None
    lone = LiveSet(0, 3, IDENTITY)
    lone.on_ready(2, 9, False, IDENTITY)
    assert lone.behind(5, [0]) is None  # one agent that ran ahead alone is not followed
    joiner = LiveSet(0, 3, IDENTITY)
    joiner.on_ready(2, 8, True, IDENTITY)  # a joiner announcing its join round is not ahead
    assert joiner.behind(5, [0, 1]) is None and joiner.behind(5, [0]) is None


def test_malformed_membership_messages_are_refused(tmp_path, closing):
    folders = loopback_kit(tmp_path, n=3, topology="ring")
    made = started(folders, timeout=3.0)
    closing.extend(made)
    kit = Path(folders[1])
    credentials = grpc.ssl_channel_credentials(*(kit.joinpath(n).read_bytes() for n in ("ca.pem", "key.pem",
                                                                                        "cert.pem")))
    codes = []
    with grpc.secure_channel(made[0].kit.address(0), credentials,
                             options=[("grpc.ssl_target_name_override", "agent-0")]) as channel:
        for name, message in (("Ready", b"[" * 3000), ("Ready", b"{}"), ("Bye", notice(b"\0" * 16, 2)),
                              ("Ready", notice(made[0].kit.run, -1, fresh=False, identity=IDENTITY)),
                              ("Ready", notice(made[0].kit.run, 1, fresh="yes", identity=IDENTITY))):
            try:
                channel.unary_unary(tls_peer.method(name))(message, timeout=5.0)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
    assert codes == ["INVALID_ARGUMENT"] * 5
    assert made[0].live.left == {} and made[0].live.ready == {}


def test_another_identity_is_refused_and_named():
    live = LiveSet(0, 3, IDENTITY)
    other = run_identity("760:torch.float32:0123456789abcdef", "dlora", KEY)
    assert live.on_ready(1, 0, False, other) == "algorithm 'dlora' instead of 'decaf'"
    assert 1 not in live.planned(0) and live.present(0) == {}
    assert live.on_ready(1, 0, False, IDENTITY) is None and 1 in live.planned(0)  # fixed and restarted: admitted
    assert difference(IDENTITY, run_identity("760:torch.float32:0123456789abcdef", "decaf", None)) == "no run key"
    assert difference(IDENTITY, run_identity("760:torch.float32:0123456789abcdef", "decaf", b"x" * 32)) \
        == "another run key"
    assert difference(IDENTITY, run_identity("999:torch.float32:0123456789abcdef", "decaf", KEY)).startswith(
        "another message layout")
    assert KEY.hex() not in IDENTITY and KEY.decode() not in IDENTITY and key_digest(KEY) in IDENTITY


def test_the_mix_sender_check_follows_the_relinked_ring():
    """Agent 4 of a 6-ring whose slot 5 is empty until round 3: the live ring 0-1-2-3-4-0 makes agent 0 its new
    neighbour; agent 5 may push from the round before it joins; agents 1 and 2 never."""
    mixing = LiveMixing("ring", 6)
    live = LiveSet(4, 6, IDENTITY, ChurnSchedule.parse(CHURN, 6), mixing.graph)
    assert {j for j in range(6) if j != 4 and live.may_push(j, 0)} == {0, 3}
    assert {j for j in range(6) if j != 4 and live.may_push(j, 2)} == {0, 3, 5}  # round 3 is the next one
    assert {j for j in range(6) if j != 4 and live.may_push(j, 4)} == {3, 5}  # the ring over all six
    for j in (0, 1, 2, 5):
        live.on_ready(j, 4, False, IDENTITY)
    assert live.wait(4, fresh=False, timeout=0.05)[2] == {3}  # 3 crashed: absent
    # 3 gone: ring 0-1-2-4-5 in round 4, and 0-1-4-5 in round 5 (2 leaves): 2, then 1, re-linked to 4
    assert {j for j in range(6) if j != 4 and live.may_push(j, 4)} == {1, 2, 5}


# ------------------------------------------------------------------------------------ over TLS, in-process


def test_a_graceful_leaver_is_not_waited_for(tmp_path, closing):
    """The round timeout is long: a leaver waited for would cost it and show as peer_lost."""
    made = started(loopback_kit(tmp_path, n=4, topology="ring"), timeout=60.0)
    closing.extend(made[:3])
    assert mix(made, 0) == [([0, 1, 2, 3], [1, 3]), ([0, 1, 2, 3], [0, 2]), ([0, 1, 2, 3], [1, 3]),
                            ([0, 1, 2, 3], [0, 2])]
    made[3].leave(1)
    made[3].close()
    # the ring re-links over 0, 1, 2 (a triangle): 0 and 2, not neighbours before, are let in
    assert mix(made[:3], 1) == [([0, 1, 2], [1, 2]), ([0, 1, 2], [0, 2]), ([0, 1, 2], [0, 1])]
    for transport in made[:3]:
        assert events(transport, "peer_left") == [(1, 3)] and events(transport, "peer_lost") == []
        assert events(transport, "refused") == []


def test_a_bye_while_the_others_wait_ends_their_wait(tmp_path, closing):
    """As on SIGTERM: agents 0-2 already wait for agent 3's Ready of round 1 when it says Bye (leaving before
    round 1). The round timeout is long: they agree without it as a departure, not a loss."""
    made = started(loopback_kit(tmp_path, n=4, topology="ring"), timeout=60.0)
    closing.extend(made[:3])
    mix(made, 0)
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(t.agree, 1) for t in made[:3]]
        time.sleep(1.5)  # all three are inside their wait for agent 3
        made[3].leave(1)
        made[3].close()
        assert [future.result(timeout=20).agents for future in waiting] == [[0, 1, 2]] * 3
    for transport in made[:3]:
        assert events(transport, "peer_left") == [(1, 3)] and events(transport, "peer_lost") == []


def test_an_agent_that_left_and_restarts_is_taken_back(tmp_path, closing):
    """Agent 2 leaves before round 1 (Bye, as on SIGTERM) and is restarted with --resume after the others did
    rounds 1 and 2: its Ready of the round it enters says it is back; from then on all three mix again."""
    folders = loopback_kit(tmp_path, n=3, topology="ring")
    made = started(folders, timeout=2.0)
    closing.extend(made[:2])
    mix(made, 0)
    made[2].leave(1)
    made[2].close()
    assert [members for members, _ in mix(made[:2], 1)] == [[0, 1]] * 2
    mix(made[:2], 2)
    back = TlsTransport(load_kit(folders[2]), fingerprint=IDENTITY, timeout=2.0, startup_timeout=20.0,
                        mixing=LiveMixing("ring", 3), churn=ChurnSchedule.parse(None, 3))
    closing.append(back)
    with ThreadPoolExecutor(3) as pool:
        entering = pool.submit(back.start, 1)  # --resume from its checkpoint after round 1
        time.sleep(1.0)
        rounds = {}
        for r in (3, 4):
            if r == 3:
                assert entering.result(timeout=30) == 3  # after the round the others are in
            rounds[r] = [f.result(timeout=30) for f in [pool.submit(one_round, t, r) for t in (*made[:2], back)]]
    assert rounds[4] == [([0, 1, 2], [1, 2]), ([0, 1, 2], [0, 2]), ([0, 1, 2], [0, 1])]


def test_a_crashed_agent_is_waited_for_once_then_rejoins_when_it_speaks_again(tmp_path, closing):
    folders = loopback_kit(tmp_path, n=4, topology="ring")
    made = started(folders, timeout=3.0)
    closing.extend(made[:3])
    mix(made, 0)
    made[3].close()  # crashes after round 0
    assert mix(made[:3], 1) == [([0, 1, 2], [1, 2]), ([0, 1, 2], [0, 2]), ([0, 1, 2], [0, 1])]
    assert all(events(t, "peer_lost") == [(1, 3)] for t in made[:3])  # waited for one round timeout
    assert all(3 not in t.live.candidates(2) for t in made[:3])
    mix(made[:3], 2)
    assert all(events(t, "peer_lost") == [(1, 3)] for t in made[:3])  # not waited for again
    restarted = TlsTransport(load_kit(folders[3]), fingerprint=IDENTITY, timeout=3.0, startup_timeout=20.0,
                             mixing=LiveMixing("ring", 4))
    closing.append(restarted)
    with ThreadPoolExecutor(1) as pool:  # its checkpoint is of round 1; the others are done with round 2
        back = pool.submit(lambda: (restarted.start(1), one_round(restarted, 3)))
        deadline = time.monotonic() + 30
        while not all(3 in t.live.present(3) for t in made[:3]) and time.monotonic() < deadline:
            time.sleep(0.05)  # its Ready of round 3, sent as it starts, reaches the others before they enter it
        others = mix(made[:3], 3)
        assert back.result(timeout=60) == (3, ([0, 1, 2, 3], [0, 2]))
    assert others == [([0, 1, 2, 3], [1, 3]), ([0, 1, 2, 3], [0, 2]), ([0, 1, 2, 3], [1, 3])]
    assert [e["round"] for e in restarted.events if e["event"] == "joining"] == [2]
    assert mix([*made[:3], restarted], 4) == [([0, 1, 2, 3], [1, 3]), ([0, 1, 2, 3], [0, 2]),
                                              ([0, 1, 2, 3], [1, 3]), ([0, 1, 2, 3], [0, 2])]


def test_agents_that_disagree_about_one_round_agree_again_the_next(tmp_path, closing):
    """Agent 3's Ready of round 1 reaches agent 0 only, then agent 3 dies (complete graph of 4): in round 1 agent 0
    counts it a member and the others do not; agent 0 keeps the missing weight, so W over the live agents is not
    doubly stochastic in that round (column sums); from round 2 on every agent has the same view again."""
    made = started(loopback_kit(tmp_path, n=4, topology="complete"), timeout=3.0, topology="complete")
    closing.extend(made[:3])
    mix(made, 0, "complete")
    made[3].close()
    told(made[0], 1, 3)
    first = mix(made[:3], 1, "complete")
    assert [members for members, _ in first] == [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2]]
    # agent 0 did not wait for agent 3 and entered the exchange a round timeout before 1 and 2: the exchange window
    # (two round timeouts) still lets every live pair meet
    assert [heard for _, heard in first] == [[1, 2], [0, 2], [0, 1]]
    mixing = LiveMixing("complete", 4)
    rows = []
    for (members, heard), transport in zip(first, made[:3]):
        row = mixing.at(1, members)[transport.agent].clone()
        row[transport.agent] += row[[j for j in members if j not in heard and j != transport.agent]].sum()
        rows.append(row[:3])  # a missing neighbour's weight stays with the agent (AgentRound)
    W = torch.stack(rows)
    assert torch.allclose(W.sum(dim=1), torch.ones(3, dtype=torch.float64)) and not torch.allclose(
        W.sum(dim=0), torch.ones(3, dtype=torch.float64))
    second = mix(made[:3], 2, "complete")
    assert [members for members, _ in second] == [[0, 1, 2]] * 3
    validate_mixing(mixing.at(2, [0, 1, 2])[:3, :3], name="round 2")


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("identity, reason", [
    (run_identity("760:torch.float32:0123456789abcdef", "dlora", KEY), "algorithm 'decaf' instead of 'dlora'"),
    (run_identity("760:torch.float32:0123456789abcdef", "decaf", b"another key of this test, 32 b.."),
     "another run key"),
    (run_identity("760:torch.float32:fedcba9876543210", "decaf", KEY), "another message layout")])
def test_a_joiner_with_another_configuration_is_refused_and_the_run_goes_on(tmp_path, closing, identity, reason):
    folders = loopback_kit(tmp_path, n=3, topology="ring")
    made = started(folders[:2], timeout=3.0, churn="join:2@1")  # agent 2 is expected from round 1
    closing.extend(made)
    with pytest.raises(ConfigError, match=r"^kit: neighbour agent 0 at 127\.0\.0\.1:\d+ runs another configuration "
                                          rf"\(it has {reason}"):
        TlsTransport(load_kit(folders[2]), fingerprint=identity, timeout=3.0, startup_timeout=5.0)
    assert [e["agent"] for e in made[0].events if e["event"] == "refused"] == [2]
    assert 2 not in made[0].live.planned(1)
    # its Ready, were it sent anyway, is refused too; the two go on without it
    kit = Path(folders[2])
    credentials = grpc.ssl_channel_credentials(*(kit.joinpath(n).read_bytes() for n in ("ca.pem", "key.pem",
                                                                                        "cert.pem")))
    with grpc.secure_channel(made[0].kit.address(0), credentials,
                             options=[("grpc.ssl_target_name_override", "agent-0")]) as channel:
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary(tls_peer.method("Ready"))(notice(made[0].kit.run, 1, fresh=False, identity=identity),
                                                          timeout=5.0)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mix(made, 1) == [([0, 1], [1]), ([0, 1], [0])]


def test_an_id_beyond_the_run_is_refused_before_anything_is_read(tmp_path, closing):
    """A certificate the run's CA signed for agent-7 (the run has 3): no method takes its calls."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folders = loopback_kit(tmp_path, n=3, topology="ring")
    made = started(folders, timeout=3.0)
    closing.extend(made)
    ca_key = serialization.load_pem_private_key((tmp_path / "kit" / "ca" / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(Path(folders[0], "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    cert = _certificate(agent_name(7), key.public_key(), ca.subject.rfc4514_string().removeprefix("CN="), ca_key,
                        days=1, ca=False, start=start)
    credentials = grpc.ssl_channel_credentials(Path(folders[0], "ca.pem").read_bytes(), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM))
    codes = []
    with grpc.secure_channel(made[0].kit.address(0), credentials,
                             options=[("grpc.ssl_target_name_override", "agent-0")]) as channel:
        for name, message in (("Hello", b""), ("Ready", notice(made[0].kit.run, 0, fresh=False, identity=IDENTITY)),
                              ("Bye", notice(made[0].kit.run, 0))):
            try:
                channel.unary_unary(tls_peer.method(name))(message, timeout=5.0)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
        try:
            channel.stream_unary(tls_peer.method("Mix"))(iter([b"{}"]), timeout=5.0)
        except grpc.RpcError as error:
            codes.append(error.code().name)
    assert codes == ["PERMISSION_DENIED"] * 4
    assert made[0].live.left == {} and made[0].live.planned(0) == {0, 1, 2}


def cli_argv(tiny_paths, tmp_path, kit: str) -> list[str]:
    config = tiny_config(tiny_paths, tmp_path / "run", agents=3)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()
            if k in ("model", "dataset", "agents", "rank", "max_len", "rounds", "local_steps", "output_dir")]
    return argv + ["--launcher", "dist", "--transport", "tls", "--kit", kit, "--startup-timeout", "5"]


@pytest.mark.parametrize("how", ["live id", "algorithm"])
def test_the_command_line_refuses_a_second_agent_1_or_another_algorithm_with_one_line(tiny_paths, tmp_path, closing,
                                                                                     capsys, how):
    folders = loopback_kit(tmp_path, n=3, topology="ring")
    if how == "live id":
        closing.extend(started(folders, timeout=3.0))
    else:  # agent 0 answers Hello as an agent of this run with the dlora algorithm would
        kit = load_kit(folders[0])
        state = json.dumps({"round": -1, "run": kit.run.hex(), "fingerprint": "a layout|dlora|no-key"}).encode()
        server = tls_peer.serve(kit, {"Hello": tls_peer.unary(lambda request, context: state)}, 4)
    try:
        assert cli_main(cli_argv(tiny_paths, tmp_path, folders[1])) == 2
    finally:
        if how != "live id":
            server.stop(None)
    err = capsys.readouterr().err.strip()
    expected = (r"kit: agent 1 cannot listen on 127\.0\.0\.1:\d+ " if how == "live id" else
                r"kit: neighbour agent 0 at .* runs another configuration \(it has algorithm 'dlora' instead of "
                r"'decaf'")
    assert len(err.splitlines()) == 1 and re.search(expected, err), err
    assert not (tmp_path / "run").exists()


def test_a_gloo_joiner_with_another_algorithm_is_refused_with_one_line_and_the_run_goes_on():
    store = dist.HashStore()
    layout = "760:torch.float32:0123456789abcdef"
    transports = [Transport(store, j, 3, fingerprint=run_identity(layout, "decaf", None), backend="gloo",
                            timeout=1.0, startup_timeout=10.0) for j in range(2)]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda t: t.start(0, 0, [0, 1]), transports)) == [0, 0]
        assert [v.agents for v in pool.map(lambda t: t.agree(0), transports)] == [[0, 1]] * 2
    stranger = Transport(store, 2, 3, fingerprint=run_identity(layout, "dlora", None), backend="gloo", timeout=1.0,
                         startup_timeout=5.0)
    with pytest.raises(ConfigError, match=r"^fingerprint: this agent's configuration differs from the run's \(the "
                                          r"run has algorithm 'decaf' instead of 'dlora'\)"):
        stranger.start(0)
    with ThreadPoolExecutor(3) as pool:
        views = list(pool.map(lambda t: t.agree(1), [*transports, stranger]))
    assert views[0].agents == views[1].agents == [0, 1] and views[2] is None  # never admitted; the run goes on


def test_a_gloo_joiner_with_another_run_key_is_refused_with_one_line_and_the_run_goes_on():
    """Without the run's key it reads every record of the run as forged: refused before it writes anything."""
    store, layout = dist.HashStore(), "760:torch.float32:0123456789abcdef"
    transports = [Transport(store, j, 3, fingerprint=run_identity(layout, "decaf", KEY), backend="gloo", timeout=1.0,
                            startup_timeout=10.0, run_key=KEY) for j in range(2)]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda t: t.start(0, 0, [0, 1]), transports)) == [0, 0]
    other = b"another key of this test, 32 b.."
    stranger = Transport(store, 2, 3, fingerprint=run_identity(layout, "decaf", other), backend="gloo", timeout=1.0,
                         startup_timeout=5.0, run_key=other)
    startup = store.get("startup")
    with pytest.raises(ConfigError, match=r"^run_key: the running run's store records are not signed with this "
                                          r"agent's run key"):
        stranger.start(0, join_at=1)
    assert store.get("startup") == startup  # nothing of the run's was replaced
    with ThreadPoolExecutor(2) as pool:
        assert [v.agents for v in pool.map(lambda t: t.agree(0), transports)] == [[0, 1]] * 2


def unary_call(folder: str, address: str, target: str, name: str, message: bytes) -> str:
    """Call unary `name` with `message` at `address` with the certificate of kit `folder`; the status code's name."""
    kit = Path(folder)
    credentials = grpc.ssl_channel_credentials(*(kit.joinpath(n).read_bytes() for n in ("ca.pem", "key.pem",
                                                                                        "cert.pem")))
    with grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", target)]) as channel:
        try:
            channel.unary_unary(tls_peer.method(name))(message, timeout=5.0)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name


def test_an_insider_cannot_make_a_restarting_agent_drop_another_agent(tmp_path, closing):
    """Agent 1 (a keyed insider) answers the Hello of agent 0, restarting in round 3, with a Bye of agent 2 that
    agent 2 never sent (and agent ids int() cannot read): agent 0 believes it only until agent 2's own Ready of
    round 3 arrives, then waits for it and takes its pushes again."""
    folders = loopback_kit(tmp_path, n=3, topology="ring")
    run = load_kit(folders[0]).run
    state = json.dumps({"round": 2, "fingerprint": IDENTITY, "run": run.hex(),
                        "left": {"2": 0, "\u00b2": 0, "1" * 5000: 0, "-1": 0}}).encode()  # '²': isdigit, not int
    insider = tls_peer.serve(load_kit(folders[1]), {"Hello": tls_peer.unary(lambda request, context: state),
                                                    "Ready": tls_peer.unary(lambda request, context: b"")}, 4)
    try:
        with ThreadPoolExecutor(2) as pool:
            made = list(pool.map(lambda f: TlsTransport(load_kit(f), fingerprint=IDENTITY, timeout=3.0,
                                                        startup_timeout=20.0), (folders[0], folders[2])))
        closing.extend(made)
        made[1].round_now = 2
        assert made[0].start(3) == 3 and made[0].live.left == {2: 0}  # the relayed departure is taken...
        code = unary_call(folders[2], made[0].kit.address(0), "agent-0", "Ready",
                          notice(run, 3, fresh=False, identity=IDENTITY))
        assert code == "OK"  # ...until agent 2 itself says it is in round 3
        assert 2 in made[0].live.planned(3) and made[0].live.may_push(2, 3) and made[0].live.left == {}
        code = unary_call(folders[1], made[0].kit.address(0), "agent-0", "Ready",
                          notice(run, 4, fresh=False, identity=IDENTITY))
        assert code == "OK" and made[0].live.left == {}  # another agent's Ready does not bring 2 back or away
    finally:
        insider.stop(None)


def test_an_insider_alternating_identities_is_logged_once_per_reason(tmp_path, closing, caplog):
    """Agent 1 sends Readys (and Hellos) alternating another algorithm and the run's identity: each bad one is
    refused, each good one admitted, and agent 0 logs the refusal once, not once per call; cycling through new
    algorithm names (new reasons) grows its log by a bounded number of events only."""
    folders = loopback_kit(tmp_path, n=3, topology="ring")
    made = started(folders, timeout=3.0)
    closing.extend(made)
    other = run_identity("760:torch.float32:0123456789abcdef", "dlora", KEY)
    codes = []
    for step in range(6):
        identity = other if step % 2 == 0 else IDENTITY
        codes.append(unary_call(folders[1], made[0].kit.address(0), "agent-0", "Ready",
                                notice(made[0].kit.run, step, fresh=False, identity=identity)))
        codes.append(unary_call(folders[1], made[0].kit.address(0), "agent-0", "Hello",
                                json.dumps({"identity": identity}).encode()))
    assert codes == ["FAILED_PRECONDITION", "OK", "OK", "OK"] * 3
    assert events(made[0], "refused") == [(0, 1)]
    for step in range(12):  # a new algorithm name, so a new reason, in every call
        identity = run_identity("760:torch.float32:0123456789abcdef", f"algorithm {step} " + "x" * 1000, KEY)
        assert unary_call(folders[1], made[0].kit.address(0), "agent-0", "Ready", notice(
            made[0].kit.run, 6, fresh=False, identity=identity)) == "FAILED_PRECONDITION"
    assert len(events(made[0], "refused")) == REASONS_LOGGED  # at most that many reasons logged per agent
    made[0].live.logged.clear()
    huge = run_identity("760:torch.float32:0123456789abcdef", "y" * 10**6, KEY)
    assert unary_call(folders[1], made[0].kit.address(0), "agent-0", "Hello",
                      json.dumps({"identity": huge}).encode()) == "OK"
    assert max(len(record.getMessage()) for record in caplog.records) < 2 * tls_peer.HEADER_LIMIT


def test_an_insiders_far_rounds_and_byes_touch_only_its_own_membership(tmp_path, closing):
    """Agent 1 announces Readys of rounds far ahead and Byes of a round long past and far ahead: agent 0 stops
    waiting for agent 1 only, skips no round, and a round beyond any int json reads is a one-line refusal."""
    folders = loopback_kit(tmp_path, n=3, topology="ring")
    made = started(folders, timeout=3.0)
    closing.extend(made)
    run, address = made[0].kit.run, made[0].kit.address(0)
    codes = [unary_call(folders[1], address, "agent-0", "Ready", notice(run, 10**30 + k, fresh=False,
                                                                        identity=IDENTITY)) for k in range(6)]
    codes += [unary_call(folders[1], address, "agent-0", "Bye", notice(run, r)) for r in (10**30, 0, 10**40)]
    codes.append(unary_call(folders[1], address, "agent-0", "Ready", b'{"run": "%s", "round": 1%s, "fresh": false}'
                            % (run.hex().encode(), b"0" * 5000)))
    assert codes == ["OK"] * 9 + ["INVALID_ARGUMENT"]
    live = made[0].live
    assert live.left == {1: 0} and live.planned(0) == {0, 2} and sorted(live.ready[1]) == [10**30 + k
                                                                                            for k in range(2, 6)]
    assert live.behind(0, [0]) is None and live.behind(0, [0, 2]) is None  # one agent far ahead is not followed


def test_readys_hung_by_an_insider_do_not_hold_back_the_others(tmp_path, closing):
    """Agent 1 (a keyed insider, or a black-holed site) takes agent 0's Ready calls and never answers them: agent
    0's Readys to agent 2 still go out at once (no queue behind the hung calls, whatever their number), so agent 2
    keeps counting agent 0 in."""
    import threading

    folders = loopback_kit(tmp_path, n=3, topology="ring")
    run, release = load_kit(folders[0]).run, threading.Event()
    state = json.dumps({"round": -1, "fingerprint": IDENTITY, "run": run.hex(), "left": {}}).encode()
    insider = tls_peer.serve(load_kit(folders[1]), {"Hello": tls_peer.unary(lambda request, context: state),
                                                    "Ready": tls_peer.unary(lambda r, c: release.wait() and b"")}, 8)
    try:
        with ThreadPoolExecutor(2) as pool:
            made = list(pool.map(lambda f: TlsTransport(load_kit(f), fingerprint=IDENTITY, timeout=20.0,
                                                        startup_timeout=20.0), (folders[0], folders[2])))
        closing.extend(made)
        for round_index in range(4):  # more hung calls than agent 0 has others
            made[0]._announce(round_index, {1}, made[0].live.enter(round_index, False))
        made[0]._announce(4, {1, 2}, made[0].live.enter(4, False))
        live = made[1].live
        with live.cond:  # the Ready's deadline is 5 s: it must come well before
            assert live.cond.wait_for(lambda: 0 in live.present(4), timeout=3.0)
    finally:
        release.set()
        insider.stop(None)


def test_a_relayed_departure_far_ahead_does_not_hide_an_earlier_one():
    """An insider's Hello answer relays agent 2's departure at a far round before an honest answer relays its real
    one (round 5): agent 0 stops waiting for agent 2 at round 5; agent 2's own Bye still counts over both."""
    live = LiveSet(0, 3, IDENTITY)
    live.learn_left({"2": 10**30}, frozenset({1, 2}))
    live.learn_left({"2": 5}, frozenset({1, 2}))
    assert live.planned(5) == {0, 1} and live.planned(4) == {0, 1, 2}
    live.on_bye(2, 7)  # its own word: a Ready of a round before it (late) does not bring it back ...
    live.on_ready(2, 6, False, IDENTITY)
    assert live.planned(7) == {0, 1}
    live.on_ready(2, 9, False, IDENTITY)  # ... its Ready of a later round (restarted: it came back) does
    assert live.planned(9) == {0, 1, 2}


def test_a_leaf_of_a_star_is_not_let_in_before_the_hubs_next_ready(tmp_path, closing):
    """Star of 3 (hub 0): agent 1's Ready of round 1 reaches agent 2 before the hub's. Over the agents heard from in
    round 1 alone ({1, 2}) the star would re-link with 1 as its hub; the hub, present in round 0, still counts, so
    agent 1's mixing pushes stay refused (test_tls_netns's rogue found them let in)."""
    made = started(loopback_kit(tmp_path, n=3, topology="star"), timeout=3.0, topology="star")
    closing.extend(made)
    mix(made, 0, "star")
    told(made[2], 1, 1)
    assert not made[2]._may_push("Mix", 1) and made[2]._may_push("Mix", 0)


def test_a_leaf_let_in_while_the_star_is_open_is_refused_once_the_exchange_is_agreed(tmp_path, closing):
    """Star of 3 (hub 0), round 0: agent 1's Ready reaches agent 2 before the hub's. Over {1, 2} the star re-links
    with 1 as its hub, so agent 1's push is let in and held; once the hub has come and the exchange is agreed
    without agent 1, the push is refused (PERMISSION_DENIED) and logged (`unexpected`), before any chunk of it is
    read."""
    folders = loopback_kit(tmp_path, n=3, topology="star")
    made = started(folders, timeout=3.0, topology="star")
    closing.extend(made)
    told(made[2], 0, 1)
    assert made[2]._may_push("Mix", 1)  # it may yet be agent 2's neighbour
    header = {"run": made[2].kit.run.hex(), "round": 0, "seq": 0, "numel": 4, "dtype": "float32"}
    with ThreadPoolExecutor(1) as pool:
        pushed = pool.submit(raw_push, folders[1], made[2].kit.address(2), "agent-2", "Mix", header,
                             torch.ones(4).numpy().tobytes(), timeout=made[2].window)
        time.sleep(0.5)  # the push waits for exchange 0 at agent 2
        told(made[2], 0, 0)
        view = made[2].agree(0)
        assert view.agents == [0, 1, 2] and not made[2]._may_push("Mix", 1)
        received = made[2].send_and_receive(view, {0: torch.ones(4)})  # the hub sends nothing: its window ends
        assert pushed.result() == grpc.StatusCode.PERMISSION_DENIED
    assert received == {}
    assert [(e["event"], e["agent"]) for e in made[2].events if e["event"] in ("refused", "unexpected")] \
        == [("unexpected", 1)]
