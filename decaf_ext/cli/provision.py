"""``decaf-train provision``: the TLS kit of a run across sites (see docs/deploy.md and :mod:`decaf_ext.comm.kit`).

    decaf-train provision --agents 3 --hosts a.example:7000,b.example:7000,c.example:7000 --out kit

Example::

    >>> provision_command(["--agents", "3", "--hosts", "192.0.2.1:7000,192.0.2.2:7000,192.0.2.3:7000",
    ...                    "--out", "kit"])
    0
"""

from __future__ import annotations

from typing import Sequence

from decaf_ext.cli.parser import OneLineParser
from decaf_ext.errors import ConfigError


def provision_parser(prog: str) -> OneLineParser:
    parser = OneLineParser(prog=prog, description="Make a run's certificate authority and, per agent, a kit "
                                                  "folder (certificate, key, CA certificate, peers list) for "
                                                  "--transport tls. Copy agent_XX/ to agent XX's host only.")
    parser.add_argument("--agents", type=int, required=True, metavar="N", help="number of agents")
    parser.add_argument("--hosts", required=True, metavar="H:P,...",
                        help="each agent's address, host:port, in agent order (agent XX listens there)")
    parser.add_argument("--out", required=True, metavar="KIT", help="new folder to write the kit into")
    parser.add_argument("--topology", default="ring", help="the run's topology (as --topology of the run)")
    parser.add_argument("--topology-p", type=float, default=None, metavar="P", help="as the run's --topology-p")
    parser.add_argument("--topology-file", default=None, metavar="FILE", help="as the run's --topology-file")
    parser.add_argument("--seed", type=int, default=0, help="the run's --seed (erdos_renyi graphs depend on it)")
    parser.add_argument("--days", type=float, default=365.0, help="certificate validity in days")
    return parser


def provision_command(argv: Sequence[str], prog: str) -> int:
    """Write the kit; prints one line per agent folder."""
    args = provision_parser(prog).parse_args(argv)
    if not args.days > 0:
        raise ConfigError(f"days must be > 0, got {args.days}")
    from decaf_ext.comm.kit import provision

    folders = provision(args.agents, args.hosts, args.out, topology=args.topology, seed=args.seed,
                        topology_p=args.topology_p, topology_file=args.topology_file, days=args.days)
    for agent, folder in enumerate(folders):
        print(f"agent {agent}: {folder}")
    print(f"the CA's key is in {args.out}/ca/ca.key: keep it offline or delete it")
    return 0
