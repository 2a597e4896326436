"""The folds protocol's plan (issue 33): can one fine-tuned fold model replace nnU-Net's five-fold ensemble?

1. bases: the five fold models (stock nnUNetTrainer, one model folder `Bench_base_folds_s0`, fold_0 ... fold_4),
   each scored alone on the validation and test cases;
2. base_ensemble: nnU-Net's ensemble of the five (the folds' logits averaged, as `nnUNetv2_predict -f 0 1 2 3 4`),
   scored as every arm is (no mirroring: 5 network passes per case) and with nnU-Net's default test-time mirroring
   (40 passes);
3. audit: every label-free judge (learned_qc fitted on the folds' held-out predictions, its cross-validated path)
   and their combinations on fold 0's proposals from all five models (`other_folds`), on the validation cases;
4. fold0: fold 0 fine-tuned with RN-DPO (at the settings v3 measured with, and at the package's defaults: SFT
   weight 3, and the agreement judge where the audit's best is another), self-training and step-matched
   self-training under the best label-free judge; validation chooses the recipe;
5. folds: every fold fine-tuned with the recipe (RN-DPO and its step-matched self-training: fold 0 measured plain
   self-training beside it; carrying one control on the other folds saves four trainings of a 2-core CPU), and the
   five fine-tuned models of each method as an ensemble, without and with mirroring.
Every choice reads the validation cases (in no fold); the test cases are never used for one."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Optional

from benchmarks.low_label.arms import FOLD_ENSEMBLE, Arm
from benchmarks.low_label.catalogue import (
    CROSS_MODEL_JUDGES,
    CROSS_MODEL_SOURCES,
    MEASURED_WITH,
    MEMBERS_PER_NETWORK,
    PREFERENCE_VARIANTS,
    sft_weight_of,
)
from benchmarks.low_label.plans import at_larger_step, best_label_free
from benchmarks.low_label.results import validation_dice
from benchmarks.low_label.scheduling import QUEUE, SPLIT, Context, Stage, result_file, wait_for

SEED = 0
PACKAGE_DEFAULTS = ("agreement", "sft3")  # the package's default judge and SFT weight (PreferenceSettings)
AUDIT_FOLDER = "audit_folds"


def base_arms(folds: int) -> list[Arm]:
    return [Arm("base", SEED, fold=fold) for fold in range(folds)]


def ensemble_arms(model: Arm) -> list[Arm]:
    """The ensemble of every fold of `model`'s model, scored without and with nnU-Net's test-time mirroring."""
    return [replace(model, fold=FOLD_ENSEMBLE, mirroring=mirroring) for mirroring in (False, True)]


def fold_proposals(folds: int) -> dict:
    """A fold model's proposals: its own plain pass and mirror members, each other fold's model's, and nnU-Net's
    ensemble of every pass (`other_folds` finds the sibling folds beside the base checkpoint)."""
    return {
        "sources": list(CROSS_MODEL_SOURCES),
        "other_folds": True,
        "num_proposals": MEMBERS_PER_NETWORK * folds + 1,
    }


def recipe_arms(
    context: Context, fold: int, judge: str, variant: Optional[str], every_control: bool = True
) -> list[Arm]:
    """RN-DPO with `judge` under `variant` (None: the settings v3 measured with) on the fold's proposals, and its
    step-matched self-training with the same judge and proposals: self-training itself, or where the variant raises
    the SFT weight, self-training at that times the step (`at_larger_step`). `every_control`: plain self-training
    too (fold 0 measures both; the other folds carry the step-matched one). The fold's arms share one proposal
    store."""
    folds, schedule = context.bench.protocol.folds, context.bench.schedule
    settings = {"proposals": fold_proposals(folds), "proposal_store": str(context.work / "proposals" / f"fold{fold}")}
    variant_settings = PREFERENCE_VARIANTS[variant] if variant else {}
    rn_dpo = Arm("rn_dpo", SEED, judge, fold=fold, variant=variant, settings={**settings, **variant_settings})
    self_train = Arm("self_train", SEED, judge, fold=fold, settings=settings)
    weight = sft_weight_of(variant)
    step_matched = at_larger_step(self_train, weight, schedule) if weight != MEASURED_WITH["sft_weight"] else self_train
    controls = [self_train, step_matched] if every_control else [step_matched]
    return list(dict.fromkeys([rn_dpo, *controls]))


def fold0_arms(context: Context) -> list[Arm]:
    """Fold 0's candidates: RN-DPO with the best label-free judge at v3's settings and at the package's default SFT
    weight with its self-training controls, and RN-DPO at the package's defaults (judge too) where they differ."""
    best = context.choices["best"]
    arms = recipe_arms(context, 0, best, None) + recipe_arms(context, 0, best, PACKAGE_DEFAULTS[1])
    if best != PACKAGE_DEFAULTS[0]:
        arms += recipe_arms(context, 0, *PACKAGE_DEFAULTS)[:1]
    return list(dict.fromkeys(arms))  # the shared self-training arm once


def stages() -> list[Stage]:
    def audit(context: Context, _results) -> None:
        from benchmarks.low_label.runner import audit_on_validation, prepare_start_phase

        bench = context.bench
        label_free = (*bench.protocol.label_free, *CROSS_MODEL_JUDGES)
        if context.parts.part_id == 0:
            split = json.loads((context.work / "split.json").read_text())
            proposals = fold_proposals(bench.protocol.folds)
            audit_on_validation(bench, SEED, label_free, proposals, AUDIT_FOLDER, 0, split["validation"])
        elif not (context.work / AUDIT_FOLDER / "judge_audit.json").is_file():
            # meanwhile the other parts make the pool proposals every fold-0 arm shares (whichever its judge), in
            # the start phase of one of them
            prepare_start_phase(recipe_arms(context, 0, PACKAGE_DEFAULTS[0], None)[0], bench)
        audit = json.loads(wait_for(context.work / AUDIT_FOLDER / "judge_audit.json").read_text())
        best = best_label_free(audit, label_free)
        print(f"best label-free judge on fold 0's proposals: {best} (top-1 lift {audit['judges'][best]['top1_lift']})")
        context.choices["best"] = best

    def choose_recipe(context: Context, results: dict) -> None:
        rn_dpo = {arm: result for arm, result in results.items() if arm.kind == "rn_dpo"}
        if rn_dpo:
            chosen = max(rn_dpo, key=lambda arm: validation_dice(rn_dpo[arm]))
            context.choices["recipe"] = (chosen.judge, chosen.variant)
            print(f"recipe chosen on fold 0's validation: {chosen.name}", flush=True)

    def other_folds_start_phase(context: Context) -> None:
        """While another part trains fold 0's last arms: the other folds' start phase under the best judge (each
        fold's store, copied from fold 0's, and the judge's scores on it), which their arms read if validation
        chooses that judge (its scores on a fold are every variant's)."""
        from benchmarks.low_label.runner import prepare_start_phase

        results = [result_file(context.work, arm) for arm in fold0_arms(context)]
        for fold in range(1, context.bench.protocol.folds):
            if all(result.is_file() for result in results):
                return  # the recipe is chosen: the folds' arms make what they need (a fold's scores take minutes)
            prepare_start_phase(recipe_arms(context, fold, context.choices["best"], None)[-1], context.bench)

    def all_folds(context: Context) -> list[Arm]:
        """Every fold fine-tuned with the recipe (RN-DPO and its step-matched self-training; fold 0's are fold0's
        arms) and each method's five models as an ensemble, in the order the targets read them: fold 0's pair
        (RN-DPO against its control), the other folds' RN-DPO and their ensemble, then the controls' folds and
        ensemble. An ensemble waits in the queue, behind arms a part can run, until its five folds are there."""
        if "recipe" not in context.choices:
            return []
        judge, variant = context.choices["recipe"]
        by_fold = [
            recipe_arms(context, fold, judge, variant, every_control=False)
            for fold in range(context.bench.protocol.folds)
        ]
        rn_dpo, control = ([arms[index] for arms in by_fold] for index in (0, -1))
        return [*by_fold[0], *rn_dpo[1:], *ensemble_arms(rn_dpo[0]), *control[1:], *ensemble_arms(control[0])]

    return [
        Stage("bases", lambda context: base_arms(context.bench.protocol.folds)),
        # nothing later reads the base ensembles but the report: a part goes on to the audit without waiting
        Stage("base_ensemble", lambda context: ensemble_arms(Arm("base", SEED)), share=SPLIT),
        Stage("audit", lambda context: [], then=audit),
        Stage("fold0", fold0_arms, then=choose_recipe, meanwhile=other_folds_start_phase),
        Stage("folds", all_folds, share=QUEUE),
    ]
