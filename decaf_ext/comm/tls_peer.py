"""The gRPC plumbing of the mutual-TLS transport: one agent's server and its channels to the others, the peer's
identity from its certificate, and the wire form of one message (a JSON header, then raw chunks).

Every connection is mutual TLS against the run's CA only (``grpc.ssl_server_credentials(...,
require_client_auth=True)``, ``grpc.ssl_channel_credentials(ca, key, cert)``). The client checks that the server
it reached holds the certificate of the agent it dialled (``grpc.ssl_target_name_override`` = that agent's SAN
``agent-j``); the server reads the caller's SAN from ``context.auth_context()``. Methods are generic handlers on
bytes (no protobuf): ``Hello`` (unary: the callee's state), ``Mix`` and ``Gather`` (client streaming: header,
then chunks of at most :data:`CHUNK` bytes).

Example::

    >>> server = serve(kit, {"Hello": unary(hello)}, workers=8)    # listening on kit.address(kit.agent)
    >>> call = channel_to(kit, 2).stream_unary(method("Mix"))      # push to agent 2
    >>> call(messages(header, tensor), timeout=5.0, wait_for_ready=True)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import grpc
import torch

from decaf_ext.comm.kit import Kit, agent_name, agent_of

SERVICE = "decaf.Peer"
CHUNK = 1 << 20  # bytes per streamed chunk
TLS_VERSION = b"TLSv1.3"  # the only version whose callers are served
HEADER_LIMIT = 4096  # bytes of a message's header
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in
          (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8)}
_COMMON = [("grpc.max_receive_message_length", CHUNK + HEADER_LIMIT),
           ("grpc.max_send_message_length", CHUNK + HEADER_LIMIT),
           ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]
SERVER_OPTIONS = [*_COMMON, ("grpc.so_reuseport", 0),  # a second process cannot silently share the port
                  ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                  ("grpc.keepalive_permit_without_calls", 1)]
# a restarted neighbour is dialled again within about a second (gRPC's default backoff grows to 120 s)
CLIENT_OPTIONS = [*_COMMON, ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                  ("grpc.max_reconnect_backoff_ms", 1000)]


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def caller(context: grpc.ServicerContext) -> int | None:
    """The agent id in the caller's certificate (its one SAN ``agent-j``), or None (no or another identity, or a
    connection below TLS 1.3: grpcio's Python API sets no minimum version, so the handshake may have settled on
    TLS 1.2). The TLS handshake has already checked the certificate against the run's CA."""
    auth = context.auth_context()
    if auth.get("ssl_tls_version") != [TLS_VERSION]:
        return None
    names = auth.get("x509_subject_alternative_name", [])
    ids = {agent_of(name.decode(errors="replace")) for name in names}
    return ids.pop() if len(ids) == 1 and None not in ids else None


def caller_name(sender: int | None) -> str:
    """How logs and refusals name a caller: :func:`caller`'s agent id, or None."""
    return "a caller without an agent identity over TLS 1.3" if sender is None else f"agent {sender}"


def serve(kit: Kit, handlers: dict[str, grpc.RpcMethodHandler], workers: int) -> grpc.Server:
    """A started server of this agent on its address in the peers list, mutual TLS against the run's CA."""
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS,
                         maximum_concurrent_rpcs=workers)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    credentials = grpc.ssl_server_credentials([(kit.key, kit.cert)], root_certificates=kit.ca,
                                              require_client_auth=True)
    address = kit.address(kit.agent)
    try:
        port, reason = server.add_secure_port(address, credentials), "address in use or not this host's"
    except RuntimeError as error:
        port, reason = 0, str(error).splitlines()[0] if str(error) else "refused"
    if port == 0:
        server.stop(None)
        raise OSError(f"cannot listen on {address} ({reason})")
    server.start()
    return server


def channel_to(kit: Kit, agent: int) -> grpc.Channel:
    """A channel to `agent` that only completes its handshake with a server holding agent-`agent`'s certificate."""
    credentials = grpc.ssl_channel_credentials(root_certificates=kit.ca, private_key=kit.key,
                                               certificate_chain=kit.cert)
    return grpc.secure_channel(kit.address(agent), credentials,
                               options=[*CLIENT_OPTIONS, ("grpc.ssl_target_name_override", agent_name(agent))])


def unary(function: Callable[[bytes, grpc.ServicerContext], bytes]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(function)


def streaming(function: Callable[[Iterator[bytes], grpc.ServicerContext], bytes]) -> grpc.RpcMethodHandler:
    return grpc.stream_unary_rpc_method_handler(function)


def encode(tensor: torch.Tensor) -> memoryview:
    """A 1-D tensor's bytes (any of :data:`DTYPES`) as a view of its memory: no copy for a contiguous CPU tensor."""
    return memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())


def messages(header: dict[str, Any], tensor: torch.Tensor) -> Iterator[bytes]:
    """What a push streams: the JSON header (with the tensor's numel and dtype added), then its bytes in chunks of
    at most :data:`CHUNK` bytes, each copied out of the tensor's memory only when gRPC asks for it (the sender
    holds the tensor plus the chunks gRPC has not sent yet, never a second copy of the message)."""
    data = encode(tensor)
    yield json.dumps({**header, "numel": tensor.numel(), "dtype": str(tensor.dtype).removeprefix("torch.")}).encode()
    for start in range(0, len(data), CHUNK):
        yield data[start:start + CHUNK].tobytes()


def parse_header(data: bytes | None) -> dict[str, Any]:
    """A pushed message's header {run, round, seq, numel, dtype}; ValueError if it is not one."""
    if data is None or len(data) > HEADER_LIMIT:
        raise ValueError("no header, or one longer than the header limit")
    try:
        header = json.loads(data)
    except RecursionError:  # nesting deeper than the interpreter's limit, within HEADER_LIMIT bytes
        raise ValueError("a header nested too deeply") from None
    if not isinstance(header, dict) or not isinstance(header.get("run"), str) or header.get("dtype") not in DTYPES:
        raise ValueError("not a header {run, round, seq, numel, dtype}")
    for name in ("round", "seq", "numel"):
        if type(header.get(name)) is not int:
            raise ValueError(f"header field {name} is not an integer")
    if header["numel"] < 0:
        raise ValueError("negative numel")
    return header


def receive(requests: Iterator[bytes], numel: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, str]:
    """Read the chunks of a message declared (and checked) as `numel` elements of `dtype` into one buffer of exactly
    that size, chunk by chunk as they arrive: (tensor [numel] over that very buffer, no copy, "") or (None, why:
    more or fewer bytes than declared). The receiver holds the buffer plus the chunk in hand."""
    buffer = bytearray(numel * torch.empty(0, dtype=dtype).element_size())
    filled = 0
    for chunk in requests:
        if filled + len(chunk) > len(buffer):
            return None, f"more bytes than the {len(buffer)} declared"
        buffer[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled != len(buffer):
        return None, f"{filled} bytes instead of the {len(buffer)} declared"
    if not buffer:
        return torch.empty(0, dtype=dtype), ""
    return torch.frombuffer(buffer, dtype=dtype), ""
