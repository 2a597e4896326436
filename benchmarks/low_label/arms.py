"""An arm of the benchmark as a value: what was trained (or scored) and how, field by field. Its name, the name of
its result file and of its nnU-Net model folder, is derived from the fields in one place (`Arm.group`); plans build
arms from fields, and the report groups and pairs them by fields. `arm_from_record` reads the arm a result JSON
holds, in today's format or the older one (name, kind, seed, judge, mining, settings), into the same value."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Union

from benchmarks.low_label.catalogue import PREFERENCE_VARIANTS

BASE_KINDS = ("base", "upper")  # trained with labels only
PREFERENCE_KINDS = ("rn_dpo", "dpo")
FINE_TUNING_KINDS = (*PREFERENCE_KINDS, "self_train")
FOLD_ENSEMBLE = "ensemble"  # `Arm.fold` of the ensemble of every fold's model
MIRROR_PASSES = 8  # the plain pass and 7 mirror flips over 3 axes: nnU-Net's test-time mirroring


@dataclass(frozen=True)
class Arm:
    kind: str  # base | upper | rn_dpo | dpo | self_train
    seed: int
    judge: Optional[str] = None  # a catalogue.JUDGES key
    mining: str = "top_bottom"
    variant: Optional[str] = None  # a catalogue.PREFERENCE_VARIANTS key: the preference term's setting
    # self-training at this many times the fine-tuning learning rate: the step-matched control for RN-DPO at that
    # SFT weight (see plans.at_larger_step)
    step: Optional[float] = None
    # None: the base's own mirror members; `seeds_0_1_2`: every base of those seeds (cross-seed proposals). A fold
    # model's fine-tuning takes every fold's members (the folds protocol's only proposals, so not named)
    proposals: Optional[str] = None
    # the folds protocol: the fold (0-4) whose model this is, or FOLD_ENSEMBLE for the ensemble of every fold's model
    fold: Union[int, str, None] = None
    mirroring: bool = False  # scored with nnU-Net's test-time mirroring (the ensemble of nnUNetv2_predict's default)
    # a package default an early arm ran under and its file is named for (v1's `nosft_`: no SFT anchor, beta 1)
    legacy: Optional[str] = None
    # what it runs with beyond its fields (proposal settings, the variant's settings, a learning rate): read from
    # the fields by the plans, so not part of the identity
    settings: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def group(self) -> str:
        """The arm's name without its seed: `<kind>_<judge>_<tags>_<proposals>_<fold>`, each part where set. The
        tags: the mining (where it is not top_bottom; the mirror-member RN-DPO and DPO arms of v1-v3 name it always,
        `rn_dpo_agreement_top_bottom`), the preference variant (`rn_dpo_atlas_margin_sft3`), the step
        (`self_train_atlas_lr3x`)."""
        named_mining = self.mining != "top_bottom" or (
            self.kind in PREFERENCE_KINDS and self.variant is None and self.proposals is None and self.fold is None
        )
        fold = None if self.fold is None else "folds" if self.fold == FOLD_ENSEMBLE else f"fold{self.fold}"
        parts = (
            self.legacy,
            self.kind,
            self.judge,
            self.mining if named_mining else None,
            self.variant,
            None if self.step is None else f"lr{self.step:g}x",
            self.proposals,
            fold,
            "tta" if self.mirroring else None,
        )
        return "_".join(part for part in parts if part)

    @property
    def name(self) -> str:
        """`<group>_s<seed>`: the arm's result file (`arms/<name>.json`) and, outside the folds protocol, its model."""
        return f"{self.group}_s{self.seed}"

    @property
    def model_name(self) -> str:
        """The nnU-Net model the arm trains (its trainer class `Bench_<model_name>`): the arm itself, or for a fold
        arm the model of every fold (`base_folds_s0`, nnU-Net's layout `<Trainer>__<Plans>__<config>/fold_F`)."""
        model = replace(self, mirroring=False)  # scoring with mirroring uses the model the arm without it trained
        return model.name if self.fold is None else replace(model, fold=FOLD_ENSEMBLE).name

    @property
    def base(self) -> "Arm":
        """The base model a fine-tuning arm continues from (the same seed and fold)."""
        return Arm("base", self.seed, fold=self.fold)

    @property
    def trains(self) -> bool:
        """Whether running it trains a model: the ensemble of a model's folds, and an arm scored with mirroring,
        only score the models other arms trained."""
        return self.fold != FOLD_ENSEMBLE and not self.mirroring

    def network_passes(self, folds: int = 1) -> int:
        """Network passes per case (per sliding-window tile) when scored: one per model, times the mirror passes."""
        models = folds if self.fold == FOLD_ENSEMBLE else 1
        return models * (MIRROR_PASSES if self.mirroring else 1)


IDENTITY = tuple(f.name for f in fields(Arm) if f.name != "settings")


def arm_record(arm: Arm) -> dict:
    """What a result JSON holds under "arm": every field and the derived name (read back by `arm_from_record`)."""
    return {"name": arm.name, **{name: getattr(arm, name) for name in IDENTITY}, "settings": arm.settings}


class ArmRecordError(ValueError):
    pass


_BASE_CHECKPOINT_SEED = re.compile(r"Bench_base_s(\d+)__")
_NOT_VARIANT_SETTINGS = ("proposals", "proposal_store", "initial_lr")


def arm_from_record(record: dict, tune_lr: Optional[float] = None, file_stem: Optional[str] = None) -> Arm:
    """The Arm of a result JSON's "arm" record. Records written before the fields existed (name, kind, seed, judge,
    mining, settings) are read from their settings: the cross-seed ensemble from the extra checkpoints' base seeds,
    the step from the learning rate over `tune_lr` (the result's schedule), the variant as the PREFERENCE_VARIANTS
    setting the rest equals; a file named with a prefix before the recorded name ran under an older default
    (`legacy`). The arm's derived name must equal the recorded one and the file's: else ArmRecordError."""
    if "variant" in record:  # today's format
        arm = Arm(**{name: record[name] for name in IDENTITY if name in record}, settings=record.get("settings", {}))
    else:
        settings = dict(record.get("settings") or {})
        arm = Arm(
            kind=record["kind"],
            seed=record["seed"],
            judge=record.get("judge"),
            mining=record.get("mining", "top_bottom"),
            variant=_variant_of(settings, record),
            step=_step_of(settings, tune_lr, record),
            proposals=_ensemble_of(settings, record["seed"]),
            legacy=_legacy_prefix(record["name"], file_stem),
            settings=settings,
        )
    recorded = record.get("name", arm.name) if arm.legacy is None else f"{arm.legacy}_{record['name']}"
    for expected in (recorded, file_stem):
        if expected is not None and arm.name != expected:
            raise ArmRecordError(f"arm record {record.get('name')!r} ({file_stem}) reads as {arm.name!r}")
    return arm


def _variant_of(settings: dict, record: dict) -> Optional[str]:
    own = {key: value for key, value in settings.items() if key not in _NOT_VARIANT_SETTINGS}
    if not own:
        return None
    for variant, setting in PREFERENCE_VARIANTS.items():
        if setting == own:
            return variant
    raise ArmRecordError(f"arm {record.get('name')!r}: settings {own} are no preference variant")


def _step_of(settings: dict, tune_lr: Optional[float], record: dict) -> Optional[float]:
    if "initial_lr" not in settings:
        return None
    if not tune_lr:
        raise ArmRecordError(f"arm {record.get('name')!r} has its own learning rate but its result no schedule")
    return round(settings["initial_lr"] / tune_lr, 6)


def _ensemble_of(settings: dict, seed: int) -> Optional[str]:
    extra = (settings.get("proposals") or {}).get("extra_checkpoints") or []
    seeds = {seed, *(int(match.group(1)) for path in extra if (match := _BASE_CHECKPOINT_SEED.search(path)))}
    return "seeds_" + "_".join(str(each) for each in sorted(seeds)) if extra else None


def _legacy_prefix(name: str, file_stem: Optional[str]) -> Optional[str]:
    if file_stem is None or file_stem == name or not file_stem.endswith(f"_{name}"):
        return None
    return file_stem[: -len(name) - 1]
