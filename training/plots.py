"""PNG plots in the run directory: loss and accuracy curves, a confusion matrix, a grid of test predictions, and
the reliability diagram of the calibration.

matplotlib is imported here only, with the Agg backend, so training needs no display and pays the import
only when it plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.labels import CLASS_NAMES

if TYPE_CHECKING:
    from training.calibration import ReliabilityBins

GRID_IMAGES = 32


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(epochs: list[dict[str, Any]], path: Path) -> None:
    """Training loss, and training / validation / test accuracy where measured, against the epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    numbers = [record["epoch"] for record in epochs]
    loss_axes.plot(numbers, [record["train_loss"] for record in epochs], marker=".")
    loss_axes.set(xlabel="epoch", ylabel="training loss (label-smoothed)", title="loss")
    for key, label in (("train_accuracy", "train (augmented)"), ("validation_accuracy", "validation (holdout)"),
                       ("test_accuracy", "test")):
        points = [(record["epoch"], 100 * record[key]) for record in epochs if record.get(key) is not None]
        if points:
            accuracy_axes.plot(*zip(*points), marker="o" if len(points) < len(numbers) else ".", label=label)
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    accuracy_axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion_matrix(confusion: torch.Tensor, path: Path, title: str = "test set") -> None:
    """Counts, rows = true class, columns = predicted class; the diagonal is what was right."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(confusion.numpy(), cmap="Blues")
    ticks = range(len(CLASS_NAMES))
    axes.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    axes.set_yticks(ticks, CLASS_NAMES)
    axes.set(xlabel="predicted", ylabel="true", title=f"confusion matrix, {title}")
    threshold = confusion.max().item() / 2
    for row in ticks:
        for column in ticks:
            count = int(confusion[row, column])
            axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if count > threshold else "black")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_predictions(images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, path: Path) -> None:
    """A grid of uint8 test images titled "predicted (true)", wrong ones in red."""
    plt = _pyplot()
    columns = 8
    rows = -(-len(images) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), squeeze=False)
    for index, axes in enumerate(grid.flat):
        axes.axis("off")
        if index >= len(images):
            continue
        axes.imshow(images[index].permute(1, 2, 0).numpy())
        predicted, true = CLASS_NAMES[int(predictions[index])], CLASS_NAMES[int(labels[index])]
        axes.set_title(f"{predicted}\n({true})", fontsize=8, color="black" if predicted == true else "red")
    figure.suptitle("test images: predicted (true)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_reliability(before: ReliabilityBins, after: ReliabilityBins, temperature: float, path: Path,
                     title: str = "test set") -> None:
    """Accuracy against confidence per bin (Guo et al. 2017, fig. 1), raw and temperature-scaled side by side:
    bars below the diagonal are over-confident, above it under-confident; the shade under each bar is its share
    of the images."""
    plt = _pyplot()
    figure, panels = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for axes, bins, label in ((panels[0], before, "raw softmax"),
                              (panels[1], after, f"temperature {temperature:.3f}")):
        edges = bins.edges.numpy()
        width = edges[1] - edges[0]
        filled = (bins.counts > 0).numpy()
        accuracy = bins.accuracy.nan_to_num(0).numpy()
        axes.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black", color="tab:blue",
                 alpha=0.8, label="accuracy")
        share = (bins.counts.double() / bins.counts.sum()).numpy()
        axes.bar(edges[:-1], share, width=width, align="edge", color="tab:gray", alpha=0.35,
                 label="share of images")
        confidence = bins.confidence.numpy()
        axes.scatter(confidence[filled], accuracy[filled], color="tab:red", s=12, zorder=3,
                     label="mean confidence, accuracy")
        axes.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfect calibration")
        axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (largest probability)",
                 title=f"{label}: ECE {100 * bins.ece:.2f} %")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("accuracy")
    panels[0].legend(loc="upper left", fontsize=8)
    figure.suptitle(f"reliability, {title} ({int(before.counts.sum())} images, {len(before.counts)} bins)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
