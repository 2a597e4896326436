"""The audit's PNGs (matplotlib's object-oriented API on an Agg canvas: no pyplot state, no display needed): scores
against true Dice per judge, the rank curves, and a montage of mined pairs."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nnunet_rndpo.audit.figures import PairExample, rank_curve
from nnunet_rndpo.audit.formatting import format_number as _number


def _new_figure(columns: int, rows: int, width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def score_figure(report: dict[str, Any]) -> Any:
    """Per judge: each proposal's score (scaled to [0, 1] within its case) against its true Dice, cases coloured."""
    names = list(report["judges"])
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure = _new_figure(columns, rows, 4.2, 3.8)
    colours = _case_colours(len(report["per_case"]))
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        for colour, entry in zip(colours, report["per_case"]):
            scores = np.asarray(entry["scores"][name], dtype=np.float64)
            spread = np.ptp(scores)
            scaled = (scores - scores.min()) / spread if spread > 0 else np.full_like(scores, 0.5)
            axes.scatter(scaled, entry["true_dice"], s=10, color=colour, alpha=0.7, linewidths=0)
        figures = report["judges"][name]
        marker = " (uses labels)" if figures["uses_labels"] else ""
        title = f"{name}{marker}\nSpearman {_number(figures['spearman'], '.2f')}"
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("judge score, scaled to [0, 1] within each case", fontsize=9)
        axes.set_ylabel("true Dice", fontsize=9)
        axes.tick_params(labelsize=8)
        axes.set_xlim(-0.05, 1.05)
    return figure


def rank_figure(report: dict[str, Any]) -> Any:
    """Per judge: true Dice minus the case mean at each judge rank, cases thin, their mean thick, the oracle's
    (perfect) ranking dashed; a useful judge's mean curve falls from left to right like the oracle's."""
    names = list(report["judges"])
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure = _new_figure(columns, rows, 4.2, 3.6)
    oracle_curve = report["true_dice"]["oracle_rank_curve"]
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        for entry in report["per_case"]:
            curve = rank_curve(np.asarray(entry["scores"][name]), np.asarray(entry["true_dice"]))
            axes.plot(np.arange(1, len(curve) + 1), curve, color="0.75", linewidth=0.6)
        figures = report["judges"][name]
        ranks = np.arange(1, len(oracle_curve) + 1)
        axes.plot(ranks, oracle_curve, color="black", linestyle="--", linewidth=1.2, label="oracle ranking")
        axes.plot(ranks, figures["rank_curve"], color="C0", linewidth=2.0, marker="o", markersize=3, label="mean")
        axes.axhline(0.0, color="0.4", linewidth=0.6)
        marker = " (uses labels)" if figures["uses_labels"] else ""
        axes.set_title(
            f"{name}{marker}\ntop-1 lift {_number(figures['top1_lift'], '+.3f')} "
            f"(ceiling {report['true_dice']['oracle_top1_lift']:+.3f})",
            fontsize=10,
        )
        axes.set_xlabel("judge rank (1 = judge's top proposal)", fontsize=9)
        axes.set_ylabel("true Dice - case mean", fontsize=9)
        axes.tick_params(labelsize=8)
        axes.legend(fontsize=7, loc="upper right")
    return figure


def pair_montage(examples: Sequence[PairExample]) -> Any:
    """Rows = judges, columns = their pairs: image in grey, chosen contour solid blue, rejected dashed orange,
    disagreeing voxels shaded."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D

    if not examples:
        figure = _new_figure(1, 1, 5.0, 1.5)
        figure.text(0.5, 0.5, "no mined pairs to show", ha="center", va="center")
        return figure
    judges = list(dict.fromkeys(example.judge for example in examples))
    columns = max(sum(example.judge == judge for example in examples) for judge in judges)
    figure = _new_figure(columns, len(judges), 2.8, 3.0)
    shade = ListedColormap(["magenta"])
    for row, judge in enumerate(judges):
        for column, example in enumerate(example for example in examples if example.judge == judge):
            axes = figure.add_subplot(len(judges), columns, row * columns + column + 1)
            if example.image_slice is not None:
                axes.imshow(example.image_slice, cmap="gray", interpolation="nearest")
            else:
                # No image: a light background, on which the shading and both outlines stay visible.
                axes.imshow(np.full(example.chosen_slice.shape, 0.92), cmap="gray", vmin=0, vmax=1)
            disagreement = example.chosen_slice != example.rejected_slice
            shaded = np.ma.masked_where(~disagreement, disagreement)
            axes.imshow(shaded, cmap=shade, alpha=0.35, interpolation="nearest")
            # The chosen outline is drawn wider, so it stays visible where the rejected one runs on top of it.
            outlines = ((example.chosen_slice, "C0", "solid", 2.0), (example.rejected_slice, "C1", "dashed", 1.0))
            for label_map, colour, style, width in outlines:
                for label in np.unique(label_map[label_map > 0]):
                    axes.contour(label_map == label, levels=[0.5], colors=colour, linestyles=style, linewidths=width)
            axes.set_title(
                f"{judge} ({example.strategy})\n{example.case_id} z={example.slice_index}\n"
                f"chosen {example.chosen_true_dice:.3f} / rejected {example.rejected_true_dice:.3f}",
                fontsize=7,
            )
            axes.set_xticks([])
            axes.set_yticks([])
    figure.legend(
        handles=[
            Line2D([], [], color="C0", linestyle="solid", label="chosen"),
            Line2D([], [], color="C1", linestyle="dashed", label="rejected"),
            Line2D([], [], color="magenta", alpha=0.5, linewidth=6, label="disagreement"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize=8,
    )
    return figure


def _case_colours(case_count: int) -> list[Any]:
    from matplotlib import colormaps

    colour_map = colormaps["viridis"]
    return [colour_map(index / max(case_count - 1, 1)) for index in range(case_count)]
