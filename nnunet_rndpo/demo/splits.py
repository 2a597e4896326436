"""Split a labeled nnU-Net raw dataset into parts (few labeled, an unlabeled pool, validation, test) and lay the
parts out as a new raw dataset. One splitter, used by the demo's `--data` and by benchmarks/low_label.py.

The unlabeled pool's labels are kept aside in `labelsUnlabeled` (research only: the oracle judge and the audit
read them; training never does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

# where each part's images and labels go in the new raw dataset
PART_FOLDERS = {
    "labeled": ("imagesTr", "labelsTr"),
    "validation": ("imagesTr", "labelsTr"),  # labeled, held out by splits_final.json
    "unlabeled": ("imagesUnlabeled", "labelsUnlabeled"),
    "test": ("imagesTs", "labelsTs"),
}


def labeled_case_ids(raw_dataset: Path) -> list[str]:
    """Case ids of `labelsTr` in a raw dataset folder, sorted."""
    ending = json.loads((Path(raw_dataset) / "dataset.json").read_text())["file_ending"]
    return sorted(p.name[: -len(ending)] for p in (Path(raw_dataset) / "labelsTr").iterdir() if p.name.endswith(ending))


def split_cases(
    case_ids: Sequence[str], seed: int, sizes: Sequence[tuple[str, int]], rest: str
) -> dict[str, list[str]]:
    """Consecutive parts of one seeded permutation of the sorted case ids: `sizes` in order, then `rest` takes
    what is left. Each part is sorted; no case is in two parts."""
    ordered = sorted(case_ids)
    needed = sum(size for _, size in sizes)
    if needed > len(ordered):
        raise ValueError(
            f"the split needs {needed} cases ({', '.join(f'{n} {s}' for n, s in sizes)}); only {len(ordered)} exist"
        )
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    parts, start = {}, 0
    for name, size in sizes:
        parts[name] = sorted(permuted[start : start + size])
        start += size
    parts[rest] = sorted(permuted[start:])
    return parts


def link_parts(source: Path, target: Path, parts: dict[str, list[str]]) -> None:
    """Links (or copies, where links fail) each part's image channels and label into `target`'s folders."""
    dataset_json = json.loads((Path(source) / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    for part, case_ids in parts.items():
        if part not in PART_FOLDERS:
            raise ValueError(f"unknown part {part!r}; valid: {', '.join(PART_FOLDERS)}")
        image_folder, label_folder = PART_FOLDERS[part]
        for case_id in case_ids:
            for channel in range(channels):
                name = f"{case_id}_{channel:04d}{ending}"
                _link_or_copy(Path(source) / "imagesTr" / name, target / image_folder / name)
            _link_or_copy(
                Path(source) / "labelsTr" / f"{case_id}{ending}", target / label_folder / f"{case_id}{ending}"
            )


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copyfile(source, target)
