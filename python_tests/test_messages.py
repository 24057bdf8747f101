"""Messages of any size: the mutual-TLS transport streams a message in chunks read out of the tensor's memory and
writes them into one destination buffer that it returns without a copy; gloo moves it in pieces of bounded size
written in place; a received buffer is checked without a temporary. Chunks and pieces are made small here so a
message of a few KB crosses three of them; the 1 GB message over both transports is the slow test at the end
(and bench/messages.py).
"""

from __future__ import annotations

import os
import sys
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist

from decaf_ext.comm import tls_peer
from decaf_ext.comm import transport as gloo_transport
from decaf_ext.comm.transport import Transport, check_buffer, pieces
from test_tls_transport import loopback_kit, told, transports

NUMEL = 700  # float32 values: 2,800 bytes, three chunks or pieces of 1,000 bytes
SMALL = 1000  # bytes per chunk or piece in these tests


def message(numel: int = NUMEL, seed: int = 0) -> torch.Tensor:
    """Random float32 values with the awkward ones in it (-0.0, the smallest subnormal, the largest float)."""
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    values[:3] = torch.tensor([-0.0, 1e-45, 3.4028235e38])
    return values


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ------------------------------------------------------------------------------------------- TLS, one end


def test_the_tls_sender_streams_chunks_read_out_of_the_tensor_as_grpc_asks(monkeypatch):
    monkeypatch.setattr(tls_peer, "CHUNK", SMALL)
    tensor = message()
    stream = tls_peer.messages({"run": "r", "round": 0, "seq": 0}, tensor)
    header = tls_peer.parse_header(next(stream))
    first = next(stream)
    tensor[-1] = 7.0  # a chunk not yet sent is read from the tensor itself when its turn comes: no snapshot
    chunks = [first, *stream]
    assert (header["numel"], header["dtype"]) == (NUMEL, "float32")
    assert [len(c) for c in chunks] == [SMALL, SMALL, NUMEL * 4 - 2 * SMALL]
    assert same_bits(torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.float32), tensor)


def test_the_tls_sender_never_holds_a_copy_of_the_whole_message(monkeypatch):
    """bytes objects are Python allocations, seen by tracemalloc; the tensor's own memory is not."""
    monkeypatch.setattr(tls_peer, "CHUNK", 64 << 10)
    tensor = torch.ones(2 << 20)  # 8 MiB
    tracemalloc.start()
    try:
        sent = sum(len(chunk) for chunk in tls_peer.messages({"run": "r", "round": 0, "seq": 0}, tensor))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent > tensor.numel() * 4 and peak < 4 * tls_peer.CHUNK


def test_the_tls_receiver_returns_the_one_buffer_it_filled():
    """While the received tensor lives, the buffer the chunks were written into lives (it is that buffer), and
    nothing else the size of the message was allocated on the way."""
    tensor = torch.rand(2 << 20)  # 8 MiB
    chunks = list(tls_peer.messages({"run": "r", "round": 0, "seq": 0}, tensor))[1:]
    size = tensor.numel() * 4
    tracemalloc.start()
    try:
        received, reason = tls_peer.receive(iter(chunks), tensor.numel(), torch.float32)
        current, peak = tracemalloc.get_traced_memory()
        del received
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert reason == "" and current - after >= size and peak < size + 4 * tls_peer.CHUNK
    again, _ = tls_peer.receive(iter(chunks), tensor.numel(), torch.float32)
    assert same_bits(again, tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_the_tls_receiver_takes_exactly_the_declared_bytes_in_any_chunking(dtype):
    tensor = (message() * 50).to(dtype)
    data = bytes(tls_peer.encode(tensor))
    size = len(data)
    for cuts in ([], [1], [size // 3, 2 * size // 3], [0, size // 2]):  # where one chunk ends and the next begins
        chunks = [data[start:end] for start, end in zip([0, *cuts], [*cuts, size])]
        received, reason = tls_peer.receive(iter(chunks), NUMEL, dtype)
        assert reason == "" and same_bits(received, tensor)
    assert tls_peer.receive(iter([data, b"\0"]), NUMEL, dtype) == (None, f"more bytes than the {len(data)} declared")
    assert tls_peer.receive(iter([data[:-1]]), NUMEL, dtype)[1] == f"{len(data) - 1} bytes instead of the " \
                                                                   f"{len(data)} declared"


# -------------------------------------------------------------------------------------- TLS, two agents


def test_two_tls_agents_exchange_chunked_messages_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(tls_peer, "CHUNK", SMALL)
    made = transports(loopback_kit(tmp_path, n=2, topology="ring"), timeout=5.0)
    outgoing = [message(NUMEL, seed=1), message(260, seed=2)]  # three chunks one way, two the other
    sizes = [260, NUMEL]

    def one(k):
        return made[k].send_and_receive(made[k].agree(0), {1 - k: outgoing[k]}, sizes={1 - k: sizes[k]})

    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(one, range(2)))
    finally:
        for transport in made:
            transport.close()
    assert same_bits(got[1][0], outgoing[0]) and same_bits(got[0][1], outgoing[1])


def push(sender, receiver: int, stream: list[bytes]) -> str:
    """Push `stream` (header, chunks) from `sender` to agent `receiver` as a Mix message; the status code's name."""
    call = sender._channels[receiver].stream_unary(tls_peer.method("Mix"))
    try:
        call(iter(stream), timeout=2.0)  # within the receiver's round timeout
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def test_a_chunked_tls_message_arrives_bit_for_bit_and_one_chunk_more_or_less_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(tls_peer, "CHUNK", SMALL)
    made = transports(loopback_kit(tmp_path, n=2, topology="ring"), timeout=3.0)
    try:
        sent, results = message(), {}

        def receive():
            told(made[1], 0, 0)  # agent 0 is driven by hand here: what its Ready of round 0 does
            view = made[1].agree(0)
            results["got"] = made[1].send_and_receive(view, {0: torch.ones(NUMEL)})

        receiver = threading.Thread(target=receive)
        receiver.start()
        stream = list(tls_peer.messages({"run": made[0].kit.run.hex(), "round": 0, "seq": 0}, sent))
        assert len(stream) == 1 + 3
        codes = [push(made[0], 1, stream + [stream[1]]), push(made[0], 1, stream[:-1]), push(made[0], 1, stream)]
        receiver.join()
    finally:
        for transport in made:
            transport.close()
    assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "OK"]
    reasons = [e["reason"] for e in made[1].events if e["event"] == "rejected"]
    assert reasons == ["more bytes than the 2800 declared", "2000 bytes instead of the 2800 declared"]
    assert list(results["got"]) == [0] and same_bits(results["got"][0], sent)


# -------------------------------------------------------------------------------------------------- gloo


def gloo_pair(timeout: float = 3.0) -> list[Transport]:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.HashStore()
    made = [Transport(store, j, 2, fingerprint="same", backend="gloo", timeout=timeout, startup_timeout=10.0)
            for j in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda t: t.start(0), made))
    return made


def gloo_exchange(made: list[Transport], outgoing: list[torch.Tensor], sizes: list[int]) -> list[dict]:
    """Agent k sends outgoing[k] to the other and expects sizes[k] values back."""
    def one(k):
        view = made[k].agree(0)
        assert made[k].connect(view)
        return made[k].send_and_receive(view, {1 - k: outgoing[k]}, sizes={1 - k: sizes[k]})

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, range(2)))


def test_pieces_are_views_of_at_most_the_piece_size_covering_the_buffer(monkeypatch):
    monkeypatch.setattr(gloo_transport, "PIECE_BYTES", SMALL)
    buffer = message()
    parts = pieces(buffer)
    assert [p.numel() for p in parts] == [250, 250, 200]
    assert all(p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for p in parts)
    assert torch.equal(torch.cat(parts), buffer)
    assert sum(p.numel() for p in pieces(torch.empty(0))) == 0


def test_a_gloo_message_in_pieces_arrives_bit_for_bit_in_both_directions(monkeypatch):
    monkeypatch.setattr(gloo_transport, "PIECE_BYTES", SMALL)
    outgoing = [message(NUMEL, seed=1), message(260, seed=2)]  # three pieces one way, two the other
    got = gloo_exchange(gloo_pair(), outgoing, sizes=[260, NUMEL])
    assert same_bits(got[1][0], outgoing[0]) and same_bits(got[0][1], outgoing[1])


def test_a_gloo_message_a_piece_short_or_a_piece_long_is_not_taken_whole(monkeypatch):
    """One piece fewer than expected: the receiver's last piece never arrives, the transfer fails within the round
    timeout and the message is not taken. A shorter last piece leaves NaN (the unfilled receive buffer): rejected.
    One whole piece more: the receiver takes exactly the values it expects, nothing past its buffer, and the
    sender's extra piece fails at the timeout (logged). (A longer piece than the receiver posted aborts the
    receiving process, gloo's own check, as a longer message did before pieces.)"""
    monkeypatch.setattr(gloo_transport, "PIECE_BYTES", SMALL)
    sent = message()
    made = gloo_pair(timeout=1.5)
    got = gloo_exchange(made, [sent[:500], torch.ones(4)], sizes=[4, NUMEL])  # 2 pieces of 3
    assert got[1] == {} and [e["event"] for e in made[1].events] == ["transport"]
    made = gloo_pair(timeout=1.5)
    got = gloo_exchange(made, [sent[:650], torch.ones(4)], sizes=[4, NUMEL])  # the last piece 50 values short
    assert got[1] == {} and [e["reason"] for e in made[1].events if e["event"] == "rejected"] == ["NaN or Inf values"]
    made = gloo_pair(timeout=1.5)
    whole = message(750)  # three whole pieces, then a fourth the receiver does not expect
    got = gloo_exchange(made, [torch.cat([whole, message(250, seed=3)]), torch.ones(4)], sizes=[4, 750])
    assert same_bits(got[1][0], whole)
    assert [e["event"] for e in made[0].events] == ["transport"] and made[1].events == []


# --------------------------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_a_non_finite_value_anywhere_in_a_long_buffer_is_found(dtype):
    """check_buffer reads finiteness from the smallest and largest value, with no temporary per element."""
    buffer = torch.randn(100_003, generator=torch.Generator().manual_seed(0)).to(dtype)
    info = torch.finfo(dtype)  # large finite values are sound (their sum would overflow)
    buffer[:4] = torch.tensor([info.max, info.max, info.min, info.tiny], dtype=dtype)
    assert check_buffer(buffer, buffer.numel(), dtype) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 1, 4_097, 65_536, buffer.numel() - 1):
            spoiled = buffer.clone()
            spoiled[where] = bad
            assert check_buffer(spoiled, buffer.numel(), dtype) == "NaN or Inf values", (bad, where)
    assert check_buffer(torch.empty(0, dtype=dtype), 0, dtype) is None
    assert check_buffer(torch.full((9,), 255, dtype=torch.uint8), 9, torch.uint8) is None


# ------------------------------------------------------------------------------------------- 1 GB, slow


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gloo", "tls"])
def test_a_one_gigabyte_message_passes_holding_the_sender_tensor_and_the_destination_only(name, tmp_path):
    """bench/messages.py's measurement: two agents in this process, so the floor is 2.0 message sizes (the
    sender's tensor and the receiver's destination); a second copy at either end would make it 3.0."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from messages import one_way
        from transport import gloo_agents, tls_agents
    finally:
        sys.path.pop(0)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    numel = 1 << 28  # 1 GiB of float32
    agents = gloo_agents(2, 300.0) if name == "gloo" else tls_agents(2, 300.0, str(tmp_path))
    seconds, peak, method = one_way(agents, numel)  # AssertionError unless the message arrived bit for bit
    assert peak / (numel * 4) < 2.5, f"peak {peak / (numel * 4):.2f} message sizes ({method})"


# ------------------------------------------------------------------------------------------- a whole round


@pytest.mark.parametrize("algorithm", ["decaf", "dlora"])
def test_a_round_holds_few_copies_of_a_message(algorithm):
    """bench/messages.py --round: two agents (threads) each sending a 64 MB message with a run key. Per agent a
    round needs its own packed data and each received message decoded in place (the strategy's rows), its sealed
    message and the received buffer, and the strategy's inputs: about 5 messages; 6 per agent is the bound (an
    HMAC over a copy of the message, or float64 copies of whole factors for the norm checks, go beyond it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from messages import one_round
    finally:
        sys.path.pop(0)
    _, size, peak, method = one_round(algorithm, 64, 120.0)
    assert peak / size < 12, f"peak {peak / size:.2f} message sizes for the two agents ({method})"
