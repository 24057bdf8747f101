"""decaf_ext.comm.kit / tls_transport in one process: provisioning, the kit's checks (one line naming the file, exit 2,
nothing written), and attacks on a running agent's TLS server: a rogue from another CA, a real agent's certificate
used by a non-neighbour or to pose as another agent's server, a size that disagrees with the expected one, and the
TLS versions the server takes. The multi-process runs across network namespaces are in test_tls_netns.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import ssl
import stat
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from decaf_ext.cli import main as cli_main
from decaf_ext.comm import tls_peer
from decaf_ext.comm.kit import check_topology, load_kit, provision
from decaf_ext.comm.round_view import RoundView
from decaf_ext.comm.tls_transport import TlsTransport
from decaf_ext.errors import ConfigError
from test_trainer import tiny_config, tiny_paths  # noqa: F401 (a fixture)
from test_user_loop import PERIOD, STEPS, check_rounds, save_round, snapshot, tiny_agent

def free_addresses(hosts: list[str]) -> list[str]:
    """host:port with a port free on each host now (asked of the system: no clash with other jobs' sockets)."""
    sockets = [socket.socket() for _ in hosts]
    try:
        for host, sock in zip(hosts, sockets):
            sock.bind((host, 0))
        return [f"{host}:{sock.getsockname()[1]}" for host, sock in zip(hosts, sockets)]
    finally:
        for sock in sockets:
            sock.close()


def loopback_kit(root: Path, n: int = 3, topology: str = "star", name: str = "kit") -> list[str]:
    return provision(n, free_addresses(["127.0.0.1"] * n), str(root / name), topology=topology)


def transports(folders: list[str], timeout: float = 5.0) -> list[TlsTransport]:
    """One started TlsTransport per kit folder (made together: each waits for its neighbours)."""
    with ThreadPoolExecutor(len(folders)) as pool:
        made = list(pool.map(lambda f: TlsTransport(load_kit(f), fingerprint="same", timeout=timeout,
                                                    startup_timeout=20.0), folders))
    for transport in made:
        transport.start(0)
    return made


@pytest.fixture
def star(tmp_path):
    """Three agents on loopback, star topology: agent 0 is the hub, agents 1 and 2 are not neighbours."""
    folders = loopback_kit(tmp_path)
    made = transports(folders)
    yield folders, made
    for transport in made:
        transport.close()


def raw_push(kit_folder: str, address: str, target: str, name: str, header: dict | bytes, payload: bytes,
             timeout: float = 5.0) -> grpc.StatusCode:
    """Push `payload` after `header` to `address` with the certificate of `kit_folder`, expecting server identity
    `target`; returns the call's status code."""
    kit = Path(kit_folder)
    credentials = grpc.ssl_channel_credentials((kit / "ca.pem").read_bytes(), (kit / "key.pem").read_bytes(),
                                               (kit / "cert.pem").read_bytes())
    with grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", target)]) as channel:
        call = channel.stream_unary(tls_peer.method(name))
        try:
            raw = header if isinstance(header, bytes) else json.dumps(header).encode()
            call(iter([raw, payload]), timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


def told(transport: TlsTransport, round_index: int, *agents: int) -> None:
    """What the Ready messages of `agents` for round `round_index` do at `transport` (they entered that round), for
    a test that drives one agent alone."""
    for j in agents:
        assert transport.live.on_ready(j, round_index, False, transport.fingerprint) is None


def exchange(made: list[TlsTransport], numel: int = 6, round_index: int = 0) -> list[dict[int, torch.Tensor]]:
    """Round `round_index` of the star: every agent sends [numel] ones x (its id + 1) to its neighbours."""
    def one(transport):
        view = transport.agree(round_index)
        buffers = {j: torch.full((numel,), transport.agent + 1.0) for j in transport.kit.neighbours}
        return transport.send_and_receive(view, buffers)

    with ThreadPoolExecutor(len(made)) as pool:
        return list(pool.map(one, made))


# ------------------------------------------------------------------------------------------ provisioning


def test_provision_writes_one_folder_per_agent_with_private_keys(tmp_path, capsys):
    hosts = "192.0.2.11:7000,192.0.2.12:7000,192.0.2.13:7000,192.0.2.14:7000"
    assert cli_main(["provision", "--agents", "4", "--hosts", hosts, "--out", str(tmp_path / "kit")]) == 0
    assert "agent 3:" in capsys.readouterr().out
    for agent in range(4):
        kit = load_kit(str(tmp_path / "kit" / f"agent_{agent:02d}"))
        assert kit.agent == agent and kit.address(agent) == f"192.0.2.1{agent + 1}:7000"
        assert kit.neighbours == sorted([(agent - 1) % 4, (agent + 1) % 4])  # ring
        assert stat.S_IMODE(os.stat(tmp_path / "kit" / f"agent_{agent:02d}" / "key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "kit" / "ca" / "ca.key").st_mode) == 0o600
    assert not any(p.name == "ca.key" for p in (tmp_path / "kit").glob("agent_*/*"))  # the CA key stays apart


@pytest.mark.parametrize("argv, expected", [
    (["--agents", "3", "--hosts", "a:1,b:2"], "hosts: 2 addresses for 3 agents"),
    (["--agents", "2", "--hosts", "a:1,a:1"], "hosts: two agents share an address"),
    (["--agents", "2", "--hosts", "a:1,b"], "hosts: 'b' is not host:port"),
    (["--agents", "2", "--hosts", "a:1,b:2", "--topology", "moebius"], "topology:"),
])
def test_provision_mistakes_are_one_line(tmp_path, capsys, argv, expected):
    assert cli_main(["provision", *argv, "--out", str(tmp_path / "kit")]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ bad kits


def damaged(tmp_path: Path, how: str) -> tuple[str, str]:
    """A kit folder of agent 1 damaged `how`, and the file the error must name."""
    folders = loopback_kit(tmp_path, topology="ring", name="damaged")
    folder = Path(folders[1])
    if how == "missing key":
        (folder / "key.pem").unlink()
        return str(folder), "key.pem"
    if how == "other CA":
        other = loopback_kit(tmp_path, topology="ring", name="other")
        (folder / "ca.pem").write_bytes(Path(other[1], "ca.pem").read_bytes())
        return str(folder), "cert.pem"
    if how == "expired":
        old = provision(3, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], str(tmp_path / "old"), days=1,
                        start=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
        return old[1], "cert.pem"
    if how == "another agent's key":
        (folder / "key.pem").write_bytes(Path(folders[2], "key.pem").read_bytes())
        return str(folder), "key.pem"
    if how == "garbled peers":
        (folder / "peers.json").write_text("{")
        return str(folder), "peers.json"
    return str(tmp_path / "nowhere"), "nowhere"


@pytest.mark.parametrize("how", ["missing key", "other CA", "expired", "another agent's key", "garbled peers",
                                 "no folder"])
def test_a_bad_kit_is_one_line_naming_the_file(tmp_path, how):
    folder, culprit = damaged(tmp_path, how)
    with pytest.raises(ConfigError, match=culprit):
        load_kit(folder)


def test_a_peers_list_that_disagrees_with_the_topology_names_it(tmp_path):
    kit = load_kit(loopback_kit(tmp_path, n=4, topology="ring")[0])
    check_topology(kit, 4, "ring")
    with pytest.raises(ConfigError, match=r"peers.json.*agent 0 the neighbours \[1, 3\].*'star' gives \[1, 2, 3\]"):
        check_topology(kit, 4, "star")
    with pytest.raises(ConfigError, match="peers.json' lists 4 agents but the run has 5"):
        check_topology(kit, 5, "ring")


@pytest.mark.parametrize("how", ["expired", "topology", "unreachable", "no kit"])
def test_the_command_line_refuses_a_bad_kit_with_status_2_and_writes_nothing(tiny_paths, tmp_path, capsys, how):
    folders = loopback_kit(tmp_path, topology="ring")
    kit, culprit, changes = folders[1], "peers.json", []
    if how == "expired":
        kit, culprit = damaged(tmp_path, "expired")
    elif how == "topology":
        changes = ["--topology", "star"]
    elif how == "unreachable":  # nobody listens at agent 0's or agent 2's address
        culprit, changes = "neighbour agent 0 at 127.0.0.1", ["--startup-timeout", "2"]
    config = tiny_config(tiny_paths, tmp_path / "run", agents=3)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()
            if k in ("model", "dataset", "agents", "rank", "max_len", "rounds", "local_steps", "output_dir")]
    argv += ["--launcher", "dist", "--transport", "tls", *changes] + ([] if how == "no kit" else ["--kit", kit])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("--kit" if how == "no kit" else culprit) in err, err
    assert not (tmp_path / "run").exists()


def test_an_address_already_in_use_is_one_line_naming_the_agent(star):
    folders, _ = star
    with pytest.raises(ConfigError, match=r"kit: agent 1 cannot listen on 127\.0\.0\.1:\d+ .*peers.json"):
        TlsTransport(load_kit(folders[1]), fingerprint="same", timeout=2.0, startup_timeout=2.0)


@pytest.mark.parametrize("flags, expected", [
    (["--transport", "tls", "--kit", "k"], "transport: --transport tls needs --launcher dist"),
    (["--transport", "tls", "--kit", "k", "--launcher", "dist", "--nproc", "3", "--agents", "3"],
     "nproc: with --transport tls start each agent on its own"),
    (["--transport", "udp"], "transport"),
    (["--transport", "tls", "--kit", "k", "--launcher", "dist", "--agents", "3", "--churn", "leave:3@1"],
     "churn: agent 3 of 'leave:3@1' is not one of the run's 3 agents"),
])
def test_transport_flag_mistakes_are_one_line(tmp_path, capsys, flags, expected):
    assert cli_main([*flags, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- attacks on the server


def test_neighbours_exchange_and_gather_over_mutual_tls(star):
    _, made = star
    hub, one, two = exchange(made)
    assert sorted(hub) == [1, 2] and list(one) == [0] and list(two) == [0]
    assert float(hub[2][0]) == 3.0 and float(one[0][0]) == 1.0

    def gather(transport):
        return transport.all_gather(transport.current_view(), torch.tensor([float(transport.agent)] * 3,
                                                                           dtype=torch.float64))

    with ThreadPoolExecutor(3) as pool:
        gathered = list(pool.map(gather, made))
    assert all(g[:, 0].tolist() == [0.0, 1.0, 2.0] for g in gathered)


def test_a_non_neighbours_valid_certificate_is_refused_before_any_message_is_read(star):
    folders, made = star
    header = {"run": made[2].kit.run.hex(), "round": 0, "seq": 0, "numel": 6, "dtype": "float32"}
    payload = torch.ones(6).numpy().tobytes()
    told(made[2], 0, 0, 1)
    made[2].agree(0)
    # the same push from agent 0 (a neighbour of 2) gets past the identity check: only the round is wrong here
    assert raw_push(folders[0], made[2].kit.address(2), "agent-2", "Mix", {**header, "round": -5}, payload) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert raw_push(folders[1], made[2].kit.address(2), "agent-2", "Mix", header, payload) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert [(e["event"], e["agent"]) for e in made[2].events] == [("refused", 1)]


def test_a_certificate_of_another_ca_fails_the_handshake(star, tmp_path):
    _, made = star
    rogue = loopback_kit(tmp_path, name="rogue")  # the same names, another CA
    header = {"run": made[0].kit.run.hex(), "round": 0, "seq": 0, "numel": 6, "dtype": "float32"}
    for target in ("Mix", "Gather"):
        assert raw_push(rogue[1], made[0].kit.address(0), "agent-0", target, header, b"\0" * 24, timeout=2.0) \
            == grpc.StatusCode.UNAVAILABLE
    assert made[0].events == []  # nothing reached the agent's code


def test_a_server_holding_another_agents_valid_certificate_is_not_taken_for_the_neighbour(tmp_path):
    """Agent 1's server listens where agent 2 dials agent 0: the handshake names agent-1, not agent-0."""
    folders = loopback_kit(tmp_path)
    one = load_kit(folders[1])
    impostor = tls_peer.serve(dataclasses.replace(one, addresses={**one.addresses, 1: one.address(0)}), {}, 2)
    try:
        # control: asked for agent-1's identity at that address, the handshake succeeds (the method is unknown)
        assert raw_push(folders[2], one.address(0), "agent-1", "Mix", {}, b"") == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(ConfigError, match="neighbour agent 0 at 127.0.0.1"):
            TlsTransport(load_kit(folders[2]), fingerprint="same", timeout=2.0, startup_timeout=2.0)
    finally:
        impostor.stop(None)


def test_a_declared_size_other_than_the_expected_is_rejected_before_a_chunk_is_kept(star):
    folders, made = star
    base = {"run": made[1].kit.run.hex(), "round": 0, "seq": 0, "dtype": "float32"}
    results = {}

    def receive():
        told(made[1], 0, 0, 2)
        view = made[1].agree(0)
        results["got"] = made[1].send_and_receive(view, {0: torch.ones(6)})

    receiver = threading.Thread(target=receive)
    receiver.start()
    huge = raw_push(folders[0], made[1].kit.address(1), "agent-1", "Mix", {**base, "numel": 10**12}, b"")
    longer = raw_push(folders[0], made[1].kit.address(1), "agent-1", "Mix", {**base, "numel": 6}, b"\0" * 28)
    receiver.join()
    assert huge == longer == grpc.StatusCode.INVALID_ARGUMENT
    reasons = [e["reason"] for e in made[1].events if e["event"] == "rejected"]
    assert reasons[0].startswith("declared 1000000000000 x float32 instead of 6 x float32")
    assert reasons[1] == "more bytes than the 24 declared"
    assert results["got"] == {}


def grpc_over_tls(folder: str, address: str, target: str, version: ssl.TLSVersion, name: str) -> tuple[str, int]:
    """An empty unary call of `name` to `address` with the certificate of `folder`, over a TLS connection whose
    highest version is `version` (gRPC clients offer no such option: HTTP/2 by hand, with h2). Returns (the TLS
    version negotiated, the call's grpc-status)."""
    import h2.connection
    import h2.events

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(folder, "ca.pem"))
    context.load_cert_chain(os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem"))
    context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=target) as tls:
        connection = h2.connection.H2Connection()
        connection.initiate_connection()
        connection.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", target),
                                    (":path", tls_peer.method(name)), ("content-type", "application/grpc"),
                                    ("te", "trailers")])
        connection.send_data(1, b"\0\0\0\0\0", end_stream=True)  # one empty gRPC message
        tls.sendall(connection.data_to_send())
        while True:
            data = tls.recv(65536)
            assert data, "the server closed the connection without a status"
            for event in connection.receive_data(data):
                headers = getattr(event, "headers", None) or []
                status = dict((bytes(k), bytes(v)) for k, v in headers).get(b"grpc-status")
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and status:
                    return tls.version(), int(status)
            tls.sendall(connection.data_to_send())


def test_a_caller_over_tls_1_2_is_refused_before_any_message_is_read(star):
    """grpcio's Python API sets no minimum TLS version, so a client offering only TLS 1.2 completes the handshake;
    the agent then refuses its calls (the negotiated version is in the call's auth context). A TLS 1.3 call of
    the same agent's certificate is answered."""
    folders, made = star
    address = made[0].kit.address(0)
    assert grpc_over_tls(folders[1], address, "agent-0", ssl.TLSVersion.TLSv1_3, "Hello") \
        == ("TLSv1.3", grpc.StatusCode.OK.value[0])
    for name in ("Hello", "Mix", "Gather"):
        assert grpc_over_tls(folders[1], address, "agent-0", ssl.TLSVersion.TLSv1_2, name) \
            == ("TLSv1.2", grpc.StatusCode.PERMISSION_DENIED.value[0])


def start_in_background(transport: TlsTransport, rounds_done: int) -> Future:
    return ThreadPoolExecutor(1).submit(transport.start, rounds_done)


def test_an_agent_starting_up_joins_after_the_lowest_running_round(star):
    """Agent 1 (a keyed insider) answers Hello with a far later round; agent 2 runs round 4. Agent 0 joins after
    round 4, once both neighbours are in round 5."""
    _, made = star
    made[1].round_now, made[2].round_now = 10**6, 4
    joining = start_in_background(made[0], 0)
    with pytest.raises(TimeoutError):
        joining.result(timeout=1.0)  # agent 2 has not entered round 5 yet
    made[2].round_now = 5
    assert joining.result(timeout=10.0) == 5
    assert made[0].start(7) == 7  # its own checkpoint is newer: it keeps it
    made[2].round_now = -1  # the insider is the only running agent: it is believed (docs/security.md)
    assert made[0].start(0) == 10**6 + 1


def test_a_restarted_agent_enters_its_first_round_with_its_neighbours(star):
    """Agent 0 restarts from round 2 while its neighbours are in round 4: it continues with round 5, not before
    both have entered it, and its first exchange then meets theirs."""
    _, made = star
    for neighbour in made[1:]:
        neighbour.agree(4)
    joining = start_in_background(made[0], 2)
    made[1].agree(5)
    with pytest.raises(TimeoutError):
        joining.result(timeout=1.0)  # agent 2 is still in round 4
    made[2].agree(5)
    assert joining.result(timeout=10.0) == 5
    assert [e["round"] for e in made[0].events if e["event"] == "joining"] == [4]
    assert [sorted(received) for received in exchange(made, round_index=5)] == [[1, 2], [0], [0]]


def test_a_push_for_a_round_the_receiver_left_is_stale(star):
    _, made = star
    exchange(made, round_index=0)
    told(made[0], 1, 1, 2)
    made[0].agree(1)
    view = RoundView(0, {0: 1, 1: 1, 2: 1}, 0)
    assert made[1].send_and_receive(view, {0: torch.ones(6)}) == {}
    assert [(e["event"], e["reason"][:19]) for e in made[1].events if e["event"] == "transport"] \
        == [("transport", "FAILED_PRECONDITION")]


# ------------------------------------------------------------------------------------------- user loop


def averager_main(spec: dict) -> None:
    """One agent process of the user's loop (test_user_loop's), talking over TLS: no process group, no RANK, no
    store; the agent is the one its kit names. Agents 0 and 2 use DecentralizedAverager, agent 1
    DecentralizedCallback."""
    from decaf_ext.comm.kit import load_kit as read_kit
    from decaf_ext.integrations.averager import DecentralizedAverager
    from decaf_ext.integrations.hf_callback import DecentralizedCallback

    torch.set_num_threads(1)
    rank = read_kit(spec["kit"]).agent
    model, ids, mask, labels = tiny_agent(spec["model"], spec["data"], rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    options = dict(algorithm="decaf", topology="ring", period=PERIOD, round_timeout=30.0, kit=spec["kit"])
    if rank == 1:  # agent 1 is the Hugging Face user: the callback, called as the Trainer calls it
        callback = DecentralizedCallback(model, **options)
        averager = callback.averager

        def step():
            done = averager.stats.rounds
            callback.on_step_end(None, None, None, optimizer=optimizer)
            return averager.stats.last if averager.stats.rounds > done else None
    else:
        averager = DecentralizedAverager(model, optimizer=optimizer, **options)
        step = averager.step
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        batch = torch.randperm(len(labels), generator=generator)[:8]
        model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = snapshot(model)
        stats = step()
        if stats is not None:
            save_round(Path(spec["out"]), rank, stats, before, snapshot(model))
    averager.close()


def test_the_user_loop_averager_and_callback_mix_as_the_strategy_over_tls(tiny_paths, tmp_path):
    import subprocess

    folders = provision(3, free_addresses([f"127.0.0.{21 + k}" for k in range(3)]), str(tmp_path / "kit"),
                        topology="ring")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    environment = {k: v for k, v in environment.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    agents = [subprocess.Popen([sys.executable, __file__, json.dumps(
        {"kit": folder, "model": tiny_paths[0], "data": tiny_paths[1], "out": str(tmp_path / "out")})],
        env=environment) for folder in folders]
    assert [agent.wait(timeout=600) for agent in agents] == [0, 0, 0]
    seen = check_rounds(tmp_path / "out", "decaf", [0, 1, 2])  # every agent's new factors are the strategy's
    assert len(seen) == 3 * STEPS // PERIOD and all(s["mixed_with"][0] in (0, 1, 2) and len(s["mixed_with"]) == 3
                                                      for s in seen)


if __name__ == "__main__":
    averager_main(json.loads(sys.argv[1]))


# ------------------------------------------------------------------------------- review: resource attacks


@pytest.mark.parametrize("deadline", [None, 4.0])
def test_streams_that_never_end_hold_no_receiver_thread_past_a_round(star, deadline):
    """Agent 2 (a run agent, its own valid certificate) opens 20 evaluation pushes to agent 1 that send a header
    and then nothing, never ending (without a deadline, or with one inside the round timeout). Agent 1's pushes
    from its neighbour still arrive, and each hanging stream is ended by agent 1 within a round timeout."""
    folders, made = star
    kit = Path(folders[2])
    credentials = grpc.ssl_channel_credentials((kit / "ca.pem").read_bytes(), (kit / "key.pem").read_bytes(),
                                               (kit / "cert.pem").read_bytes())
    stop = threading.Event()
    header = json.dumps({"run": made[1].kit.run.hex(), "round": 0, "seq": 0, "numel": 6, "dtype": "float32"})

    def never_ending():
        yield header.encode()
        stop.wait()

    channel = grpc.secure_channel(made[1].kit.address(1), credentials,
                                  options=[("grpc.ssl_target_name_override", "agent-1")])
    try:
        call = channel.stream_unary(tls_peer.method("Gather"))
        hanging = [call.future(never_ending(), timeout=deadline) for _ in range(20)]
        got = exchange(made)
        assert torch.equal(got[1][0], torch.full((6,), 1.0)) and set(got[0]) == {1, 2}
        for future in hanging:
            assert future.exception(timeout=2 * made[1].timeout) is not None  # ended by the receiver or deadline
    finally:
        stop.set()
        channel.close()


def test_a_deeply_nested_header_is_a_rejection_not_an_exception(star):
    """A neighbour's header of 3000 nested lists (within the header limit) makes json raise RecursionError."""
    folders, made = star
    code = raw_push(folders[0], made[1].kit.address(1), "agent-1", "Mix", b"[" * 3000, b"")
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("answer", [b"[1]", b'"a string"', b"{\"run\": 1"])
def test_a_neighbour_answering_hello_with_no_state_is_one_line_naming_it(tmp_path, answer):
    """Agent 0 (the hub, its valid certificate) answers Hello with JSON that is not a state: agent 1 stops with
    one line naming it, not a traceback."""
    folders = loopback_kit(tmp_path)
    server = tls_peer.serve(load_kit(folders[0]), {"Hello": tls_peer.unary(lambda request, context: answer)}, 4)
    try:
        with pytest.raises(ConfigError, match="neighbour agent 0 at"):
            TlsTransport(load_kit(folders[1]), fingerprint="same", timeout=5.0, startup_timeout=5.0)
    finally:
        server.stop(None)


def test_a_neighbour_held_at_an_older_round_delays_a_rejoining_agent_by_at_most_the_startup_timeout(star):
    """Agents 1 and 2 stay in round 4 (agent 1 a keyed insider answering Hello with it forever): agent 0, continuing
    after round 4, stops waiting once its startup timeout has passed and goes on with round 5."""
    _, made = star
    for neighbour in made[1:]:
        neighbour.agree(4)
    made[0].startup_timeout = 2.0  # the fixture's is 20 s: waiting that long fails the result's timeout below
    joining = start_in_background(made[0], 2)
    assert joining.result(timeout=10.0) == 5
