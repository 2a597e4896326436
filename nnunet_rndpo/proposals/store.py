"""The proposal store: one folder per (dataset, plans, configuration, fold, base checkpoint).

Layout:
    manifest.json          what made the proposals: checkpoint hash, settings, members with provenance
    cases/<case>.npz       proposals (K, *spatial) uint8, mean_probabilities (C, *spatial) float16, case_seed
    cases/.<case>.claim    held while a process generates the case (its pid), so a second process filling
                           the store at the same time takes other cases (nnunet_rndpo.atomic.exclusive_claim)
    judges/, pairs/        judge scores and mined pairs (written by later steps)
    judges/<judge>.voxels/<case>.npz
                           a judge's own per-voxel class probabilities (float16), for judges that have them
    unpacked/<case>/<fingerprint of the case file>/
                           the pair loader's memory-mappable .npy copies of a case (nnunet_rndpo/training/
                           pair_data.py: UnpackedCases); a derived cache, made again when the case file changes
Every file is written under a temporary name and renamed, so a killed run never leaves a case that reads as
whole; a rerun skips finished cases. A store made by another checkpoint or other settings is refused with a
message instead of being mixed with new proposals.
"""

from __future__ import annotations

import glob
import json
import shutil
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from nnunet_rndpo.atomic import TEMP_SUFFIX, remove_stale_temporaries, save_json, save_npz, writer_is_alive

STORE_FORMAT_VERSION = 1
# Manifest fields that must match for a store to be reused.
IDENTITY_FIELDS = (
    "format_version",
    "dataset",
    "plans",
    "configuration",
    "fold",
    "checkpoint_sha256",
    "extra_checkpoints_sha256",
    "settings",
    "members",
    # how dropout members draw (nnunet_rndpo/proposals/engine.py: DROPOUT_DRAWS); absent without dropout members
    "dropout_draws",
)


class StoreError(RuntimeError):
    """A store that cannot be used as asked (mismatch, corrupt case)."""


class ProposalStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.cases_folder = self.folder / "cases"
        self.manifest_path = self.folder / "manifest.json"

    # ---------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise StoreError(
                f"no proposal store at {self.folder} (manifest.json missing); run `nnunet_rndpo propose` first"
            )
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise StoreError(f"manifest {self.manifest_path} is not valid JSON: {error}") from error

    def open(
        self, manifest: dict, overwrite: bool = False, case_ids: Optional[Iterable[str]] = None
    ) -> "ProposalStore":
        """Create the store for `manifest`, or reuse it when it was made by the same checkpoint and settings.

        Temporaries left by a killed writer are removed: those of `case_ids` only when given (parts of a pool
        may run at once, and another part's temporary may be a file it is writing right now), else all.
        """
        manifest = {"format_version": STORE_FORMAT_VERSION, **manifest}
        if self.manifest_path.is_file() and not overwrite:
            existing = self.manifest()
            differences = [
                name for name in IDENTITY_FIELDS if _normalise(existing.get(name)) != _normalise(manifest.get(name))
            ]
            if differences:
                details = "; ".join(_difference(name, existing.get(name), manifest.get(name)) for name in differences)
                raise StoreError(
                    f"proposal store {self.folder} was made with a different {', '.join(differences)} ({details}). "
                    "Its proposals would be mixed with new ones: delete that folder, or rerun with overwrite "
                    '(`nnunet_rndpo propose --overwrite`, or the trainer setting "overwrite_proposals": true).'
                )
        elif overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        self.cases_folder.mkdir(parents=True, exist_ok=True)
        if case_ids is None:
            remove_stale_temporaries(self.cases_folder)
        else:
            for case_id in case_ids:
                # atomic_path names a temporary `.<file name>.pid<writer>.<random>.partial`
                for stale in self.cases_folder.glob(f".{glob.escape(self.case_path(case_id).name)}.*{TEMP_SUFFIX}"):
                    if not writer_is_alive(stale):
                        stale.unlink(missing_ok=True)
        if not self.manifest_path.is_file():
            save_json(manifest, self.manifest_path)
        return self

    # ---------------------------------------------------------------- cases
    def case_path(self, case_id: str) -> Path:
        return self.cases_folder / f"{case_id}.npz"

    def claim_path(self, case_id: str) -> Path:
        return self.cases_folder / f".{case_id}.claim"

    def has_case(self, case_id: str) -> bool:
        return self.case_path(case_id).is_file()

    def case_ids(self) -> list[str]:
        return sorted(p.stem for p in self.cases_folder.glob("*.npz")) if self.cases_folder.is_dir() else []

    def save_case(
        self,
        case_id: str,
        proposals: np.ndarray,
        mean_probabilities: np.ndarray,
        case_seed: int,
    ) -> None:
        if proposals.dtype != np.uint8 or proposals.ndim < 2:
            raise StoreError(
                f"case {case_id}: proposals must be (K, *spatial) uint8, got {proposals.dtype} {proposals.shape}"
            )
        if mean_probabilities.shape[1:] != proposals.shape[1:]:
            raise StoreError(
                f"case {case_id}: probabilities {mean_probabilities.shape} do not match proposals {proposals.shape}"
            )
        save_npz(
            self.case_path(case_id),
            proposals=proposals,
            mean_probabilities=mean_probabilities.astype(np.float16, copy=False),  # no copy of a (C, *) array
            case_seed=np.int64(case_seed),
        )

    def load_case(self, case_id: str, probabilities: bool = True) -> dict:
        """proposals, mean_probabilities, case_seed (stores of older versions may hold more; it is not read).

        probabilities=False leaves out mean_probabilities, which is then not decompressed: a (C, *spatial) array that
        is most of the file, where the K uint8 label maps are what most callers read.
        """
        path = self.case_path(case_id)
        if not path.is_file():
            raise StoreError(f"case {case_id!r} is not in the proposal store {self.folder}")
        names = ("proposals", "mean_probabilities", "case_seed") if probabilities else ("proposals", "case_seed")
        try:
            with np.load(path) as archive:
                case = {name: archive[name] for name in names}
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as error:
            raise StoreError(
                f"proposal file {path} is corrupt ({type(error).__name__}: {error}); delete it and rerun"
            ) from error
        expected = len(self.manifest()["members"])
        if case["proposals"].shape[0] != expected:
            raise StoreError(
                f"proposal file {path} holds {case['proposals'].shape[0]} proposals, the manifest {expected}"
            )
        return case

    def load_proposals(self, case_id: str) -> np.ndarray:
        """The case's (K, *spatial) uint8 label maps alone (the mean probabilities are not decompressed)."""
        return self.load_case(case_id, probabilities=False)["proposals"]

    # ---------------------------------------------------------------- a judge's per-voxel probabilities
    def voxel_probabilities_path(self, judge_key: str, case_id: str) -> Path:
        return self.folder / "judges" / f"{judge_key}.voxels" / f"{case_id}.npz"

    def save_voxel_probabilities(self, judge_key: str, case_id: str, probabilities: np.ndarray) -> None:
        save_npz(self.voxel_probabilities_path(judge_key, case_id), probabilities=probabilities.astype(np.float16))

    def load_voxel_probabilities(self, judge_key: str, case_id: str) -> np.ndarray:
        """(num_classes, *spatial) float32: what the judge `judge_key` saved for the case."""
        path = self.voxel_probabilities_path(judge_key, case_id)
        if not path.is_file():
            raise StoreError(
                f"no voxel probabilities of judge {judge_key!r} for case {case_id!r} in {path.parent}: score the "
                "pool again with the judge (its scores file is reused only when these files are complete)"
            )
        try:
            with np.load(path) as archive:
                return archive["probabilities"].astype(np.float32)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as error:
            raise StoreError(f"voxel probabilities file {path} is corrupt ({type(error).__name__}: {error})") from error

    def member_models(self) -> tuple:
        """Which model made each proposal: 0 = the base, i = extra network i, "ensemble" = their ensemble."""
        return tuple(
            "ensemble" if member["source"] == "ensemble" else int(member.get("network_index", 0))
            for member in self.manifest()["members"]
        )

    def verify(self, case_ids: Optional[Iterable[str]] = None) -> list[str]:
        """Integrity check: every listed case loads and matches the manifest. Returns the problems found."""
        problems = []
        for case_id in case_ids if case_ids is not None else self.case_ids():
            try:
                self.load_case(case_id)
            except StoreError as error:
                problems.append(str(error))
        leftovers = list(self.cases_folder.glob(".*.partial")) if self.cases_folder.is_dir() else []
        problems.extend(f"temporary file left behind: {p}" for p in leftovers)
        return problems


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _difference(name: str, stored, new) -> str:
    """What differs, key by key for a mapping (settings): a whole-value excerpt may cut off the very difference."""
    if isinstance(stored, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(stored) | set(new) if _normalise(stored.get(k)) != _normalise(new.get(k)))
        return "; ".join(
            f"{name}: {key}: store has {_short(stored.get(key))}, now {_short(new.get(key))}" for key in keys
        )
    if isinstance(stored, list) and isinstance(new, list) and len(stored) != len(new):
        return f"{name}: store has {len(stored)}, now {len(new)}"
    return f"{name}: store has {_short(stored)}, now {_short(new)}"


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
