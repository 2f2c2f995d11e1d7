"""The SVD helpers every low-rank method shares: factors, ranks, devices, their errors."""

import pytest
import torch

from mergeflow import ParameterError
from mergeflow.svd import (
    GRAM_MAX_SHARE,
    Factors,
    energy_rank,
    factors_bytes,
    lapack_svd,
    low_rank_sum,
    rank_for,
    resolve_device,
    truncated_svd,
    truncated_svds,
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


def _with_spectrum(m, n, kind, seed=0):
    """An (m, n) float32 matrix with a chosen singular spectrum: ``steep`` (s_i = 1/i),
    ``flat`` (Gaussian entries: neighbouring singular values nearly tie everywhere) or
    ``spiked`` (8 large directions over noise 1e-4 as large, below float32 Gram's
    resolution: what a route through a float32 BᵀB gets wrong)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "flat":
        return torch.randn(m, n, generator=gen)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    i = torch.arange(1, r + 1, dtype=torch.float64)
    if kind == "steep":
        s = 1 / i
    else:
        s = torch.where(i <= 8, 1.0, 1e-4) * (1 + 0.1 * torch.rand(r, generator=gen))
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape", [(192, 64), (64, 192), (96, 96)])
@pytest.mark.parametrize("kind", ["steep", "flat", "spiked"])
def test_fast_factorization_matches_the_full_svd_on_the_merged_weights(shape, kind, monkeypatch):
    """Every rank up to the Gram route's limit: merged weights θ_avg + Σ_k within 1e-5
    (relative, per tensor) of the full-SVD result, with θ_avg 20× the task vector's norm
    (fine-tuning moves weights by a few percent); the low-rank part itself within 1e-5 of
    the float64 truth; factors orthonormal; and no LAPACK SVD was run."""
    tau = _with_spectrum(*shape, kind)
    average = _matrix(*shape, seed=9)
    average *= 20 * tau.norm() / average.norm()
    u64, s64, vh64 = torch.linalg.svd(tau.double(), full_matrices=False)
    ranks = sorted({rank_for(shape, r) for r in (0.02, 0.08, 0.16, GRAM_MAX_SHARE)})
    references = {k: low_rank_sum([lapack_svd(tau, k)], k).double() for k in ranks}

    def no_lapack(*args, **kwargs):
        raise AssertionError("the fast route ran a full SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_lapack)
    for k in ranks:
        factors = truncated_svd(tau, k)
        fast = low_rank_sum([factors], k).double()
        merged, reference = average.double() + fast, average.double() + references[k]
        assert (merged - reference).norm() <= 1e-5 * reference.norm(), k
        truth = (u64[:, :k] * s64[:k]) @ vh64[:k]
        assert (fast - truth).norm() <= 1e-5 * truth.norm(), k
        torch.testing.assert_close(factors.s.double(), s64[:k], rtol=1e-5, atol=0)
        torch.testing.assert_close(factors.u.T @ factors.u, torch.eye(k), atol=1e-5, rtol=0)
        torch.testing.assert_close(factors.vh @ factors.vh.T, torch.eye(k), atol=1e-5, rtol=0)


def test_lapack_serves_matrices_of_rank_below_k_and_ranks_above_the_gram_share(monkeypatch):
    """Rank 2, asked for 5: the Gram route's 3 extra left vectors would be noise, so LAPACK
    gives orthonormal ones; a zero matrix too."""
    gen = torch.Generator().manual_seed(3)
    low = torch.randn(64, 2, generator=gen) @ torch.randn(2, 48, generator=gen)
    calls = []
    full_svd = torch.linalg.svd

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return full_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counted)
    for matrix in (low, torch.zeros(64, 48)):
        factors = truncated_svd(matrix, 5)
        torch.testing.assert_close(factors.u.T @ factors.u, torch.eye(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(low_rank_sum([factors], 5), matrix, atol=1e-4, rtol=0)
    assert len(calls) == 2
    # and a rank above the Gram route's share goes to LAPACK too
    truncated_svd(_matrix(64, 48), int(GRAM_MAX_SHARE * 48) + 1)
    assert len(calls) == 3


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_lapack_svd_of_a_batch_is_each_matrix_s(shape):
    """What truncated_svds runs on CUDA, checked here on CPU: a (T, m, n) stack in one call
    gives each matrix's own top-k triplets, tall and wide alike."""
    matrices = [_with_spectrum(*shape, "steep", seed=t) for t in range(3)]
    batch = lapack_svd(torch.stack(matrices), 5)
    assert (batch.u.shape, batch.s.shape, batch.vh.shape) == (
        (3, shape[0], 5),
        (3, 5),
        (3, 5, shape[1]),
    )
    for t, matrix in enumerate(matrices):
        one = lapack_svd(matrix, 5)
        torch.testing.assert_close(batch.s[t], one.s, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            (batch.u[t] * batch.s[t]) @ batch.vh[t], low_rank_sum([one], 5), atol=1e-5, rtol=0
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_keys_matrices_are_factorized_as_one_batch_on_cuda():
    matrices = [_with_spectrum(96, 64, "steep", seed=t) for t in range(4)]
    on_gpu = truncated_svds([m.cuda() for m in matrices], 10)
    for matrix, factors in zip(matrices, on_gpu, strict=True):
        expected = low_rank_sum([truncated_svd(matrix, 10)], 10)
        got = low_rank_sum([factors], 10).cpu()
        assert (got - expected).norm() <= 1e-5 * expected.norm()
