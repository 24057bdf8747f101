"""Attacks on the messages, each through the real receive path (python_tests/attacker.py: agents as threads with
real transports, gloo pairs and guards; the attacker sends crafted bytes): what a receiver must reject, and
that it keeps its own model and goes on with the others."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from attacker import KEY, Ring, agents, finite
from decaf_ext.comm.codec import MAX_INT8_SCALE
from decaf_ext.lora import product_norm, select_agent

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overflowing_int8(comm, round_index, data, seal):
    """A keyed insider's int8 message whose scales (3e38) decode code 127 to +Inf, correctly tagged."""
    wire = comm.layout.encode(data, comm.transport.agent).clone()
    codec = comm.layout.codec
    codes = sum(codec.sizes)
    wire[:codes] = 127
    wire[codes:] = torch.full(((len(wire) - codes) // 4,), 3e38, dtype=torch.float32).view(torch.uint8)
    return seal(data, wire=wire)


@pytest.mark.parametrize("algorithm", ["dlora", "decaf"])
def test_int8_scales_that_decode_to_inf_are_rejected(algorithm):
    assert 3e38 > MAX_INT8_SCALE
    ring = Ring(4, algorithm=algorithm, attackers={0: overflowing_int8}, message_dtype="int8", norm_bound=10.0)
    ring.round()
    for victim in (1, 3):
        assert [e["agent"] for e in ring.rejected(victim)] == [0]
        assert "int8 scale" in ring.rejected(victim)[0]["reason"]
    assert finite(ring.norms()) and all(torch.isfinite(g.A).all() and torch.isfinite(g.B).all() for g in ring.groups)
    ring.close()


def huge_head(comm, round_index, data, seal):
    """A keyed insider whose factors are its own but whose head (an extra) is x 1e30."""
    n_factors = sum(comm.layout.sizes[:comm.layout.n_factors])
    crafted = data.clone()
    crafted[n_factors:] *= 1e30
    return seal(crafted)


def test_extras_are_bounded_by_the_norm_cap():
    ring = Ring(4, algorithm="dlora", attackers={0: huge_head}, norm_cap=1e3)
    heads_before = ring.extras["head.weight"].abs().max()
    ring.round()
    assert [e["agent"] for e in ring.rejected(1)] == [0] and "extra head.weight" in ring.rejected(1)[0]["reason"]
    assert ring.extras["head.weight"][1:].abs().max() <= heads_before
    ring.close()


def creeping(bound):
    """A keyed insider that always sends 0.99 x the largest product norm the relative bound lets through."""

    def craft(comm, round_index, data, seal):
        groups, extras = comm.layout.unpack(data[None], *ROUND_SHAPES[comm.transport.agent])
        norm = float(product_norm(groups)[0])
        target = 0.99 * bound * CREEP_REFERENCE[0]
        factor = math.sqrt(target / norm) if norm > 0 else 1.0
        return seal(data * factor)  # A and B x sqrt(factor): the product x factor

    return craft


ROUND_SHAPES: dict[int, tuple] = {}
CREEP_REFERENCE = [1.0]


@pytest.mark.parametrize("cap", [None, 30.0])
def test_a_keyed_insider_inside_the_relative_bound_is_held_by_the_cap(cap):
    """Measured with the bound alone: the honest agents' norms grow geometrically (what the docs state); with an
    absolute cap, no honest product norm ever exceeds max(its start, cap)."""
    factors = agents(6, scale=0.5)
    for i in range(6):
        ROUND_SHAPES[i] = select_agent(*factors, i)
    ring = Ring(6, algorithm="decaf", attackers={0: creeping(10.0)}, factors=factors, norm_bound=10.0, norm_cap=cap)
    start = max(ring.norms()[1:])
    for _ in range(12):
        CREEP_REFERENCE[0] = sorted(ring.norms())[len(ring.norms()) // 2]
        ring.round()
    honest = max(ring.norms()[1:])
    if cap is None:
        assert honest > 20 * start  # the creep the relative bound alone allows
    else:
        assert honest <= max(start, cap) * (1 + 1e-5)
    ring.close()


def recorder(log: list):
    def craft(comm, round_index, data, seal):
        buffer = seal(data)
        log.append(buffer.clone())
        return buffer
    return craft


def replayer(log: list):
    def craft(comm, round_index, data, seal):
        return log[min(round_index, len(log) - 1)]
    return craft


def test_messages_recorded_in_another_run_are_rejected():
    recorded: list[torch.Tensor] = []
    first = Ring(4, algorithm="dlora", attackers={0: recorder(recorded)})
    first.round()
    first.close()
    second = Ring(4, algorithm="dlora", attackers={0: replayer(recorded)})  # same key, a new launch
    second.round()
    assert [e["agent"] for e in second.rejected(1)] == [0] and second.rejected(1)[0]["reason"] == "wrong message tag"
    second.close()


def test_messages_replayed_in_a_later_round_or_to_another_receiver_are_rejected():
    recorded: list[torch.Tensor] = []
    ring = Ring(4, algorithm="dlora", attackers={0: recorder(recorded)})
    ring.round()  # round 0: agent 0 sends to 1, then to 3 (its two buffers differ: receiver-bound)
    assert len(recorded) == 2 and not torch.equal(recorded[0], recorded[1])
    ring.comms[0].hooks.craft = lambda comm, round_index, data, seal: recorded.pop(0)
    ring.round()  # round 1: agent 0 replays round 0's buffers, each to the other receiver
    for victim in (1, 3):
        assert [e["reason"] for e in ring.rejected(victim)] == ["wrong message tag"]
    ring.close()


def test_an_outsider_without_the_key_cannot_inject():
    ring = Ring(4, algorithm="dlora", attackers={0: lambda comm, r, data, seal: torch.cat(
        [comm.layout.encode(data * 100, 0), torch.zeros(32)])})
    before = select_agent(ring.groups, ring.extras, 1)
    ring.round()
    assert [e["reason"] for e in ring.rejected(1)] == ["wrong message tag"]
    assert not torch.equal(select_agent(ring.groups, ring.extras, 1)[0][0].B, before[0][0].B)  # mixed with 2
    ring.close()


def test_nan_in_a_tagged_message_is_rejected_and_the_receiver_goes_on():
    ring = Ring(4, algorithm="decaf", attackers={0: lambda comm, r, data, seal: seal(data * float("nan"))})
    ring.round()
    ring.round()
    assert [e["agent"] for e in ring.rejected(1)] == [0, 0] and finite(ring.norms())
    ring.close()


def test_a_store_shared_by_two_runs_gives_each_its_own_nonce():
    store = dist.HashStore()
    first = Ring(2, algorithm="dlora", store=dist.PrefixStore("a", store))
    second = Ring(2, algorithm="dlora", store=dist.PrefixStore("b", store))
    assert len(first.comms[0].transport.nonce) == 16
    assert first.comms[0].transport.nonce == first.comms[1].transport.nonce != second.comms[0].transport.nonce
    first.close()
    second.close()
