"""The SVD helpers every low-rank method shares: factors, ranks, devices, their errors."""

import pytest
import torch

from mergeflow import ParameterError
from mergeflow.svd import (
    Factors,
    energy_rank,
    factors_bytes,
    low_rank_sum,
    resolve_device,
    truncated_svd,
)


def _matrix(m, n, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])
def test_truncated_svd_is_the_best_rank_k_approximation_with_orthonormal_factors(shape):
    matrix = _matrix(*shape)
    factors = truncated_svd(matrix, 3)
    assert (factors.u.shape, factors.s.shape, factors.vh.shape) == (
        (shape[0], 3),
        (3,),
        (3, shape[1]),
    )
    torch.testing.assert_close(factors.u.T @ factors.u, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(factors.vh @ factors.vh.T, torch.eye(3), atol=1e-5, rtol=0)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(low_rank_sum([factors], 3).double(), best, atol=1e-5, rtol=0)
    torch.testing.assert_close(factors.s.double(), s[:3], atol=1e-5, rtol=0)


def test_truncated_svd_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"truncated_svd expects a matrix, got shape \(2, 3, 4\)"):
        truncated_svd(torch.zeros(2, 3, 4), 1)


def test_low_rank_sum_adds_each_task_at_its_own_rank():
    a, b = truncated_svd(_matrix(6, 4, 1), 4), truncated_svd(_matrix(6, 4, 2), 4)
    expected = (a.u[:, :1] * a.s[:1]) @ a.vh[:1] + (b.u[:, :3] * b.s[:3]) @ b.vh[:3]
    torch.testing.assert_close(low_rank_sum([a, b], [1, 3]), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="^low_rank_sum needs at least one set of factors$"):
        low_rank_sum([], 1)
    with pytest.raises(ValueError, match="^factors hold rank 4, asked for rank 5$"):
        low_rank_sum([a, b], [1, 5])


def test_factors_bytes_counts_every_stored_element():
    f = Factors(torch.zeros(6, 2), torch.zeros(2), torch.zeros(2, 5))
    half = Factors(torch.zeros(6, 1, dtype=torch.float16), torch.zeros(1), torch.zeros(1, 5))
    assert factors_bytes({"a": [f, f], "b": [half]}) == 2 * (12 + 2 + 10) * 4 + 6 * 2 + 4 + 20


def test_energy_rank_of_a_zero_matrix_is_one():
    assert energy_rank(torch.zeros(4), 0.5) == 1
    assert energy_rank(torch.zeros(4), 1.0, total=0.0) == 1


def test_devices_resolve_to_cpu_here_and_others_are_refused():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ParameterError, match=r"^device 'meta': mergeflow runs on cpu or cuda$"):
        resolve_device("meta")
    with pytest.raises(ParameterError, match=r"^unknown device 'tpu' \(use auto, cpu, cuda"):
        resolve_device("tpu")
