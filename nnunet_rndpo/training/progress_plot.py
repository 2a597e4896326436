"""progress_preference.png beside nnU-Net's progress.png: the DPO statistics per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_rndpo.atomic import atomic_path


def plot_preference_progress(statistics: dict[str, list[float]], pseudo_dice: Sequence[float], path: Path) -> None:
    """statistics: the run's per-epoch history (training/epoch_statistics.py); pseudo_dice: nnU-Net's per epoch."""
    import matplotlib

    # nnU-Net's logger imports seaborn, which enlarges fonts globally; draw with matplotlib's defaults
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        _plot(statistics, pseudo_dice, path)


def _plot(statistics: dict[str, list[float]], pseudo_dice: Sequence[float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key):
        return np.asarray(statistics.get(key) or [], dtype=float)

    dice = np.asarray(pseudo_dice, dtype=float)
    if not len(series("rewards/chosen")) and not len(dice):
        return
    figure = Figure(figsize=(10, 12))
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, 1)
    for key, colour in (("rewards/chosen", "g"), ("rewards/rejected", "r"), ("rewards/margins", "b")):
        values = series(key)
        if len(values):
            axes[0].plot(np.arange(len(values)), values, color=colour, label=key)
    axes[0].set_ylabel("reward (beta x normalised log-ratio)")
    accuracy = series("rewards/accuracies")
    if len(accuracy):
        axes[1].plot(np.arange(len(accuracy)), accuracy, color="b", label="rewards/accuracies")
    skipped = series("pairs/skipped_fraction")
    if len(skipped):
        axes[1].plot(np.arange(len(skipped)), skipped, color="k", ls="--", label="pairs/skipped_fraction")
    if len(dice):
        axes[1].plot(np.arange(len(dice)), dice, color="g", ls=":", label="validation pseudo Dice")
    axes[1].set_ylim(0, 1)
    fraction = series("disagreement/fraction_mean")
    if len(fraction):
        axes[2].plot(np.arange(len(fraction)), fraction, color="m", label="disagreement/fraction_mean (of the patch)")
    axes[2].set_xlabel("epoch")
    for axis in axes:
        if axis.lines:
            axis.legend(loc="best")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
