"""Graphs against hand-written small cases, mixing rules, validation errors, spectral gaps, schedules."""

import math
import re
import warnings

import numpy as np
import pytest
import torch

from decaf_ext.topology import (
    TOPOLOGIES,
    build_graph,
    make_schedule,
    mixing_matrix,
    one_peer_graph,
    spectral_gap,
    validate_mixing,
)


def neighbors(adjacency: torch.Tensor, i: int) -> set[int]:
    return set(torch.nonzero(adjacency[i]).flatten().tolist())


def graph_from_edges(n: int, edges: list[tuple[int, int]]) -> torch.Tensor:
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    for i, j in edges:
        adjacency[i, j] = adjacency[j, i] = True
    return adjacency


def assert_valid_graph(adjacency: torch.Tensor, n: int) -> None:
    assert adjacency.dtype == torch.bool and adjacency.shape == (n, n)
    assert torch.equal(adjacency, adjacency.T)
    assert not adjacency.diagonal().any()


def one_line_error(match: str):
    """pytest.raises(ValueError, match=...) that also checks the message is one line."""
    return pytest.raises(ValueError, match=f"^[^\\n]*{match}[^\\n]*$")


# --------------------------------------------------------------------------------------------- graphs


def test_ring_neighbors():
    adjacency = build_graph("ring", 5)
    assert_valid_graph(adjacency, 5)
    assert [neighbors(adjacency, i) for i in range(5)] == [{1, 4}, {0, 2}, {1, 3}, {2, 4}, {0, 3}]


def test_complete():
    assert torch.equal(build_graph("complete", 4), ~torch.eye(4, dtype=torch.bool))


def test_bipartite_even_and_odd():
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:3, 3:] = expected[3:, :3] = True
    assert torch.equal(build_graph("bipartite", 6), expected)
    odd = build_graph("bipartite", 5)  # sides [0, 2) and [2, 5)
    assert neighbors(odd, 0) == {2, 3, 4} and neighbors(odd, 4) == {0, 1}


def test_star():
    adjacency = build_graph("star", 5)
    assert neighbors(adjacency, 0) == {1, 2, 3, 4}
    assert all(neighbors(adjacency, i) == {0} for i in range(1, 5))


def test_torus_3x3_and_2x3():
    adjacency = build_graph("torus", 9)
    assert_valid_graph(adjacency, 9)
    assert adjacency.sum(dim=1).tolist() == [4] * 9
    assert neighbors(adjacency, 0) == {1, 2, 3, 6}
    assert neighbors(adjacency, 4) == {1, 3, 5, 7}
    # 2 x 3: the two wrap-around row neighbors coincide, so the degree is 1 + 2
    assert neighbors(build_graph("torus", 6), 0) == {1, 2, 3}


def test_torus_rejects_prime():
    with one_line_error("prime"):
        build_graph("torus", 7)


def test_exponential_8_hops():
    adjacency = build_graph("exponential", 8)
    assert_valid_graph(adjacency, 8)
    assert neighbors(adjacency, 0) == {1, 2, 4, 6, 7}  # +-1, +-2, 4
    assert neighbors(adjacency, 3) == {2, 4, 1, 5, 7}


def test_one_peer_rounds_and_union():
    peers = [[int(torch.nonzero(one_peer_graph(8, t)[i]).item()) for i in range(8)] for t in range(4)]
    assert peers[0] == [1, 0, 3, 2, 5, 4, 7, 6]
    assert peers[1] == [2, 3, 0, 1, 6, 7, 4, 5]
    assert peers[2] == [4, 5, 6, 7, 0, 1, 2, 3]
    assert peers[3] == peers[0]
    assert neighbors(build_graph("one_peer_exponential", 8), 0) == {1, 2, 4}
    with one_line_error("power of two"):
        build_graph("one_peer_exponential", 6)


def test_erdos_renyi_seeded_connected():
    first = build_graph("erdos_renyi", 12, seed=3)
    assert_valid_graph(first, 12)
    assert torch.equal(first, build_graph("erdos_renyi", 12, seed=3))
    assert not torch.equal(first, build_graph("erdos_renyi", 12, seed=4))
    assert torch.equal(build_graph("erdos_renyi", 6, p=1.0), build_graph("complete", 6))
    validate_mixing(mixing_matrix(first))  # connected


def test_erdos_renyi_errors():
    with one_line_error("no connected"):
        build_graph("erdos_renyi", 30, p=0.01)
    with one_line_error("p must be"):
        build_graph("erdos_renyi", 5, p=1.5)
    with one_line_error("p applies only"):
        build_graph("ring", 5, p=0.5)


def test_argument_errors():
    with one_line_error("topology must be one of"):
        build_graph("hypercube", 4)
    with one_line_error("n must be"):
        build_graph("ring", 0)
    with one_line_error("path is required"):
        build_graph("file", 4)
    with one_line_error("rule must be one of"):
        mixing_matrix(build_graph("ring", 4), "optimal")


def test_single_agent_is_trivial():
    for name in TOPOLOGIES[:-1]:
        schedule = make_schedule(name, 1)
        assert torch.equal(schedule.at(0), torch.ones(1, 1, dtype=torch.float64))
        assert schedule.spectral_gap == 1.0


# ---------------------------------------------------------------------------------------- file graphs


def test_file_edge_list_round_trip(tmp_path):
    ring = build_graph("ring", 6)
    i, j = torch.nonzero(torch.triu(ring)).T.tolist()
    path = tmp_path / "ring.txt"
    path.write_text("# a ring\n" + "".join(f"{a} {b}\n" for a, b in zip(i, j)))
    assert torch.equal(build_graph("file", 6, path=str(path)), ring)


def test_file_matrix_text_and_npy_round_trip(tmp_path):
    torus = build_graph("torus", 9)
    text = tmp_path / "torus.csv"
    np.savetxt(text, torus.numpy().astype(int), fmt="%d", delimiter=",")
    assert torch.equal(build_graph("file", 9, path=str(text)), torus)
    npy = tmp_path / "torus.npy"
    np.save(npy, torus.numpy().astype(np.int8))
    assert torch.equal(build_graph("file", 9, path=str(npy)), torus)


def test_file_errors(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("0 1\n2 3\n")
    with one_line_error("disconnected"):
        build_graph("file", 4, path=str(path))
    with one_line_error("the edge list has 4 nodes .* but there are 3 agents"):
        build_graph("file", 3, path=str(path))
    with one_line_error("the edge list has 4 nodes .* but there are 6 agents"):
        build_graph("file", 6, path=str(path))
    path.write_text("0 1\n-1 3\n")
    with one_line_error("node ids"):
        build_graph("file", 4, path=str(path))
    path.write_text("0 1\n2 3\n")
    path.write_text("0 1\n1 1\n")
    with one_line_error("self loop"):
        build_graph("file", 2, path=str(path))
    np.save(tmp_path / "directed.npy", np.array([[0, 1, 0], [0, 0, 1], [1, 1, 0]]))
    with one_line_error("not symmetric"):
        build_graph("file", 3, path=str(tmp_path / "directed.npy"))
    with one_line_error("not a file"):
        build_graph("file", 3, path=str(tmp_path / "missing.txt"))


def test_unparsable_files_name_the_path(tmp_path):
    for name, content in [("letters.txt", "0 1\n1 x\n"), ("ragged.txt", "0 1 1\n1 0\n"), ("damaged.npy", "\x93NUMPY?"),
                          ("empty.npy", "")]:
        (tmp_path / name).write_text(content)
        with one_line_error(re.escape(f"path={str(tmp_path / name)!r}: cannot read an edge list or a 0/1 matrix (")):
            make_schedule("file", 2, path=str(tmp_path / name))


def test_an_empty_file_is_one_line_without_warnings(tmp_path):
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "input contained no data" warning came first
        with one_line_error(re.escape(f"path={str(tmp_path / 'empty.txt')!r} holds no edges and no matrix rows")):
            make_schedule("file", 4, path=str(tmp_path / "empty.txt"))


# ------------------------------------------------------------------------------------ mixing matrices


@pytest.mark.parametrize("name", ["ring", "complete", "bipartite", "star", "torus", "erdos_renyi", "exponential"])
@pytest.mark.parametrize("rule", ["auto", "uniform", "metropolis", "max_degree"])
def test_every_rule_is_doubly_stochastic(name, rule):
    adjacency = build_graph(name, 9 if name == "torus" else 10, seed=1)
    degrees = adjacency.sum(dim=1)
    if rule == "uniform" and not (degrees == degrees[0]).all():
        with one_line_error("uniform"):
            mixing_matrix(adjacency, rule)
        return
    W = mixing_matrix(adjacency, rule)
    assert W.dtype == torch.float64
    validate_mixing(W)
    assert torch.equal((W > 0) & ~torch.eye(len(W), dtype=torch.bool), adjacency)  # supported on the graph


def test_rules_hand_values():
    # star with a tail: 0-1, 0-2, 0-3, 3-4; degrees 3, 1, 1, 2, 1
    adjacency = graph_from_edges(5, [(0, 1), (0, 2), (0, 3), (3, 4)])
    metropolis = mixing_matrix(adjacency, "metropolis")
    assert metropolis[0, 1].item() == pytest.approx(1 / 4)
    assert metropolis[3, 4].item() == pytest.approx(1 / 3)
    assert metropolis[3, 3].item() == pytest.approx(1 - 1 / 4 - 1 / 3)
    assert metropolis[4, 4].item() == pytest.approx(2 / 3)
    max_degree = mixing_matrix(adjacency, "max_degree")
    assert max_degree[3, 4].item() == pytest.approx(1 / 4)
    assert max_degree[3, 3].item() == pytest.approx(1 / 2)
    assert torch.equal(mixing_matrix(adjacency, "auto"), metropolis)
    ring = mixing_matrix(build_graph("ring", 5), "auto")  # regular: uniform 1/3
    expected = (torch.eye(5) + torch.roll(torch.eye(5), 1, 0) + torch.roll(torch.eye(5), -1, 0)).double() / 3
    torch.testing.assert_close(ring, expected, rtol=0, atol=1e-15)


def test_spectral_gaps_closed_form():
    assert spectral_gap(mixing_matrix(build_graph("complete", 7), "uniform")) == pytest.approx(1.0, abs=1e-12)
    n = 10
    ring_gap = spectral_gap(mixing_matrix(build_graph("ring", n), "uniform"))
    assert ring_gap == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-12)
    # the directed cycle (I + P) / 2: eigenvalues (1 + e^{2 pi i k / n}) / 2, moduli |cos(pi k / n)|
    directed = (torch.eye(n) + torch.roll(torch.eye(n), 1, 0)).double() / 2
    assert spectral_gap(directed) == pytest.approx(1 - math.cos(math.pi / n), abs=1e-12)


# ---------------------------------------------------------------------------------------- validation


def test_validate_errors():
    with one_line_error("disconnected"):
        validate_mixing(torch.block_diag(torch.full((2, 2), 0.5), torch.full((2, 2), 0.5)).double())
    directed = (torch.eye(4) + torch.roll(torch.eye(4), 1, 0)).double() / 2
    with one_line_error("not symmetric"):
        validate_mixing(directed)
    with one_line_error("negative"):
        validate_mixing(torch.tensor([[1.5, -0.5], [-0.5, 1.5]], dtype=torch.float64))
    with one_line_error("rows do not sum to 1"):
        validate_mixing(torch.tensor([[0.5, 0.4], [0.4, 0.5]], dtype=torch.float64))
    with one_line_error("square"):
        validate_mixing(torch.ones(2, 3))
    with one_line_error("^M is not symmetric"):
        validate_mixing(directed, name="M")
    validate_mixing(torch.ones(1, 1))


# ------------------------------------------------------------------------------------------ schedules


def test_static_schedule():
    schedule = make_schedule("ring", 10)
    assert schedule.n_agents == 10 and schedule.period == 1
    assert torch.equal(schedule.at(0), schedule.at(17))
    assert schedule.spectral_gap == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / 10)) / 3)
    W = schedule.at(0)
    W.zero_()  # a copy: the schedule is untouched
    assert schedule.at(0).sum().item() == pytest.approx(10.0)
    with one_line_error("round_index"):
        schedule.at(-1)


def test_one_peer_schedule_exact_average_after_period():
    schedule = make_schedule("one_peer_exponential", 8)
    assert schedule.period == 3
    for t in range(3):
        W = schedule.at(t)
        validate_mixing(W, require_connected=False)
        assert torch.equal(W > 0, one_peer_graph(8, t) | torch.eye(8, dtype=torch.bool))
        assert torch.all(W[W > 0] == 0.5)
    assert torch.equal(schedule.at(4), schedule.at(1))
    product = schedule.at(2) @ schedule.at(1) @ schedule.at(0)
    torch.testing.assert_close(product, torch.full((8, 8), 1 / 8, dtype=torch.float64), rtol=0, atol=1e-15)
    assert schedule.spectral_gap == pytest.approx(0.0, abs=1e-12)  # a single round is disconnected
    assert schedule.effective_spectral_gap == pytest.approx(1.0)
