import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def ring_weights(n: int, dtype=torch.float64) -> torch.Tensor:
    """Ring mixing matrix with uniform 1/3 weights (1/2 for n = 2, 1 for n = 1)."""
    W = torch.zeros(n, n, dtype=dtype)
    for i in range(n):
        for d in (-1, 0, 1):
            W[i, (i + d) % n] = 1.0
    return W / W.sum(1, keepdim=True)


def complete_weights(n: int, dtype=torch.float64) -> torch.Tensor:
    return torch.full((n, n), 1.0 / n, dtype=dtype)


def files_of(folder) -> dict:
    """{path: bytes} of every file under `folder` (pathlib.Path): a run compared before and after a refused call."""
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
