"""The preference statistics of a run, per epoch, under TRL's names (`rewards/chosen`, `rewards/margins`, ...).

A step adds its statistics as device tensors (one stack and one add, no host synchronisation); an epoch's means are
read once, summed over the ranks under DDP. The history of every epoch is kept in `rndpo_statistics.json` in the
output folder (written atomically each epoch, read back on `--c`), beside nnU-Net's own log: nnU-Net's logger
takes only its own keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from nnunet_rndpo.atomic import save_json

STATISTICS_FILE_NAME = "rndpo_statistics.json"


class EpochStatistics:
    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)
        self.history: dict[str, list[float]] = {key: [] for key in self.keys}
        self._sums: Optional[torch.Tensor] = None
        self._steps = 0

    def add(self, statistics: dict) -> None:
        """One step's statistics (0-dim tensors, at least every key of this run)."""
        if not self.keys:
            return
        values = torch.stack([statistics[key].detach().float() for key in self.keys])
        self._sums = values if self._sums is None else self._sums + values
        self._steps += 1

    def start_epoch(self) -> None:
        self._sums, self._steps = None, 0

    def epoch_means(self, all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> dict[str, float]:
        """Means over this epoch's steps so far (over all ranks when `all_reduce` sums a tensor across them): one
        read from the device. NaN for a key when no step was taken (every rank must call it under DDP)."""
        if not self.keys:
            return {}
        device = self._sums.device if self._sums is not None else torch.device("cpu")
        sums = self._sums if self._sums is not None else torch.zeros(len(self.keys), device=device)
        totals = torch.cat([sums, torch.tensor([float(self._steps)], device=device)])
        if all_reduce is not None:
            all_reduce(totals)
        values = totals.cpu().tolist()
        steps = values[-1]
        return {key: value / steps if steps else math.nan for key, value in zip(self.keys, values[:-1])}

    def record(self, epoch: int, means: dict[str, float]) -> None:
        """The epoch's means into the history (an epoch run again after a resume replaces its entry)."""
        for key in self.keys:
            del self.history[key][epoch:]
            self.history[key].append(float(means.get(key, math.nan)))

    def last(self) -> dict[str, float]:
        return {key: values[-1] for key, values in self.history.items() if values}

    def save(self, folder: Path) -> None:
        save_json({"history": self.history}, Path(folder) / STATISTICS_FILE_NAME)

    def load(self, folder: Path, epochs: int) -> None:
        """The history of a run being resumed, up to its first `epochs` epochs."""
        path = Path(folder) / STATISTICS_FILE_NAME
        if not path.is_file():
            return
        saved = json.loads(path.read_text())["history"]
        self.history = {key: [float(v) for v in saved.get(key, [])][:epochs] for key in self.keys}
