"""The Fréchet distance against closed forms: diagonal Gaussians, scipy's matrix square root, shifts."""

import pytest
import torch

from lmforge.evaluation.metrics import frechet_distance, gaussian_frechet_distance


def random_covariance(dimensions: int, generator: torch.Generator) -> torch.Tensor:
    factor = torch.randn(dimensions, dimensions, generator=generator, dtype=torch.float64)
    return factor @ factor.T + 0.1 * torch.eye(dimensions, dtype=torch.float64)


def test_diagonal_gaussians_match_the_closed_form():
    # For diagonal covariances the cross term is elementwise: sum (sqrt(a) - sqrt(b))^2.
    generator = torch.Generator().manual_seed(0)
    mean_a, mean_b = (torch.randn(6, generator=generator, dtype=torch.float64) for _ in range(2))
    variance_a, variance_b = (torch.rand(6, generator=generator, dtype=torch.float64) + 0.1 for _ in range(2))
    expected = (mean_a - mean_b).square().sum() + (variance_a.sqrt() - variance_b.sqrt()).square().sum()
    got = gaussian_frechet_distance(mean_a, torch.diag(variance_a), mean_b, torch.diag(variance_b))
    assert got == pytest.approx(expected.item(), rel=1e-9)


def test_full_covariances_match_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(1)
    a, b = random_covariance(5, generator), random_covariance(5, generator)
    mean_a, mean_b = (torch.randn(5, generator=generator, dtype=torch.float64) for _ in range(2))
    cross = scipy_linalg.sqrtm((a @ b).numpy()).real
    expected = ((mean_a - mean_b).square().sum() + a.trace() + b.trace()).item() - 2 * cross.trace()
    assert gaussian_frechet_distance(mean_a, a, mean_b, b) == pytest.approx(expected, rel=1e-8)


def test_the_distance_is_symmetric_and_zero_for_one_gaussian():
    generator = torch.Generator().manual_seed(2)
    a, b = random_covariance(4, generator), random_covariance(4, generator)
    mean = torch.randn(4, generator=generator)
    assert gaussian_frechet_distance(mean, a, mean, a) == pytest.approx(0.0, abs=1e-8)
    assert gaussian_frechet_distance(mean, a, mean + 1, b) == pytest.approx(
        gaussian_frechet_distance(mean + 1, b, mean, a)
    )


def test_features_shifted_by_a_vector_are_that_vector_squared_apart():
    # Shifting every feature leaves the covariance unchanged: only |shift|^2 remains.
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    shift = torch.arange(8.0) / 4
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)


def test_scaled_one_dimensional_features():
    # In 1-D: (m_a - m_b)^2 + (s_a - s_b)^2; scaling by 3 triples the standard deviation.
    features = torch.randn(500, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    deviation, mean = features.std().item(), features.mean().item()
    expected = (2 * mean) ** 2 + (2 * deviation) ** 2
    assert frechet_distance(features, 3 * features) == pytest.approx(expected, rel=1e-9)


def test_mismatched_features_are_refused():
    with pytest.raises(ValueError, match="features"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
