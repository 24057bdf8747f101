"""A run's TLS kit: one certificate authority per run and, per agent, a folder with its identity and the peers list.

``provision`` writes, under KIT/::

    ca/ca.key               the run CA's private key (mode 0600): keep it offline, or delete it
    agent_03/ca.pem         the run CA's certificate (every agent trusts only this CA)
    agent_03/cert.pem       agent 3's certificate: subject CN and SAN DNS name "agent-3", signed by the CA
    agent_03/key.pem        agent 3's private key (mode 0600)
    agent_03/peers.json     {"run": hex id, "self": 3, "topology": {...}, "peers": {"0": {"address": "h:p",
                            "neighbours": [1, 2]}, ...}}

Keys are ECDSA P-256, made and signed with ``cryptography`` (no hand-written crypto). :func:`load_kit` reads one
agent's folder back and checks it (files present, the key matches the certificate, the CA signed it and it is in
its validity period, the peers list agrees with the run's topology); every problem is one
:class:`~decaf_ext.errors.ConfigError` line naming the file.

Example::

    >>> provision(3, ["192.0.2.1:7000", "192.0.2.2:7000", "192.0.2.3:7000"], "kit", topology="ring")
    >>> kit = load_kit("kit/agent_01")
    >>> kit.agent, kit.neighbours, kit.address(2)
    (1, [0, 2], '192.0.2.3:7000')
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from decaf_ext.errors import ConfigError
from decaf_ext.storage.files import write_json

CA, CERT, KEY, PEERS = "ca.pem", "cert.pem", "key.pem", "peers.json"
NAME = re.compile(r"^agent-(\d+)$")


def agent_name(agent: int) -> str:
    """The identity of agent `agent` in its certificate (subject CN and SAN DNS name): ``agent-3``."""
    return f"agent-{agent}"


def agent_of(name: str) -> int | None:
    """The agent id named by a certificate identity ``agent-3`` (None for anything else)."""
    match = NAME.match(name)
    return int(match.group(1)) if match else None


def neighbours_of(adjacency) -> dict[int, list[int]]:
    """Bool adjacency [n, n] -> {agent: sorted neighbours}."""
    return {i: [j for j in range(len(adjacency)) if bool(adjacency[i][j]) and j != i] for i in range(len(adjacency))}


def topology_neighbours(topology: str, n: int, *, seed: int = 0, p: float | None = None,
                        path: str | None = None) -> dict[int, list[int]]:
    """Every agent's neighbours in `topology` on n agents (the union over a time-varying schedule's period)."""
    from decaf_ext.topology import build_graph

    try:
        return neighbours_of(build_graph(topology, n, seed=seed, p=p, path=path))
    except ValueError as error:
        raise ConfigError(f"topology: {str(error).splitlines()[0]}") from None


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_secret(path: str, data: bytes) -> None:
    """Write `data` to a new file `path` readable by its owner only (mode 0600 from its creation)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _certificate(subject: str, public_key, issuer: str, signer, *, days: float, ca: bool,
                 start: datetime.datetime) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                               x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def parse_hosts(hosts: str | Sequence[str], n: int) -> list[str]:
    """'h:p,h:p' (or a list) -> n addresses host:port; ConfigError naming hosts otherwise."""
    items = [h.strip() for h in (hosts.split(",") if isinstance(hosts, str) else hosts) if h.strip()]
    if len(items) != n:
        raise ConfigError(f"hosts: {len(items)} addresses for {n} agents (one host:port per agent)")
    for item in items:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"hosts: {item!r} is not host:port")
    if len(set(items)) != n:
        raise ConfigError("hosts: two agents share an address")
    return items


def provision(n: int, hosts: str | Sequence[str], out: str, *, topology: str = "ring", seed: int = 0,
              topology_p: float | None = None, topology_file: str | None = None, days: float = 365.0,
              start: datetime.datetime | None = None) -> list[str]:
    """Write a run's kit for `n` agents at `hosts` (module docstring) into the new folder `out`; returns the
    agent folders. The peers list gives each agent's neighbours in `topology` (seeded as the run's). `start`:
    the certificates' start of validity (default now), valid for `days`."""
    if n < 1:
        raise ConfigError(f"agents must be >= 1, got {n}")
    addresses = parse_hosts(hosts, n)
    neighbours = topology_neighbours(topology, n, seed=seed, p=topology_p, path=topology_file)
    if os.path.exists(out):
        raise ConfigError(f"out: {out!r} exists already (a kit is written into a new folder)")
    start = start or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = f"decaf run CA {os.urandom(4).hex()}"
    ca_cert = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, days=days, ca=True, start=start)
    run = os.urandom(16).hex()
    peers = {str(i): {"address": addresses[i], "neighbours": neighbours[i]} for i in range(n)}
    described = {"name": topology, "seed": seed, "p": topology_p,
                 "file": None if topology_file is None else os.path.basename(topology_file)}
    temporary = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.join(temporary, "ca"))
        _write_secret(os.path.join(temporary, "ca", "ca.key"), _pem(ca_key))
        for i in range(n):
            folder = os.path.join(temporary, f"agent_{i:02d}")
            os.makedirs(folder)
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate(agent_name(i), key.public_key(), ca_name, ca_key, days=days, ca=False, start=start)
            _write_secret(os.path.join(folder, KEY), _pem(key))
            for name, value in ((CA, ca_cert), (CERT, cert)):
                with open(os.path.join(folder, name), "wb") as handle:
                    handle.write(value.public_bytes(serialization.Encoding.PEM))
            write_json(os.path.join(folder, PEERS), {"run": run, "self": i, "topology": described, "peers": peers})
        os.rename(temporary, out)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise ConfigError(f"out: cannot write the kit into {out!r} ({error.strerror})") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return [os.path.join(out, f"agent_{i:02d}") for i in range(n)]


@dataclass(frozen=True)
class Kit:
    """One agent's kit, loaded and checked: its id, PEM bytes (ca, cert, key), the run id (16 bytes), every
    agent's address and this agent's neighbours in the run's topology."""

    folder: str
    agent: int
    ca: bytes
    cert: bytes
    key: bytes
    run: bytes
    addresses: dict[int, str]
    neighbours: list[int]
    all_neighbours: dict[int, list[int]]

    @property
    def n_agents(self) -> int:
        return len(self.addresses)

    def address(self, agent: int) -> str:
        return self.addresses[agent]


def _read(folder: str, name: str) -> bytes:
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"kit: cannot read {path!r} ({error.strerror})") from None


def _peers(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, PEERS)
    try:
        value = json.loads(_read(folder, PEERS))
        peers = {int(k): (str(v["address"]), [int(j) for j in v["neighbours"]]) for k, v in value["peers"].items()}
        run = bytes.fromhex(value["run"])
        own = int(value["self"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"kit: {path!r} is not a peers list ({type(error).__name__}: {error})") from None
    if sorted(peers) != list(range(len(peers))) or own not in peers or len(run) != 16:
        raise ConfigError(f"kit: {path!r} must list agents 0..N-1, this agent among them, and a 16-byte run id")
    return {"peers": peers, "run": run, "self": own}


def load_kit(folder: str | None, *, now: datetime.datetime | None = None) -> Kit:
    """Agent kit folder `folder`, checked (module docstring); ConfigError naming the file at fault."""
    if not folder:
        raise ConfigError("kit: --transport tls needs --kit FOLDER (one agent's folder made by decaf-train "
                          "provision)")
    if not os.path.isdir(folder):
        raise ConfigError(f"kit: {folder!r} is not a folder")
    peers = _peers(folder)
    ca_pem, cert_pem, key_pem = (_read(folder, name) for name in (CA, CERT, KEY))
    try:
        ca, cert = x509.load_pem_x509_certificate(ca_pem), x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"kit: {os.path.join(folder, CA)!r} or {os.path.join(folder, CERT)!r} is not a PEM "
                          "certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"kit: {os.path.join(folder, KEY)!r} is not an unencrypted PEM private key") from None
    cert_path = os.path.join(folder, CERT)
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"kit: {os.path.join(folder, KEY)!r} is not the key of {cert_path!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise ConfigError(f"kit: {cert_path!r} is not signed by {os.path.join(folder, CA)!r} "
                          f"({type(error).__name__})") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    for path, certificate in ((cert_path, cert), (os.path.join(folder, CA), ca)):
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise ConfigError(f"kit: {path!r} is not valid now (valid from "
                              f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                              f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if names != [agent_name(peers["self"])]:
        raise ConfigError(f"kit: {cert_path!r} names {names} but {os.path.join(folder, PEERS)!r} says this is "
                          f"agent {peers['self']} ({agent_name(peers['self'])})")
    listed = peers["peers"]
    return Kit(folder, peers["self"], ca_pem, cert_pem, key_pem, peers["run"],
               {i: address for i, (address, _) in listed.items()}, listed[peers["self"]][1],
               {i: sorted(n) for i, (_, n) in listed.items()})


def schedule_neighbours(matrices) -> dict[int, list[int]]:
    """Every agent's neighbours under mixing matrices W [n, n] (any round of a schedule: W[i, j] > 0, j != i)."""
    return neighbours_of([[any(float(W[i][j]) > 0 for W in matrices) for j in range(len(matrices[0]))]
                          for i in range(len(matrices[0]))])


def check_neighbours(kit: Kit, expected: dict[int, list[int]], source: str) -> None:
    """ConfigError naming the kit's peers list unless it lists the agents of `expected` ({agent: neighbours},
    from `source`) with those neighbours."""
    peers_path = os.path.join(kit.folder, PEERS)
    if kit.n_agents != len(expected):
        raise ConfigError(f"kit: {peers_path!r} lists {kit.n_agents} agents but the run has {len(expected)}")
    for agent, listed in kit.all_neighbours.items():
        if listed != expected[agent]:
            raise ConfigError(f"kit: {peers_path!r} gives agent {agent} the neighbours {listed} but {source} "
                              f"gives {expected[agent]}")


def check_topology(kit: Kit, n_agents: int, topology: str, *, seed: int = 0, p: float | None = None,
                   path: str | None = None) -> None:
    """ConfigError naming the kit's peers list unless it lists `n_agents` agents with the neighbours `topology`
    gives them."""
    if kit.n_agents != n_agents:
        raise ConfigError(f"kit: {os.path.join(kit.folder, PEERS)!r} lists {kit.n_agents} agents but the run has "
                          f"{n_agents}")
    check_neighbours(kit, topology_neighbours(topology, n_agents, seed=seed, p=p, path=path), f"topology {topology!r}")


def load_checked_kit(config) -> Kit:
    """The kit of a run's configuration (a TrainConfig with transport "tls"), loaded and checked against the
    run's agents and topology; ConfigError naming the file at fault."""
    kit = load_kit(config.kit)
    check_topology(kit, config.agents, config.topology, seed=config.seed, p=config.topology_p,
                   path=config.topology_file)
    return kit
