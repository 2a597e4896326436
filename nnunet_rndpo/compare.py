"""A fine-tuned model against its base on labeled cases that the fine-tuning did not train on (`nnunet_rndpo compare`).

Both models predict the same cases with nnU-Net's own predictor (as `nnUNetv2_predict`, mirroring on by default),
nnU-Net's own evaluation scores them (as `nnUNetv2_evaluate_folder`: Dice per class; a class absent from both the
prediction and the reference has no Dice and is left out of that case's mean), and the two are paired by case:
the mean difference with its standard error, and how many cases got better. Default cases: the fold's validation
cases (nnU-Net's split), which the preference trainers never train on (they train on the unlabeled pool); with
`final_checkpoint: best` they chose the checkpoint, so give other labeled cases instead (`images`, `labels`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnunet_rndpo.atomic import save_json
from nnunet_rndpo.nnunet_paths import RunLocation

COMPARE_JSON_NAME = "compare.json"


@dataclass(frozen=True)
class PairedDifference:
    """b - a over cases present in both: mean, standard error of the mean (n - 1 in the deviation), and counts."""

    mean: float
    standard_error: float
    cases: int
    better: int
    worse: int

    def to_json(self) -> dict:
        return {
            "mean": self.mean,
            "standard_error": self.standard_error,
            "cases": self.cases,
            "better": self.better,
            "worse": self.worse,
        }


def paired_difference(a: dict[str, float], b: dict[str, float]) -> PairedDifference:
    """Per-case `b - a` over the cases both score (NaN cases left out): pure, for hand-made numbers."""
    cases = sorted(case for case in set(a) & set(b) if not (math.isnan(a[case]) or math.isnan(b[case])))
    differences = np.array([b[case] - a[case] for case in cases], dtype=np.float64)
    if differences.size == 0:
        return PairedDifference(math.nan, math.nan, 0, 0, 0)
    error = float(differences.std(ddof=1) / np.sqrt(differences.size)) if differences.size > 1 else math.nan
    return PairedDifference(
        float(differences.mean()),
        error,
        int(differences.size),
        int(np.count_nonzero(differences > 0)),
        int(np.count_nonzero(differences < 0)),
    )


def case_files(location: RunLocation, case_ids: Sequence[str]) -> tuple[list[list[str]], list[str], Path]:
    """The raw images (one file per channel) and the label folder of labeled training cases of the dataset."""
    raw = location.raw_dataset_folder
    if raw is None or not (raw / "imagesTr").is_dir():
        raise FileNotFoundError(f"no imagesTr in the raw dataset folder {raw}: nnUNet_raw must hold the dataset")
    ending = location.dataset_json["file_ending"]
    channels = len(location.dataset_json.get("channel_names", location.dataset_json.get("modality", {})))
    images = [
        [str(raw / "imagesTr" / f"{case}_{channel:04d}{ending}") for channel in range(channels)] for case in case_ids
    ]
    missing = [files[0] for files in images if not all(Path(f).is_file() for f in files)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) of the cases are missing, e.g. {missing[0]}")
    return images, list(case_ids), raw / "labelsTr"


def folder_files(images: Path, labels: Path, file_ending: str, channels: int) -> tuple[list[list[str]], list[str]]:
    """The cases of a user's folder pair: `<case>_XXXX<ending>` images, `<case><ending>` labels for every case."""
    pattern = re.compile(rf"^(?P<case>.+)_0000{re.escape(file_ending)}$")
    cases = sorted(m["case"] for p in Path(images).iterdir() if (m := pattern.match(p.name)))
    if not cases:
        raise FileNotFoundError(f"no <case>_0000{file_ending} images in {images}")
    unlabeled = [case for case in cases if not (Path(labels) / f"{case}{file_ending}").is_file()]
    if unlabeled:
        raise FileNotFoundError(f"no label {unlabeled[0]}{file_ending} in {labels} (and {len(unlabeled) - 1} more)")
    files = [
        [str(Path(images) / f"{case}_{channel:04d}{file_ending}") for channel in range(channels)] for case in cases
    ]
    return files, cases


def predict(
    model_folder: Path,
    fold,
    checkpoint: str,
    images: list[list[str]],
    cases: list[str],
    output: Path,
    device,
    mirroring: bool,
) -> Path:
    """nnU-Net's predictor on the given files, the predictions named `<case><ending>` in `output`."""
    import torch
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=torch.device(device).type == "cuda",
        device=torch.device(device),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,), checkpoint_name=checkpoint)
    output.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(
        images,
        [str(output / case) for case in cases],
        save_probabilities=False,
        overwrite=True,
        num_processes_preprocessing=max(1, default_num_processes),
        num_processes_segmentation_export=max(1, default_num_processes),
    )
    return output


def evaluate(predictions: Path, labels: Path, location: RunLocation) -> dict[str, dict[str, float]]:
    """{case: {class name: Dice}} by nnU-Net's evaluation (its summary.json beside the predictions)."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(location.plans)
    label_manager = plans_manager.get_label_manager(location.dataset_json)
    result = compute_metrics_on_folder(
        str(labels),
        str(predictions),
        str(predictions / "summary.json"),
        plans_manager.image_reader_writer_class(),
        location.dataset_json["file_ending"],
        label_manager.foreground_labels,
        label_manager.ignore_label,
        num_processes=max(1, default_num_processes),
    )
    names = {int(value): name for name, value in location.dataset_json["labels"].items() if int(value) != 0}
    per_case = {}
    ending = location.dataset_json["file_ending"]
    for entry in result["metric_per_case"]:
        case = os.path.basename(entry["prediction_file"])[: -len(ending)]
        per_case[case] = {names.get(int(label), str(label)): float(m["Dice"]) for label, m in entry["metrics"].items()}
    return per_case


def compare_models(
    location: RunLocation,
    base_folder: Path,
    tuned_folder: Path,
    output: Path,
    *,
    base_checkpoint: str = "checkpoint_final.pth",
    tuned_checkpoint: str = "checkpoint_final.pth",
    images: Optional[Path] = None,
    labels: Optional[Path] = None,
    device="cpu",
    mirroring: bool = True,
) -> dict:
    """Predict and score the cases with both models; per-class and mean Dice, paired differences. Writes
    `output/compare.json`, the predictions in `output/base` and `output/fine_tuned`."""
    if (images is None) != (labels is None):
        raise ValueError("give both the images folder (-i) and its labels folder (-l), or neither")
    if images is None:
        _, validation = location.fold_split()
        if not validation:
            raise ValueError(f"fold {location.fold} has no validation cases: give labeled cases with -i and -l")
        files, cases, label_folder = case_files(location, validation)
        source = f"validation cases of fold {location.fold} ({label_folder})"
    else:
        channels = len(location.dataset_json.get("channel_names", location.dataset_json.get("modality", {})))
        files, cases = folder_files(images, labels, location.dataset_json["file_ending"], channels)
        label_folder, source = Path(labels), f"{images} with labels {labels}"
    scores = {}
    for name, folder, checkpoint in (
        ("base", base_folder, base_checkpoint),
        ("fine_tuned", tuned_folder, tuned_checkpoint),
    ):
        predictions = predict(folder, location.fold, checkpoint, files, cases, output / name, device, mirroring)
        scores[name] = evaluate(predictions, label_folder, location)
    classes = sorted({label for case in scores["base"].values() for label in case})
    report = {
        "cases": source,
        "num_cases": len(cases),
        "models": {
            "base": str(Path(base_folder) / f"fold_{location.fold}" / base_checkpoint),
            "fine_tuned": str(Path(tuned_folder) / f"fold_{location.fold}" / tuned_checkpoint),
        },
        "mirroring": mirroring,
        "classes": {},
    }
    for label in [*classes, "mean"]:
        per_model = {
            name: {case: _case_value(values, label, classes) for case, values in by_case.items()}
            for name, by_case in scores.items()
        }
        report["classes"][label] = {
            "base": _nanmean(per_model["base"].values()),
            "fine_tuned": _nanmean(per_model["fine_tuned"].values()),
            "difference": paired_difference(per_model["base"], per_model["fine_tuned"]).to_json(),
        }
    report["per_case"] = scores
    save_json(report, output / COMPARE_JSON_NAME)
    return report


def _case_value(values: dict[str, float], label: str, classes: list[str]) -> float:
    if label != "mean":
        return values.get(label, math.nan)
    present = [values[c] for c in classes if c in values and not math.isnan(values[c])]
    return float(np.mean(present)) if present else math.nan


def _nanmean(values) -> float:
    array = np.array(list(values), dtype=np.float64)
    return float(np.nanmean(array)) if np.isfinite(array).any() else math.nan


def format_comparison(report: dict) -> str:
    """The per-class table: base, fine-tuned, paired difference in Dice points with its standard error, cases better."""
    header = f"{'class':<24}{'base':>9}{'fine-tuned':>12}{'difference (points)':>24}{'better / worse':>16}"
    lines = [f"{report['num_cases']} cases: {report['cases']}", header, "-" * len(header)]
    for label, figures in report["classes"].items():
        difference = figures["difference"]
        points = f"{difference['mean'] * 100:+.2f} ± {difference['standard_error'] * 100:.2f}"
        lines.append(
            f"{label:<24}{figures['base']:>9.4f}{figures['fine_tuned']:>12.4f}{points:>24}"
            f"{str(difference['better']) + ' / ' + str(difference['worse']):>16}"
        )
    return "\n".join(lines)
