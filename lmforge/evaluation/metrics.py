"""Classification metrics: accuracy, macro-F1 and the confusion matrix (as counts and as a PNG); the Fréchet
distance between two sets of feature vectors, for judging generated images against real ones."""

from __future__ import annotations

from pathlib import Path

import torch


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).float().mean().item()


def macro_f1(matrix: torch.Tensor) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN), from a confusion matrix.

    A class that is neither present nor predicted has no F1 and is left out of the mean
    (scikit-learn's `f1_score(average="macro")` with `labels` = the classes seen).
    """
    matrix = matrix.double()
    true_positives = matrix.diagonal()
    denominators = matrix.sum(0) + matrix.sum(1)  # = 2 TP + FP + FN
    present = denominators > 0
    return (2 * true_positives[present] / denominators[present]).mean().item() if present.any() else 0.0


def save_confusion_matrix_png(
    matrix: torch.Tensor, path: str | Path, title: str, class_names: list[str] | None = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.5, 0.45 * matrix.shape[0] + 2)
    figure, axes = plt.subplots(figsize=(size + 0.5, size))
    axes.imshow(matrix.numpy(), cmap="Blues")
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            if matrix[row, column]:
                axes.text(column, row, int(matrix[row, column]), ha="center", va="center", fontsize=7)
    if class_names is not None:
        ticks = range(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=45, ha="right")
        axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def gaussian_frechet_distance(
    mean_a: torch.Tensor, covariance_a: torch.Tensor, mean_b: torch.Tensor, covariance_b: torch.Tensor
) -> float:
    """The Fréchet (2-Wasserstein) distance squared between two Gaussians (Dowson & Landau 1982):
    |mean_a - mean_b|^2 + tr(A + B - 2 (A^1/2 B A^1/2)^1/2).

    tr (A B)^1/2 equals tr (A^1/2 B A^1/2)^1/2, whose argument is symmetric positive semi-definite, so
    both roots come from `eigh` (no complex parts, unlike scipy's `sqrtm` on the non-symmetric A B)."""
    mean_a, mean_b, covariance_a, covariance_b = (t.double() for t in (mean_a, mean_b, covariance_a, covariance_b))
    values, vectors = torch.linalg.eigh(covariance_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    cross_values = torch.linalg.eigvalsh(root_a @ covariance_b @ root_a)
    trace_of_root = cross_values.clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + covariance_a.trace() + covariance_b.trace() - 2 * trace_of_root
    return max(distance.item(), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors (N, D) and (M, D): FID
    (Heusel et al. 2017) when the features are an image classifier's. Lower is closer; 0 for the same set."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"expected (N, D) and (M, D) features, got {tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("a covariance needs at least 2 feature vectors in each set")
    a, b = features_a.double(), features_b.double()
    covariance_a, covariance_b = (torch.atleast_2d(torch.cov(x.T)) for x in (a, b))  # (1, 1) for D = 1
    return gaussian_frechet_distance(a.mean(0), covariance_a, b.mean(0), covariance_b)
