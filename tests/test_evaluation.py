"""What `transferkit eval` draws: confusion matrices a reader can read without the labels.json at hand."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from transferkit.evaluation.report import _MAX_ANNOTATED_CLASSES, _confusion_figure  # noqa: E402


def test_confusion_matrix_names_classes_prints_values_and_has_a_colour_bar():
    classes = ["T-shirt/top", "Trouser", "Sneaker"]
    cm = np.array([[8, 2, 0], [0, 10, 0], [1, 0, 3]])
    fig = _confusion_figure("fashion-mnist", cm, classes)
    ax, colour_bar = fig.axes  # the matrix and its colour bar
    assert [t.get_text() for t in ax.get_xticklabels()] == classes
    assert [t.get_text() for t in ax.get_yticklabels()] == classes
    texts = [t.get_text() for t in ax.texts]
    # row-normalised (recall on the diagonal), row by row
    assert texts == ["0.80", "0.20", "0.00", "0.00", "1.00", "0.00", "0.25", "0.00", "0.75"]
    assert colour_bar.get_ylim() == (0.0, 1.0)
    assert "24 images" in ax.get_title()


def test_many_classes_keep_names_but_drop_cell_text():
    n = _MAX_ANNOTATED_CLASSES + 1
    fig = _confusion_figure("cifar100", np.eye(n, dtype=int), [f"c{i}" for i in range(n)])
    assert len(fig.axes[0].get_xticklabels()) == n and not fig.axes[0].texts
