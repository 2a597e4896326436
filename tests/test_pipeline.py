"""pipeline.prepare_pairs: the one path from a pool to a pairs file, and what it refuses or warns about."""

from __future__ import annotations

import json

import pytest

from nnunet_rndpo.pipeline import JUDGE_TOP, PairPreparationError, PairSettings, prepare_pairs
from nnunet_rndpo.proposals.members import ProposalSettings


@pytest.fixture(scope="module")
def location_and_model(preprocessed_synthetic, tiny_configuration, base_checkpoint):
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.proposals.model import load_model

    return locate(preprocessed_synthetic.dataset_id, tiny_configuration, 0), load_model(base_checkpoint)


def in_sample_pool(location, cases: int = 2):
    """The fallback pool: the fold's own training cases (what discover_pool gives without imagesUnlabeled)."""
    pool = location.labeled_training_pool()
    pool.case_ids = pool.case_ids[:cases]
    pool.source = "training cases of fold 0 (labels ignored)"
    return pool


@pytest.mark.slow
def test_a_learning_judge_on_the_base_models_own_training_cases_is_refused(location_and_model, tmp_path):
    location, model = location_and_model
    settings = PairSettings(proposals=ProposalSettings(num_proposals=2), judge="learned_qc")
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
    settings = PairSettings(proposals=ProposalSettings(num_proposals=3), judge="agreement", selection=JUDGE_TOP)
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
        PairSettings(selection="best")


@pytest.mark.slow
def test_another_rank_reads_the_pairs_file_that_rank_0_wrote(location_and_model, tmp_path):
    location, model = location_and_model
    settings = PairSettings(proposals=ProposalSettings(num_proposals=3), judge="agreement", selection="top_rest")
    pool = location.validation_pool()
    first = prepare_pairs(location, model, settings, pool=pool, store_folder=tmp_path / "store", progress=False)
    other = prepare_pairs(
        location,
        model,
        settings,
        pool=pool,
        store_folder=tmp_path / "store",
        make_proposals=False,
        rank=1,
        world_size=2,
        log=lambda line: None,
        progress=False,
    )
    assert other.judge is None and other.pairs_file == first.pairs_file and other.record == first.record
