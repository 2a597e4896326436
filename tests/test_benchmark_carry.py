"""benchmarks/low_label/carry.py: a run packed on one machine goes on in a new work folder on another (results,
audits, models without optimizer state, an unfinished model's whole last checkpoint), checked by sha256."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks.low_label.carry import MANIFEST, CarryError, pack, unpack

MODEL = Path("nnUNet_results/Dataset942_X/Bench_base_folds_s0__nnUNetPlans__3d_bench")


def _checkpoint(epoch: int) -> dict:
    return {
        "network_weights": {"weight": torch.full((2, 3), float(epoch))},
        "optimizer_state": {"state": {0: {"momentum_buffer": torch.ones(2, 3)}}},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [0.1 * epoch]},
        "current_epoch": epoch,
        "init_args": {"fold": 0},
        "trainer_name": "Bench_base_folds_s0",
    }


def _work(folder: Path) -> Path:
    (folder / "arms").mkdir(parents=True)
    (folder / "split.json").write_text(json.dumps({"train": ["a"]}))
    (folder / "arms" / "base_fold0_s0.json").write_text(json.dumps({"folder": str(folder / MODEL / "fold_0")}))
    (folder / "audit_folds").mkdir()
    (folder / "audit_folds" / "judge_audit.json").write_text("{}")
    (folder / "predictions" / "base_fold0_s0").mkdir(parents=True)
    (folder / "predictions" / "base_fold0_s0" / "case.nii.gz").write_bytes(b"not carried")
    for fold in (0, 1):
        (folder / MODEL / f"fold_{fold}").mkdir(parents=True)
    (folder / MODEL / "plans.json").write_text("{}")
    (folder / MODEL / "dataset.json").write_text("{}")
    torch.save(_checkpoint(100), folder / MODEL / "fold_0" / "checkpoint_final.pth")
    torch.save(_checkpoint(99), folder / MODEL / "fold_0" / "checkpoint_latest.pth")
    torch.save(_checkpoint(37), folder / MODEL / "fold_1" / "checkpoint_latest.pth")  # still training
    (folder / MODEL / "fold_1" / "training_log.txt").write_text("not carried")
    return folder


def test_a_packed_run_unpacks_into_a_new_work_folder_with_its_paths_rewritten(tmp_path):
    old = _work(tmp_path / "old")
    manifest = pack(old, tmp_path / "carried")
    carried = set(manifest["files"])
    assert carried == {
        "split.json",
        "arms/base_fold0_s0.json",
        "audit_folds/judge_audit.json",
        f"{MODEL}/plans.json",
        f"{MODEL}/dataset.json",
        f"{MODEL}/fold_0/checkpoint_final.pth",  # the final one only: the latest is not needed once it exists
        f"{MODEL}/fold_1/checkpoint_latest.pth",
    }
    final = torch.load(tmp_path / "carried" / MODEL / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert "optimizer_state" not in final and "grad_scaler_state" not in final
    assert final["current_epoch"] == 100 and torch.equal(final["network_weights"]["weight"], torch.full((2, 3), 100.0))
    unfinished = torch.load(tmp_path / "carried" / MODEL / "fold_1" / "checkpoint_latest.pth", weights_only=False)
    assert unfinished["optimizer_state"]["state"][0]["momentum_buffer"].sum() == 6  # it goes on exactly

    new = tmp_path / "new"
    written = unpack(tmp_path / "carried", new)
    assert {str(path.relative_to(new)) for path in written} == carried
    assert json.loads((new / "arms" / "base_fold0_s0.json").read_text()) == {"folder": str(new / MODEL / "fold_0")}
    assert not (new / "predictions").exists()
    assert unpack(tmp_path / "carried", new) == []  # the same files again: nothing to write


def test_unpack_refuses_a_work_folder_that_went_on_and_a_damaged_pack(tmp_path):
    pack(_work(tmp_path / "old"), tmp_path / "carried")
    new = tmp_path / "new"
    (new / "arms").mkdir(parents=True)
    (new / "arms" / "base_fold0_s0.json").write_text("{}")
    with pytest.raises(CarryError, match="base_fold0_s0.json exists with other content"):
        unpack(tmp_path / "carried", new)
    assert not (new / "split.json").exists()  # nothing written before the check of every file

    (tmp_path / "carried" / "split.json").write_text("{}")
    with pytest.raises(CarryError, match="split.json: missing or not the file"):
        unpack(tmp_path / "carried", tmp_path / "other")
    with pytest.raises(CarryError, match=f"holds no {MANIFEST}"):
        unpack(tmp_path / "old", tmp_path / "other")
    with pytest.raises(CarryError, match="holds no split.json"):
        pack(tmp_path / "carried" / "arms", tmp_path / "again")


def test_pack_replaces_an_earlier_pack_whole(tmp_path):
    old = _work(tmp_path / "old")
    pack(old, tmp_path / "carried")
    (old / "arms" / "base_fold1_s0.json").write_text("{}")
    (old / MODEL / "fold_1" / "checkpoint_latest.pth").rename(old / MODEL / "fold_1" / "checkpoint_final.pth")
    manifest = pack(old, tmp_path / "carried")
    assert f"{MODEL}/fold_1/checkpoint_final.pth" in manifest["files"]
    assert not (tmp_path / "carried" / MODEL / "fold_1" / "checkpoint_latest.pth").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporaries left


def test_a_finished_model_packed_again_keeps_the_bytes_carried_before(tmp_path):
    """A checkpoint saved again (under another temporary name) has other bytes: a second pack of an unchanged model
    must not put a new copy of its weights into git; one whose weights changed is written anew."""
    work = _work(tmp_path / "work")
    final = f"{MODEL}/fold_0/checkpoint_final.pth"
    first = pack(work, tmp_path / "carried")["files"][final]["sha256"]
    assert pack(work, tmp_path / "carried")["files"][final]["sha256"] == first
    changed = _checkpoint(100)
    changed["network_weights"]["weight"] += 1
    torch.save(changed, work / final)
    assert pack(work, tmp_path / "carried")["files"][final]["sha256"] != first


def test_pack_of_finished_models_only_leaves_out_a_model_still_training(tmp_path, capsys):
    from benchmarks.low_label.__main__ import main

    old = _work(tmp_path / "old")
    (old / MODEL / "fold_1" / "rndpo_pairs.json").write_text("{}")  # its start phase: remade with its epochs
    assert main(["--work", str(old), "--pack", str(tmp_path / "carried"), "--pack_finished_only"]) == 0
    carried = set(json.loads((tmp_path / "carried" / MANIFEST).read_text())["files"])
    assert f"{MODEL}/fold_0/checkpoint_final.pth" in carried and not any("fold_1" in name for name in carried)
    with pytest.raises(SystemExit):
        main(["--work", str(old), "--pack_finished_only"])  # nothing to pack: refused, not ignored
    assert "--pack_finished_only says what --pack leaves out" in capsys.readouterr().err


def test_the_command_line_packs_and_unpacks_and_refuses_both_at_once(tmp_path, capsys):
    from benchmarks.low_label.__main__ import main

    old = _work(tmp_path / "old")
    assert main(["--work", str(old), "--pack", str(tmp_path / "carried")]) == 0
    assert main(["--work", str(tmp_path / "new"), "--unpack", str(tmp_path / "carried")]) == 0
    assert "unpacked 7 files" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--pack", "a", "--unpack", "b"])


def test_pack_refuses_a_checkpoint_caught_half_written_and_leaves_the_earlier_pack(tmp_path):
    old = _work(tmp_path / "old")
    pack(old, tmp_path / "carried")
    latest = old / MODEL / "fold_1" / "checkpoint_latest.pth"
    latest.write_bytes(latest.read_bytes()[:100])  # nnU-Net writes it in place: a copy can catch it half-written
    with pytest.raises(CarryError, match="fold_1/checkpoint_latest.pth does not load"):
        pack(old, tmp_path / "carried")
    assert unpack(tmp_path / "carried", tmp_path / "new")  # the earlier pack is whole
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
