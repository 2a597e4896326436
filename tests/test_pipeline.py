"""pipeline.prepare_pairs: the one path from a pool to a pairs file, and what it refuses or warns about; the judge's
life cycle beside the store (judging.py) and the audit's cross-fitting (audit/run.py)."""

from __future__ import annotations

import json

import pytest

from nnunet_rndpo.judging import JudgingError
from nnunet_rndpo.pairs import JUDGE_TOP, PairSettings
from nnunet_rndpo.pipeline import PairPreparationError, Ranks, prepare_pairs
from nnunet_rndpo.proposals.plan import ProposalSettings
from nnunet_rndpo.proposals.pool import labeled_training_pool, unlabeled_pool, validation_pool
from nnunet_rndpo.training.settings import PreferenceSettings


def pair_settings(**changes) -> PairSettings:
    """What a run with the default settings makes, with `changes` (the defaults' one home: the settings)."""
    return PairSettings.from_run_settings(PreferenceSettings(), **changes)


@pytest.fixture(scope="module")
def location_and_model(preprocessed_synthetic, tiny_configuration, base_checkpoint):
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.model import load_model

    return locate(preprocessed_synthetic.dataset_id, tiny_configuration, 0), load_model(base_checkpoint)


def in_sample_pool(location, cases: int = 2):
    """The fallback pool: the fold's own training cases (what discover_pool gives without imagesUnlabeled)."""
    pool = labeled_training_pool(location)
    pool.case_ids = pool.case_ids[:cases]
    pool.source = "training cases of fold 0 (labels ignored)"
    return pool


@pytest.mark.slow
def test_a_learning_judge_on_the_base_models_own_training_cases_is_refused(location_and_model, tmp_path):
    location, model = location_and_model
    settings = pair_settings(proposals=ProposalSettings(num_proposals=2), judge="learned_qc")
    with pytest.raises(PairPreparationError, match="in-sample"):
        prepare_pairs(
            location, model, settings, pool=in_sample_pool(location), store_folder=tmp_path / "store", progress=False
        )
    assert not (tmp_path / "store").exists(), "refused before any proposal was made"


@pytest.mark.slow
def test_a_pool_of_training_cases_is_said_loudly_and_pairs_are_written_once(location_and_model, tmp_path):
    location, model = location_and_model
    logged: list[str] = []
    pairs_file = tmp_path / "rndpo_pairs.json"
    settings = pair_settings(proposals=ProposalSettings(num_proposals=3), judge="agreement", selection=JUDGE_TOP)
    prepared = prepare_pairs(
        location,
        model,
        settings,
        pool=in_sample_pool(location),
        store_folder=tmp_path / "store",
        pairs_file=pairs_file,
        log=logged.append,
        progress=False,
    )
    assert any(line.startswith("WARNING: no imagesUnlabeled") for line in logged), logged
    record = json.loads(pairs_file.read_text())
    assert record == prepared.record and record["summary"]["strategy"] == JUDGE_TOP
    assert all(item["chosen"] == item["rejected"] for item in record["items"]) and len(record["items"]) == 2
    # a resumed run reads the file it started with, whatever the scores say now
    pairs_file.write_text(json.dumps({**record, "items": record["items"][:1]}))
    again = prepare_pairs(
        location,
        model,
        settings,
        pool=in_sample_pool(location),
        store_folder=tmp_path / "store",
        pairs_file=pairs_file,
        reuse_pairs_file=True,
        log=logged.append,
        progress=False,
    )
    assert len(again.items) == 1


def test_pair_settings_refuse_an_unknown_selection():
    with pytest.raises(ValueError, match="selection 'best'"):
        pair_settings(selection="best")


@pytest.mark.slow
def test_another_rank_reads_the_pairs_file_that_rank_0_wrote(location_and_model, tmp_path):
    location, model = location_and_model
    settings = pair_settings(proposals=ProposalSettings(num_proposals=3), judge="agreement", selection="top_rest")
    pool = validation_pool(location)
    first = prepare_pairs(location, model, settings, pool=pool, store_folder=tmp_path / "store", progress=False)
    # the pairs file of the store, made with these settings, is read as it is: no judge, no scores
    other = prepare_pairs(
        location,
        model,
        settings,
        pool=pool,
        store_folder=tmp_path / "store",
        make_proposals=False,
        ranks=Ranks(1, 2),
        log=lambda line: None,
        progress=False,
    )
    assert other.judge is None and other.pairs_file == first.pairs_file and other.record == first.record
    # other settings (another seed) are not those of the file: judged again (scores reused from the store)
    reseeded = prepare_pairs(
        location,
        model,
        pair_settings(proposals=ProposalSettings(num_proposals=3), judge="agreement", selection="top_rest", seed=1),
        pool=pool,
        store_folder=tmp_path / "store",
        make_proposals=False,
        log=lambda line: None,
        progress=False,
    )
    assert reseeded.judge is not None and reseeded.record["made_with"]["seed"] == 1


@pytest.fixture
def two_fold_base(base_checkpoint, tmp_path):
    """The base checkpoint as fold 0 and fold 1 of one trainer folder (nnU-Net's layout), outside the shared
    results folder so other tests never see the sibling."""
    import shutil

    folder = tmp_path / "TwoFold__nnUNetPlans__tiny"
    for fold in (0, 1):
        (folder / f"fold_{fold}").mkdir(parents=True)
        shutil.copy(base_checkpoint, folder / f"fold_{fold}" / base_checkpoint.name)
    return folder / "fold_0" / base_checkpoint.name


def fitting_examples(location, model, tmp_path, exclude=()):
    from nnunet_rndpo.judging import FittingExamples
    from nnunet_rndpo.proposals.store import ProposalStore

    store = ProposalStore(tmp_path / "store")
    settings = ProposalSettings(num_proposals=2, other_folds=True, sources=("tta", "checkpoint"))
    return FittingExamples(location, model, store, settings, "cpu", False, lambda message: None, exclude)


@pytest.mark.slow
def test_a_judge_that_learns_from_proposals_sees_only_cases_held_out_of_the_models_training(
    location_and_model, two_fold_base, tmp_path
):
    from nnunet_rndpo.proposals.model import load_model

    location, _ = location_and_model
    model = load_model(two_fold_base)
    made = fitting_examples(location, model, tmp_path)
    examples = made.held_out_predictions()
    validation_0, validation_1 = location.fold_split(0)[1], location.fold_split(1)[1]
    # both folds' validation cases, each with its own fold model's proposals, never a training case of that fold
    assert sorted(example.case_id for example in examples) == sorted(validation_0 + validation_1)
    assert all(example.true_labels is not None and example.proposal_count == 2 for example in examples)
    assert made.cases_read == set(validation_0 + validation_1)  # what the audit reads to cross-fit
    stores = sorted(path.name for path in tmp_path.iterdir() if "held_out" in path.name)
    assert stores == ["store__held_out_fold_0", "store__held_out_fold_1"]
    # the other fold's model trained on this fold's validation cases: no member of it in the held-out proposals
    from nnunet_rndpo.proposals.store import ProposalStore

    manifest = ProposalStore(tmp_path / "store__held_out_fold_0").manifest()
    assert manifest["settings"]["extra_checkpoints"] == [] and manifest["settings"]["sources"] == ["tta"]
    # the audit's cases are left out of what the judge learns from
    excluded = validation_0[:1]
    again = fitting_examples(location, model, tmp_path, exclude=excluded).held_out_predictions()
    assert sorted(example.case_id for example in again) == sorted(set(validation_0 + validation_1) - set(excluded))


@pytest.mark.slow
def test_learned_qc_without_any_held_out_case_says_what_to_train(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, tmp_path
):
    import shutil

    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.model import load_model

    # a model of fold 'all' (trained on every labeled case) with no sibling folds: nothing is held out
    fold_all = tmp_path / "AllFold__nnUNetPlans__tiny" / "fold_all"
    fold_all.mkdir(parents=True)
    shutil.copy(base_checkpoint, fold_all / base_checkpoint.name)
    location = locate(preprocessed_synthetic.dataset_id, tiny_configuration, "all")
    model = load_model(fold_all / base_checkpoint.name)
    with pytest.raises(JudgingError, match="no held-out examples.*fold all has no validation cases"):
        fitting_examples(location, model, tmp_path).held_out_predictions()


@pytest.mark.slow
def test_the_audit_scores_each_case_with_a_learned_judge_fitted_without_it(location_and_model, tmp_path, monkeypatch):
    from nnunet_rndpo import judging
    from nnunet_rndpo.audit import run as audit_run

    location, model = location_and_model
    fits = []
    real_ready_judge = judging.ready_judge

    def recording_ready_judge(*args):
        judge, learned_from = real_ready_judge(*args)
        fits.append((sorted(args[-1]), judge, learned_from))
        return judge, learned_from

    monkeypatch.setattr(audit_run, "ready_judge", recording_ready_judge)
    report = audit_run.run_audit(
        model,
        location,
        ["learned_qc", "anatomy"],
        ProposalSettings(num_proposals=2),
        tmp_path / "report",
        margin=0.02,
        seed=0,
        store_folder=tmp_path / "audit",
        progress=False,
    )
    pool = validation_pool(location)
    qc_fits = [fit for fit in fits if fit[1].display_name == "learned_qc"]
    # learned_qc learned from the audited cases (the fold's held-out predictions): fitted again on each half
    assert [excluded for excluded, _, _ in qc_fits] == [[], pool.case_ids[0::2], pool.case_ids[1::2]]
    assert set(pool.case_ids) <= qc_fits[0][2]
    scores = {entry["case_id"]: entry["scores"]["learned_qc"] for entry in report["per_case"]}
    for excluded, judge, learned_from in qc_fits[1:]:
        # fitted on the other cases' proposals only (2 per case), and it scored exactly the cases left out
        assert not set(excluded) & learned_from
        assert judge.training_samples == 2 * (len(pool.case_ids) - len(excluded))
        store = judging.ProposalStore(tmp_path / "audit")
        reader = judging.PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
        for case in judging.judge_inputs(store, reader, excluded, judging.foreground_labels(model)):
            assert scores[case.case_id] == pytest.approx(list(judge.score(case)))
    # anatomy learned from the training cases' label maps only: fitted once, never on an audited case
    anatomy_fits = [fit for fit in fits if fit[1].display_name == "anatomy"]
    assert len(anatomy_fits) == 1 and not set(pool.case_ids) & anatomy_fits[0][2]


@pytest.mark.slow
def test_proposals_of_other_folds_carry_their_model_to_the_judge(location_and_model, two_fold_base, tmp_path):
    from nnunet_rndpo import judging
    from nnunet_rndpo.judges import get_judge
    from nnunet_rndpo.proposals.model import load_model
    from nnunet_rndpo.proposals.run import generate_proposals

    location, _ = location_and_model
    model = load_model(two_fold_base)
    pool = validation_pool(location, location.fold_split(0)[1][:1])
    settings = ProposalSettings(num_proposals=4, sources=("tta", "checkpoint_tta", "ensemble"), other_folds=True)
    store, _ = generate_proposals(model, pool, tmp_path / "store", settings, progress=False)
    models = store.member_models()
    assert set(models) == {0, 1, "ensemble"} and models.count("ensemble") == 1
    reader = judging.PoolReader(pool, model.plans_manager, model.configuration_manager, model.dataset_json)
    labels = judging.foreground_labels(model)
    scores = judging.score_store(get_judge("agreement", to="other_models"), store, reader, pool.case_ids, labels)
    assert len(scores[pool.case_ids[0]]) == len(models)


@pytest.mark.slow
def test_the_audit_reports_one_judge_with_several_options_under_their_labels(location_and_model, tmp_path):
    import shutil

    from nnunet_rndpo.audit.run import run_audit

    location, model = location_and_model
    specs = [("oracle_exact", "oracle", {}), ("oracle_noisy", "oracle", {"noise_std": 0.5, "seed": 0}), "agreement"]
    store = location.store_folder(model.checkpoint_path)
    try:
        report = run_audit(
            model,
            location,
            specs,
            ProposalSettings(num_proposals=3),
            tmp_path / "a",
            margin=0.02,
            seed=0,
            progress=False,
        )
    finally:  # the audit's store lies beside the shared base's: leave none behind
        shutil.rmtree(store.parent / f"{store.name}__audit", ignore_errors=True)
    assert set(report["judges"]) == {"oracle_exact", "oracle_noisy", "agreement"}
    assert report["judges"]["oracle_exact"]["top1_hit_rate"] == 1.0
    assert report["judges"]["oracle_noisy"]["uses_labels"] and not report["judges"]["agreement"]["uses_labels"]
    assert report["recommendation"]["judge"] == "agreement"  # label-reading judges are never recommended


@pytest.mark.slow
def test_an_audit_of_other_proposals_keeps_them_in_its_own_store(location_and_model, tmp_path):
    from nnunet_rndpo.audit.run import run_audit
    from nnunet_rndpo.proposals.store import ProposalStore

    location, model = location_and_model
    default = location.store_folder(model.checkpoint_path)
    default_audit = default.parent / f"{default.name}__audit"
    assert not default_audit.exists()
    settings = ProposalSettings(num_proposals=3, sources=("tta", "ensemble"))
    report = run_audit(
        model,
        location,
        ["agreement"],
        settings,
        tmp_path / "a",
        margin=0.02,
        seed=0,
        progress=False,
        store_folder=tmp_path / "store",
    )
    assert not default_audit.exists()  # a store holds one setting's proposals: the default one is left alone
    manifest = ProposalStore(tmp_path / "store").manifest()
    assert manifest["settings"]["sources"] == ["tta", "ensemble"] and len(manifest["members"]) == 3
    assert report["proposals_per_case"] == {"min": 3, "max": 3}


@pytest.mark.slow
def test_a_resumed_run_reuses_its_pairs_without_fitting_the_judge_again(location_and_model, tmp_path):
    location, model = location_and_model
    pool = unlabeled_pool(location)
    pool.case_ids = pool.case_ids[:1]
    pairs_file = tmp_path / "rndpo_pairs.json"
    record = {"summary": {"pairs": 1}, "judge": "learned_qc (first start)", "items": [{"case_id": pool.case_ids[0]}]}
    pairs_file.write_text(json.dumps({**record, "items": [{**record["items"][0], "chosen": 1, "rejected": 0}]}))
    settings = pair_settings(proposals=ProposalSettings(num_proposals=2), judge="learned_qc")
    prepared = prepare_pairs(
        location,
        model,
        settings,
        pool=pool,
        store_folder=tmp_path / "store",
        pairs_file=pairs_file,
        reuse_pairs_file=True,
        log=lambda message: None,
        progress=False,
    )
    assert prepared.items == [{"case_id": pool.case_ids[0], "chosen": 1, "rejected": 0}]
    assert prepared.judge is None  # nothing judged: no held-out proposals were made to fit it
    assert not [path for path in tmp_path.iterdir() if "held_out" in path.name]


def test_held_out_settings_keep_only_the_base_models_members_and_as_many_as_they_give():
    from nnunet_rndpo.judging import single_model_settings

    cross_model = ProposalSettings(
        num_proposals=25, sources=("tta", "checkpoint", "checkpoint_tta", "ensemble"), extra_checkpoints=("a", "b")
    )
    single = single_model_settings(cross_model, mirror_axes=(0, 1, 2))
    # the plain pass, 7 mirror flips and the ensemble of them: the 16 other-network members are gone, not refilled
    assert single.sources == ("tta", "ensemble") and single.extra_checkpoints == () and single.num_proposals == 9
    # a stochastic source can give K members on its own: K stays
    dropout = ProposalSettings(num_proposals=12, sources=("dropout", "checkpoint"), extra_checkpoints=("a",))
    assert single_model_settings(dropout, mirror_axes=(0, 1, 2)).num_proposals == 12
    # no source of its own left: TTA, at most the plain pass and its flips
    only_others = ProposalSettings(num_proposals=16, sources=("checkpoint_tta",), other_folds=True)
    assert single_model_settings(only_others, mirror_axes=(0,)) == ProposalSettings(num_proposals=2, sources=("tta",))


@pytest.mark.slow
def test_judge_voxels_pairs_read_the_atlas_labels_kept_in_the_store(location_and_model, tmp_path, monkeypatch):
    """preference_region judge_voxels from pool to pairs file: the atlas judge's fused labels are kept beside its
    scores, each pair names them and keeps only voxels where they side with the chosen label; a second call reuses
    them (no registration); a judge without voxel probabilities is refused before any proposal is made."""
    import numpy as np

    from nnunet_rndpo.judges import AtlasJudge
    from nnunet_rndpo.preference_region import kept_voxels

    location, model = location_and_model
    atlas = {"registration": "affine", "max_atlases": 2}
    settings = pair_settings(
        proposals=ProposalSettings(num_proposals=3),
        judge="atlas",
        judge_options=atlas,
        preference_region="judge_voxels",
    )
    prepared = prepare_pairs(
        location, model, settings, pool=unlabeled_pool(location), store_folder=tmp_path / "store", progress=False
    )
    store, items = prepared.store, prepared.items
    assert items and prepared.record["summary"]["preference_region"] == "judge_voxels"
    for item in items:
        assert item["preference_voxels"] <= item["disagreement_voxels"]
        probabilities = store.load_voxel_probabilities(item["voxel_judge_key"], item["case_id"])
        assert probabilities.shape[0] == 3 and np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-2)
        proposals = store.load_case(item["case_id"])["proposals"]
        kept = kept_voxels(
            proposals, item["chosen"], item["rejected"], "judge_voxels", judge_probabilities=probabilities
        )
        assert np.count_nonzero(kept) == item["preference_voxels"]

    def no_registration(self, case):
        raise AssertionError("the kept scores and voxel probabilities should have been reused")

    monkeypatch.setattr(AtlasJudge, "score_with_voxels", no_registration)
    again = prepare_pairs(
        location, model, settings, pool=unlabeled_pool(location), store_folder=tmp_path / "store", progress=False
    )
    assert again.items == items

    refused = pair_settings(judge="agreement", preference_region="judge_voxels")
    with pytest.raises(PairPreparationError, match="judge 'agreement' has none. Judges that have them: atlas"):
        prepare_pairs(location, model, refused, pool=unlabeled_pool(location), store_folder=tmp_path / "other")
    assert not (tmp_path / "other").exists()
