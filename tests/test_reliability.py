"""Reliability: bad input fails with an error that names the file, case or option, and nothing half-written is
left behind; runs killed with SIGKILL resume and finish; the same seed gives the same pairs.

Nothing here modifies Dataset901's files. Tests that need their own unlabeled images build a raw dataset folder
and a preprocessed root under tmp_path; the subprocess tests use a copy of the base checkpoint under a folder
name of their own, so their proposal store (named after that folder) is theirs alone and is removed afterwards.
The training subprocess uses nnUNetTrainerDPO with a short schedule (test_trainers: RNDPO and SelfTrain).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from nnunet_rndpo import nnunet_paths
from nnunet_rndpo.atomic import TEMP_SUFFIX
from nnunet_rndpo.judges import JudgeError
from nnunet_rndpo.mining import MINING_STRATEGIES
from nnunet_rndpo.nnunet_paths import default_store_folder
from nnunet_rndpo.proposals.plan import ProposalSettings, plan_members
from nnunet_rndpo.proposals.pool import UNLABELED_FOLDER, PoolError, PoolReader, discover_pool
from nnunet_rndpo.proposals.store import ProposalStore

DATASET_NAME = "Dataset999_Reliability"  # only ever under tmp_path
LABELS = (1, 2)
SUBPROCESS_TIMEOUT_S = 300


def partial_files(*folders: Path) -> list[Path]:
    """Temporaries of atomic writes (`.<name>.<random>.partial`) anywhere below `folders`."""
    return [p for folder in folders if folder.exists() for p in folder.rglob(f"*{TEMP_SUFFIX}")]


# ================================================================================================ bad pool input
def one_channel_json() -> dict:
    return {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": 10,
        "file_ending": ".nii.gz",
    }


def make_raw_pool(tmp_path: Path, files: dict[str, bytes | Path], dataset_json: dict) -> Path:
    """A raw root with DATASET_NAME/imagesUnlabeled holding `files` (bytes, or a file to copy)."""
    folder = tmp_path / "raw" / DATASET_NAME / UNLABELED_FOLDER
    folder.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, folder / name)
        else:
            (folder / name).write_bytes(content)
    (folder.parent / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


def discover(tmp_path: Path, dataset_json: dict, data_identifier: str = "nnUNetPlans_3d_fullres"):
    return discover_pool(tmp_path / "raw", tmp_path / "preprocessed", DATASET_NAME, dataset_json, data_identifier, 0)


def test_wrong_file_ending_names_the_file(tmp_path):
    make_raw_pool(tmp_path, {"case_a_0000.nii.gz": b"", "case_b_0000.mha": b""}, one_channel_json())
    with pytest.raises(PoolError, match=r"case_b_0000\.mha: not an nnU-Net image name.*file_ending is '\.nii\.gz'"):
        discover(tmp_path, one_channel_json())
    # the same with an uncompressed NIfTI in a .nii.gz dataset
    shutil.rmtree(tmp_path / "raw")
    make_raw_pool(tmp_path, {"case_a_0000.nii": b""}, one_channel_json())
    with pytest.raises(PoolError, match=r"case_a_0000\.nii: not an nnU-Net image name"):
        discover(tmp_path, one_channel_json())


def test_extra_or_missing_channel_names_the_case(tmp_path):
    # a second channel in a one-channel dataset
    make_raw_pool(
        tmp_path, {"case_a_0000.nii.gz": b"", "case_b_0000.nii.gz": b"", "case_b_0001.nii.gz": b""}, one_channel_json()
    )
    with pytest.raises(
        PoolError, match=r"unlabeled case 'case_b' .* has channel\(s\) \[0, 1\]; dataset.json declares 1 channel"
    ):
        discover(tmp_path, one_channel_json())
    # channel 0 missing
    shutil.rmtree(tmp_path / "raw")
    make_raw_pool(tmp_path, {"case_c_0001.nii.gz": b""}, one_channel_json())
    with pytest.raises(PoolError, match=r"unlabeled case 'case_c' .* has channel\(s\) \[1\]"):
        discover(tmp_path, one_channel_json())


@pytest.fixture(scope="module")
def base_model(base_checkpoint):
    import torch

    from nnunet_rndpo.proposals.model import load_model

    torch.set_num_threads(1)
    return load_model(base_checkpoint)


@pytest.fixture(scope="module")
def good_image(synthetic_dataset) -> Path:
    images = sorted((synthetic_dataset.raw_folder / UNLABELED_FOLDER).glob("*_0000.nii.gz"))
    assert images, "the synthetic dataset has no unlabeled images"
    return images[0]


def write_image(path: Path, shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0)) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.random.default_rng(0).random(shape).astype(np.float32))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def assert_nothing_cached_for(pool, case_id: str) -> None:
    cache = pool.cache_folder
    leftovers = sorted(p.name for p in cache.iterdir() if case_id in p.name) if cache.exists() else []
    assert leftovers == [], f"half-made cache entries for {case_id}: {leftovers}"
    assert partial_files(cache) == []


@pytest.mark.slow
def test_unreadable_nifti_names_case_and_file_and_caches_nothing(tmp_path, base_model, good_image):
    folder = make_raw_pool(
        tmp_path,
        {"case_a_0000.nii.gz": good_image, "case_b_0000.nii.gz": b"\x1f\x8b garbage, not a NIfTI"},
        base_model.dataset_json,
    )
    pool = discover(tmp_path, base_model.dataset_json, base_model.configuration_manager.data_identifier)
    assert pool.case_ids == ["case_a", "case_b"]  # names alone are fine; the content is read later
    reader = PoolReader(pool, base_model.plans_manager, base_model.configuration_manager, base_model.dataset_json)
    reader.load("case_a")
    bad_file = re.escape(str(folder / "case_b_0000.nii.gz"))
    with pytest.raises(PoolError, match=rf"unlabeled case 'case_b' could not be read or preprocessed \({bad_file}\)"):
        reader.load("case_b")
    assert_nothing_cached_for(pool, "case_b")
    assert (pool.cache_folder / "case_a.b2nd").is_file()  # the good case is cached (nnU-Net's blosc2 layout)


@pytest.mark.slow
def test_channels_of_different_geometry_name_the_case(tmp_path, base_model):
    # A two-channel variant of the dataset: the channels of case_b disagree in size and spacing.
    dataset_json = {**base_model.dataset_json, "channel_names": {"0": "T1", "1": "T2"}}
    make_raw_pool(tmp_path, {}, dataset_json)
    folder = tmp_path / "raw" / DATASET_NAME / UNLABELED_FOLDER
    write_image(folder / "case_b_0000.nii.gz")
    write_image(folder / "case_b_0001.nii.gz", shape=(40, 40, 36), spacing=(1.0, 1.0, 1.2))
    pool = discover(tmp_path, dataset_json, base_model.configuration_manager.data_identifier)
    reader = PoolReader(pool, base_model.plans_manager, base_model.configuration_manager, dataset_json)
    with pytest.raises(PoolError) as caught:
        reader.load("case_b")
    message = str(caught.value)
    assert re.match(
        r"unlabeled case 'case_b' could not be read or preprocessed \(.*case_b_0000\.nii\.gz, .*case_b_0001\.nii\.gz\)",
        message,
    ), message
    # what nnU-Net's reader found wrong (it prints that and raises an empty RuntimeError) is in the message
    assert "not all input images have the same shape" in message.lower() and "(1, 40, 40, 36)" in message, message
    assert_nothing_cached_for(pool, "case_b")


@pytest.mark.slow
def test_bad_case_stops_generation_with_finished_cases_kept_whole(tmp_path, base_model, good_image):
    from nnunet_rndpo.proposals.run import generate_proposals

    make_raw_pool(
        tmp_path,
        {"case_a_0000.nii.gz": good_image, "case_b_0000.nii.gz": b"not an image at all"},
        base_model.dataset_json,
    )
    pool = discover(tmp_path, base_model.dataset_json, base_model.configuration_manager.data_identifier)
    store_folder = tmp_path / "store"
    with pytest.raises(PoolError, match=r"unlabeled case 'case_b'.*case_b_0000\.nii\.gz"):
        generate_proposals(base_model, pool, store_folder, ProposalSettings(num_proposals=2), progress=False)
    store = ProposalStore(store_folder)
    assert store.case_ids() == ["case_a"] and store.verify() == []
    assert partial_files(tmp_path) == []
    assert not (store.cases_folder / "case_b.npz").exists()


# ================================================================================================ pools without pairs
class ArrayReader:
    """Stands in for PoolReader: the preprocessed image of each case."""

    def __init__(self, images: dict[str, np.ndarray]):
        self.images = images

    def load(self, case_id: str):
        return self.images[case_id], np.zeros((1, *self.images[case_id].shape[1:]), np.int8), {}


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return np.sqrt(((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0)) <= radius


def fake_store(folder: Path, cases: dict[str, np.ndarray], k: int) -> ProposalStore:
    """A store of hand-made proposals: `cases` maps a case to its (K, *spatial) label maps."""
    settings = ProposalSettings(num_proposals=k, sources=("temperature",))
    manifest = {
        "dataset": DATASET_NAME,
        "plans": "nnUNetPlans",
        "configuration": "3d_tiny",
        "fold": 0,
        "checkpoint": "/models/checkpoint_final.pth",
        "checkpoint_sha256": "0" * 64,
        "settings": settings.to_dict(),
        "members": [m.to_dict() for m in plan_members(settings, (0, 1, 2))],
    }
    store = ProposalStore(folder).open(manifest)
    for case_id, proposals in cases.items():
        one_hot = np.eye(3, dtype=np.float32)[proposals.astype(np.int64)].mean(0)  # (*spatial, 3)
        probabilities = 0.9 * np.moveaxis(one_hot, -1, 0) + 0.1 / 3  # the base model agreeing with the masks
        store.save_case(case_id, proposals.astype(np.uint8), probabilities, case_seed=0)
    return store


def identical_cases(empty: bool, count: int = 3, k: int = 4, shape=(16, 16, 16)) -> dict[str, np.ndarray]:
    cases = {}
    for index in range(count):
        mask = np.zeros(shape, np.uint8)
        if not empty:
            mask[ball(shape, (8, 8, 8 + index * 0.5), 5)] = 1
            mask[ball(shape, (8, 8, 12), 2.5)] = 2
        cases[f"case_{index}"] = np.repeat(mask[None], k, axis=0)
    return cases


@pytest.mark.parametrize("workers", [1, 2])
def test_a_case_another_process_is_scoring_with_the_same_judge_is_left_to_it(tmp_path, monkeypatch, workers):
    """Two trainings on one store and judge (the benchmark's RN-DPO and self-training arms of a fold) score each case
    once, whether they score in one process or in workers: a case held by the other process is read from the score
    it writes."""
    import json
    import os

    from nnunet_rndpo import atomic, judging
    from nnunet_rndpo.judges import get_judge

    cases = identical_cases(False)
    store = fake_store(tmp_path / "store", cases, k=4)
    reader = ArrayReader({c: np.zeros((1, 16, 16, 16), dtype=np.float32) for c in cases})
    judge = get_judge("agreement")
    folder = judging.scores_folder(store, judge)
    held = "case_1"
    folder.mkdir(parents=True)
    (folder / f".{held}.claim").write_text(str(os.getppid()))  # a live process: this test's parent
    scored = []
    original = judging._CaseScorer.__call__

    def scoring_here(scorer, case_id):
        scored.append(case_id)
        return original(scorer, case_id)

    monkeypatch.setattr(judging._CaseScorer, "__call__", scoring_here)
    other_scores = [0.25, 0.5, 0.75, 1.0]  # not the agreement judge's: proves whose score was read

    def the_other_process_writes_its_score():
        # what the other process's scorer writes for the held case, then its claim goes
        atomic.save_json({"judge": judge.describe(), "scores": other_scores}, folder / f"{held}.json")
        (folder / f".{held}.claim").unlink()

    monkeypatch.setattr(atomic, "wait_for_claims", the_other_process_writes_its_score)
    scores = judging.score_store(judge, store, reader, sorted(cases), LABELS, progress=False, workers=workers)
    assert sorted(scores) == sorted(cases) and scores[held] == other_scores
    assert scored == (["case_0", "case_2"] if workers == 1 else [])  # the workers scored the other two
    for case_id in ("case_0", "case_2"):
        assert scores[case_id] == json.loads((folder / f"{case_id}.json").read_text())["scores"] != other_scores
    assert not list(folder.glob(".*.claim"))


@pytest.mark.parametrize("empty", [False, True], ids=["identical_proposals", "all_background"])
def test_pool_without_any_pair(tmp_path, empty):
    from nnunet_rndpo.judges import get_judge
    from nnunet_rndpo.judging import score_store
    from nnunet_rndpo.pairs import mine_store

    cases = identical_cases(empty)
    store = fake_store(tmp_path / "store", cases, k=4)
    reader = ArrayReader({c: np.random.default_rng(0).random((1, 16, 16, 16), dtype=np.float32) for c in cases})
    for name in ("agreement", "uncertainty", "virtual_annotator"):
        judge = get_judge(name)  # virtual_annotator unfitted: its fallback statistics
        scores = score_store(judge, store, reader, sorted(cases), LABELS, progress=False)
        assert sorted(scores) == sorted(cases)
        assert all(len(s) == 4 and np.all(np.isfinite(s)) for s in scores.values()), f"{name}: {scores}"
        for strategy in MINING_STRATEGIES:
            mined = mine_store(store, scores, strategy, 0.02, seed=0)
            summary = mined.summary()
            assert mined.pairs == (), f"{name}/{strategy} mined {mined.pairs}"
            assert summary["cases_all_identical"] == summary["cases_without_pair"] == len(cases), summary
            assert np.isfinite(summary["mean_disagreement_voxels"])
    assert partial_files(store.folder) == []


# ================================================================================================ failing judges
USER_JUDGES = """
import numpy as np
from nnunet_rndpo.judges import Judge


class RaisingJudge(Judge):
    name = "raises_on_case_1"

    def score(self, case):
        if case.case_id == "case_1":
            raise RuntimeError("the QC service is down")
        return np.arange(case.proposal_count, dtype=float)


class NaNJudge(Judge):
    name = "nan_on_case_1"

    def score(self, case):
        scores = np.arange(case.proposal_count, dtype=float)
        if case.case_id == "case_1":
            scores[2] = np.nan
        return scores
"""


@pytest.fixture
def user_judges(tmp_path, monkeypatch):
    module = f"reliability_judges_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / f"{module}.py").write_text(textwrap.dedent(USER_JUDGES))
    monkeypatch.syspath_prepend(str(folder))
    yield module
    sys.modules.pop(module, None)


@pytest.mark.parametrize(
    "judge_class, message",
    [
        ("RaisingJudge", r"judge 'raises_on_case_1' on case 'case_1' failed: RuntimeError: the QC service is down"),
        (
            "NaNJudge",
            r"judge 'nan_on_case_1' on case 'case_1' returned non-finite scores \(NaN or inf\) for proposals \[2\]",
        ),
    ],
)
def test_failing_user_judge_names_judge_and_case_and_writes_no_scores(tmp_path, user_judges, judge_class, message):
    from nnunet_rndpo.judges import get_judge
    from nnunet_rndpo.judging import score_store

    cases = {
        f"case_{i}": np.stack(
            [np.zeros((8, 8, 8), np.uint8), np.ones((8, 8, 8), np.uint8), np.full((8, 8, 8), 2, np.uint8)]
        )
        for i in range(3)
    }
    store = fake_store(tmp_path / "store", cases, k=3)
    reader = ArrayReader({c: np.zeros((1, 8, 8, 8), np.float32) for c in cases})
    judge = get_judge(f"{user_judges}:{judge_class}")
    with pytest.raises(JudgeError, match=message):
        score_store(judge, store, reader, sorted(cases), LABELS, progress=False)
    # each case's score is its own file, written whole: case_0's (scored before the failure, kept for a rerun),
    # none for the failing case, no merged file, nothing half-written
    written = sorted(path.relative_to(store.folder).as_posix() for path in (store.folder / "judges").rglob("*"))
    key = written[0]
    assert written == [key, f"{key}/case_0.json"] and key.endswith(".scores")
    assert partial_files(store.folder) == []


# ================================================================================================ same seed, same pairs
@pytest.mark.slow
def test_same_seed_gives_the_same_proposals_scores_and_pairs(tmp_path, base_model, synthetic_dataset):
    from nnunet_rndpo.judges import get_judge
    from nnunet_rndpo.judging import foreground_labels, score_store
    from nnunet_rndpo.pairs import pairs_record
    from nnunet_rndpo.proposals.run import generate_proposals

    pool = discover_pool(
        Path(os.environ["nnUNet_raw"]),
        tmp_path / "preprocessed",
        synthetic_dataset.name,
        base_model.dataset_json,
        base_model.configuration_manager.data_identifier,
        0,
    )
    pool.case_ids = pool.case_ids[:2]
    reader = PoolReader(pool, base_model.plans_manager, base_model.configuration_manager, base_model.dataset_json)

    def run(seed: int, name: str):
        # temperature members are random draws: only the seed makes them repeat
        settings = ProposalSettings(num_proposals=4, sources=("temperature",), seed=seed)
        store, _ = generate_proposals(base_model, pool, tmp_path / name, settings, progress=False)
        judge = get_judge("agreement")
        scores = score_store(judge, store, reader, pool.case_ids, foreground_labels(base_model), progress=False)
        pairs = pairs_record(store, scores, "top_bottom", 0.0, seed)
        return {c: store.load_case(c)["proposals"] for c in pool.case_ids}, scores, pairs

    proposals_1, scores_1, pairs_1 = run(7, "first")
    proposals_2, scores_2, pairs_2 = run(7, "second")
    assert all(np.array_equal(proposals_1[c], proposals_2[c]) for c in pool.case_ids)
    assert scores_1 == scores_2
    assert pairs_1 == pairs_2 and pairs_1["items"], pairs_1
    assert json.dumps(pairs_1, sort_keys=True) == json.dumps(pairs_2, sort_keys=True)
    proposals_3, _, _ = run(8, "other_seed")
    assert any(not np.array_equal(proposals_1[c], proposals_3[c]) for c in pool.case_ids), "the seed has no effect"


# ================================================================================================ killed runs
@pytest.fixture
def own_checkpoint(base_checkpoint, preprocessed_synthetic, tiny_configuration, tmp_path):
    """A copy of the base checkpoint under a folder name of this test's own -> a proposal store of its own."""
    trainer_folder = f"nnUNetTrainerReliability{uuid.uuid4().hex[:8]}__nnUNetPlans__{tiny_configuration}"
    copy = tmp_path / trainer_folder / "fold_0" / "checkpoint_final.pth"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(base_checkpoint, copy)
    store_folder = default_store_folder(
        preprocessed_synthetic.preprocessed_folder.parent,
        preprocessed_synthetic.name,
        "nnUNetPlans",
        tiny_configuration,
        0,
        copy,
    )
    assert not store_folder.exists()
    yield copy, store_folder
    shutil.rmtree(store_folder, ignore_errors=True)


def start(command: list[str], log: Path, environ: dict | None = None) -> subprocess.Popen:
    """A child in a process group of its own, so that SIGKILL reaches everything it started."""
    handle = open(log, "w")
    try:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=environ or dict(os.environ), start_new_session=True
        )
    finally:
        handle.close()


def kill_when(
    process: subprocess.Popen, condition, log: Path, what: str, timeout: float = SUBPROCESS_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if process.poll() is not None:
                pytest.fail(f"the run ended (rc {process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the group of the child started above, nothing else
        process.wait(30)


def run_to_end(command: list[str], log: Path, environ: dict | None = None) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, env=environ or dict(os.environ), timeout=SUBPROCESS_TIMEOUT_S
    )
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed (rc {result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}"
    )
    return result.stdout


@pytest.mark.slow
def test_proposal_run_killed_mid_pool_resumes_and_completes(own_checkpoint, synthetic_dataset, tmp_path):
    checkpoint, store_folder = own_checkpoint
    store = ProposalStore(store_folder)
    # K=2 (plain and one mirror member): a second or more per case, so the kill lands mid-pool
    arguments = [
        "propose",
        "-d",
        str(synthetic_dataset.dataset_id),
        "-c",
        "3d_tiny",
        "-f",
        "0",
        "-chk",
        str(checkpoint),
        "-k",
        "2",
        "--sources",
        "tta",
        "--seed",
        "3",
    ]
    # both entry points: `python -m nnunet_rndpo.cli` for the killed run, the console script for the restart
    process = start([sys.executable, "-m", "nnunet_rndpo.cli", *arguments], tmp_path / "first.log")
    kill_when(process, lambda: bool(store.case_ids()), tmp_path / "first.log", "first case file")
    assert process.returncode == -signal.SIGKILL
    finished = store.case_ids()
    assert 1 <= len(finished) < synthetic_dataset.num_unlabeled, f"the kill came too late to test anything: {finished}"
    for case_id in finished:  # whatever reads as a case is whole
        assert store.load_case(case_id)["proposals"].shape[0] == 2

    output = run_to_end([str(Path(sys.executable).parent / "nnunet_rndpo"), *arguments], tmp_path / "second.log")
    assert (
        f"{synthetic_dataset.num_unlabeled} cases ({synthetic_dataset.num_unlabeled - len(finished)} generated, {len(finished)} already in the store)"  # noqa: E501
        in output
    )
    assert len(store.case_ids()) == synthetic_dataset.num_unlabeled
    assert store.verify() == []
    assert partial_files(store_folder) == []


@pytest.mark.slow
def test_training_killed_after_the_first_epoch_resumes_and_completes(
    own_checkpoint, preprocessed_synthetic, tiny_configuration, tmp_path
):
    from nnunet_rndpo.pairs import PAIRS_FILE_NAME
    from nnunet_rndpo.proposals.model import read_checkpoint

    checkpoint, store_folder = own_checkpoint
    trainer = "nnUNetTrainerDPO"
    output = nnunet_paths.trainer_output_folder(
        preprocessed_synthetic.dataset_id, tiny_configuration, 0, trainer_name=trainer
    )
    shutil.rmtree(output, ignore_errors=True)  # this test's trainer; a kept test folder may hold an older run
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "num_epochs": 2,
                "iterations_per_epoch": 2,
                "val_iterations_per_epoch": 1,
                "recipe": "none",
                "base_checkpoint": str(checkpoint),
                "proposals": {"num_proposals": 4},
            }
        )
    )
    environ = {**os.environ, "RNDPO_SETTINGS": str(settings), "nnUNet_n_proc_DA": "0", "OMP_NUM_THREADS": "1"}
    train = str(Path(sys.executable).parent / "nnUNetv2_train")
    command = [train, str(preprocessed_synthetic.dataset_id), tiny_configuration, "0", "-tr", trainer, "-device", "cpu"]
    pairs_file = output / PAIRS_FILE_NAME

    def second_epoch_started() -> bool:
        return pairs_file.is_file() and any(
            re.search(r": Epoch 1\s*$", log.read_text(), re.MULTILINE) for log in output.glob("training_log_*.txt")
        )

    process = start(command, tmp_path / "first.log", environ)
    kill_when(process, second_epoch_started, tmp_path / "first.log", "second epoch")
    assert process.returncode == -signal.SIGKILL
    assert not (output / "checkpoint_final.pth").exists()
    # the preference trainers save checkpoint_latest after every epoch: --c resumes at epoch 1 with the trained
    # policy and the pairs of the first start
    assert (output / "checkpoint_latest.pth").is_file()
    pairs_before = pairs_file.read_bytes()
    assert json.loads(pairs_before)["items"], "the first run mined no pairs"

    log = run_to_end([*command, "--c"], tmp_path / "second.log", environ)
    assert re.search(r": Epoch 1\s*$", log, re.MULTILINE) and not re.search(r": Epoch 0\s*$", log, re.MULTILINE), log[
        -3000:
    ]
    assert "policy initialised from the base checkpoint" not in log  # the resumed policy was kept
    final = read_checkpoint(output / "checkpoint_final.pth")
    assert final["trainer_name"] == trainer and final["current_epoch"] == 2
    assert pairs_file.read_bytes() == pairs_before
    assert ProposalStore(store_folder).verify() == []
    assert len(ProposalStore(store_folder).case_ids()) == 4
    assert partial_files(output, store_folder) == []
