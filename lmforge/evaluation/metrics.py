"""Classification metrics: accuracy, macro-F1 and the confusion matrix (as counts and as a PNG)."""

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
