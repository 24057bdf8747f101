"""decaf_ext.comm.codec and compressed messages: the int8 rule and its error bound, the codec's wire form and
byte counts, the checks on received int8 messages, the simulator's rule (own factors exact, the others as
decoded), bytes accounting and bad input. Simulator == distributed for compressed runs: test_distributed."""

from __future__ import annotations

import pytest
import torch

from decaf_ext.comm.codec import MAX_INT8_SCALE, MESSAGE_DTYPES, Codec, dequantize, quantize
from decaf_ext.errors import ConfigError
from decaf_ext.comm.transport import check_buffer, unfilled
from decaf_ext.lora import FactorGroup, collect_extras, collect_factors, write_factors
from decaf_ext.comm.guard import TAG_BYTES, MessageGuard, TagContext
from decaf_ext.comm.layout import MessageLayout
from decaf_ext.strategies import get_strategy
from decaf_ext.sim.trainer import Trainer
from test_distributed import random_agents, select
from test_trainer import tiny_config, tiny_paths  # noqa: F401 (fixture)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_int8_round_trip_is_within_half_a_scale(dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 5, generator=g) * torch.logspace(-4, 3, 5)  # rows of very different magnitudes
    x[1] = 0.0  # all-zero rows
    codes, scales = quantize(x, dim)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.shape[dim] == 1 and int(codes.abs().max()) == 127
    torch.testing.assert_close(scales, x.abs().amax(dim=dim, keepdim=True) / 127)
    error = (x - dequantize(codes, scales)).abs()
    assert bool((error <= scales / 2 * (1 + 1e-6)).all())
    assert bool((error.amax(dim=dim, keepdim=True) > 0).any())  # lossy, not a copy
    assert torch.equal(dequantize(codes, scales)[1], torch.zeros_like(x[1]))


def test_codec_wire_forms_and_bytes():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(2, 3, 7, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(4, generator=g),
               torch.randn((), generator=g)]
    shapes, dims = [tuple(t.shape) for t in tensors], [-1, -2, -1, -1]
    entries = 2 * 3 * 7 + 2 * 5 * 3 + 4 + 1
    rows = 2 * 3 + 2 * 3 + 1 + 1  # A: one per (module, rank direction), B: one per column, a vector, a scalar
    expected = {"float32": (torch.float32, 4 * entries), "bfloat16": (torch.bfloat16, 2 * entries),
                "int8": (torch.uint8, entries + 4 * rows)}
    for message_dtype in MESSAGE_DTYPES:
        codec = Codec(shapes, dims, torch.float32, message_dtype)
        wire = codec.encode(tensors)
        assert (wire.dtype, wire.numel() * wire.element_size()) == expected[message_dtype]
        assert codec.bytes == expected[message_dtype][1] and codec.lossless == (message_dtype == "float32")
        decoded = codec.decode(torch.stack([wire, wire]))
        for t, d, dim in zip(tensors, decoded, dims):
            t = t.reshape(d.shape[1:])
            assert d.shape[0] == 2 and d.dtype == torch.float32
            if message_dtype == "float32":
                assert torch.equal(d[1], t)
            elif message_dtype == "bfloat16":
                assert torch.equal(d[1], t.to(torch.bfloat16).float())
            else:
                assert torch.equal(d[1], dequantize(*quantize(t, dim)))


def test_received_int8_messages_are_checked():
    codec = Codec([(3, 4)], [-1], torch.float32, "int8")
    wire = codec.encode([torch.randn(3, 4)])
    assert codec.check(wire) is None and check_buffer(wire, codec.numel, torch.uint8) is None
    assert codec.check(torch.cat([torch.zeros(3, dtype=torch.uint8), wire])[3:]) is None  # a view at any offset
    nan_scale = codec.encode([torch.tensor([[1.0, float("nan"), 0, 0]] * 3)])
    assert "scales" in codec.check(nan_scale)
    negative = wire.clone()
    negative[-4:] = torch.tensor([-1.0]).view(torch.uint8)
    assert "scales" in codec.check(negative)
    bad_code = wire.clone()
    bad_code[0] = 128  # int8 -128
    assert "-128" in codec.check(bad_code)
    assert "scales" in codec.check(unfilled(wire))  # a receive buffer the transfer did not fill
    for scale in (3e38, float(torch.tensor(MAX_INT8_SCALE, dtype=torch.float32))):  # at the boundary too
        overflow = wire.clone()
        overflow[:12] = 127
        overflow[-12:] = torch.full((3,), scale).view(torch.uint8)
        assert not torch.isfinite(codec.decode(overflow[None])[0]).all()  # what it would decode to
        assert "decodes beyond float32" in codec.check(overflow)


def test_int8_messages_carry_a_message_tag():
    groups, extras = random_agents(2)
    own = select(groups, extras, [0])
    layout = MessageLayout(*own, trains_A=True, trailer=TAG_BYTES, message_dtype="int8")
    guard = MessageGuard(b"a run key of 16+ bytes")
    guard.bind(b"nonce")
    context = TagContext("mix", 2, 0, 0, 1, 1)
    sealed = guard.seal(layout.encode(layout.pack(*own)), context)
    assert sealed.dtype == torch.uint8 and sealed.shape == (layout.numel,)
    data, reason = guard.open(sealed, context)
    assert reason is None and layout.check(data) is None
    torch.testing.assert_close(layout.decode(data[None])[0], layout.received(layout.pack(*own)[None])[0])
    tampered = sealed.clone()
    tampered[0] ^= 1
    assert guard.open(tampered, context)[1] == "wrong message tag"


@pytest.mark.parametrize("trains_A", [True, False])
def test_layout_encodes_factors_with_one_scale_per_rank_direction(trains_A):
    groups, extras = random_agents(3)
    own = select(groups, extras, [1])
    layout = MessageLayout(*own, trains_A=trains_A, message_dtype="int8", trailer=32)
    entries = layout.data_numel
    rows = (2 * 3 + 1 * 3) * (2 if trains_A else 1) + 2 + 1  # A rows and B columns per module; head rows
    assert layout.message_bytes == entries + 4 * rows and layout.numel == layout.message_bytes + 32
    assert layout.wire_dtype == torch.uint8
    assert layout.fingerprint != MessageLayout(*own, trains_A=trains_A, trailer=32).fingerprint
    exact = layout.pack_each(groups, extras)
    assert torch.equal(exact[1], layout.pack(*own))
    received = layout.received(exact)
    unpacked, _ = layout.unpack(received, *own)
    for got, g in zip(unpacked, groups):
        A_scale = g.A.abs().amax(dim=-1, keepdim=True) / 127
        B_scale = g.B.abs().amax(dim=-2, keepdim=True) / 127
        assert bool(((got.B - g.B).abs() <= B_scale / 2 * (1 + 1e-6)).all())
        if trains_A:
            assert bool(((got.A - g.A).abs() <= A_scale / 2 * (1 + 1e-6)).all())


def test_bytes_sent_counts_the_encoded_message():
    groups, extras = random_agents(4)
    W = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(4):
        W[i, i], W[i, (i + 1) % 4], W[i, (i - 1) % 4] = 0.5, 0.25, 0.25
    assert get_strategy("dlora").bytes_sent(groups, extras, W, 100).tolist() == [200] * 4
    assert get_strategy("fedavg").bytes_sent(groups, extras, W, 100).tolist() == [100] * 4
    assert get_strategy("local").bytes_sent(groups, extras, W, 100).tolist() == [0] * 4


@pytest.mark.parametrize("algorithm", ["dlora", "fedavg"])
def test_simulator_mixes_own_factors_exact_and_the_others_as_decoded(tiny_paths, tmp_path, algorithm):
    trainer = Trainer(tiny_config(tiny_paths, tmp_path, algorithm=algorithm, message_dtype="int8"))
    g = torch.Generator().manual_seed(0)
    groups = [FactorGroup(x.names, torch.randn(x.A.shape, generator=g), torch.randn(x.B.shape, generator=g))
              for x in collect_factors(trainer.agents.models)]
    write_factors(trainer.agents.models, groups)
    extras = collect_extras(trainer.agents.models)
    W = trainer.agents.schedule.at(0).to(torch.float64)
    n = len(trainer.agents.models)
    if algorithm == "fedavg":
        W = torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def decoded(x: torch.Tensor, dim: int) -> torch.Tensor:  # every agent's x [M, N, ...] as its message decodes
        return dequantize(*quantize(x, dim))

    trainer.communicate(0)
    for before, after in zip(groups, collect_factors(trainer.agents.models)):
        for name, dim in (("A", -1), ("B", -2)):
            x = getattr(before, name).double()
            heard = decoded(getattr(before, name), dim).double()
            off = W - torch.diag(torch.diag(W))
            expected = (torch.einsum("ij,mj...->mi...", off, heard)
                        + torch.einsum("i,mi...->mi...", torch.diag(W), x))
            torch.testing.assert_close(getattr(after, name).double(), expected, rtol=1e-5, atol=1e-6)
    message = trainer.agents.layout.message_bytes
    rows = sum(g.A.shape[0] * g.rank * 2 for g in groups) + sum(x[0].reshape(-1, x.shape[-1]).shape[0]
                                                               for x in extras.values())
    assert message == trainer.agents.layout.data_numel + 4 * rows
    neighbours = ((W != 0) & ~torch.eye(n, dtype=torch.bool)).sum().item() if algorithm == "dlora" else n
    assert trainer.agents.counters["bytes_sent"] == neighbours * message


def test_unknown_message_dtype_is_one_line(tiny_paths, tmp_path):
    with pytest.raises(ConfigError, match=r"^message_dtype must be one of float32, bfloat16, int8; got 'int4'$"):
        tiny_config(tiny_paths, tmp_path, message_dtype="int4").validate()
