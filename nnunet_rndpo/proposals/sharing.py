"""Proposals one store can take from another: the same network passes in another order.

nnU-Net's five folds fine-tuned with `other_folds` each ask for the same passes: fold 0's store holds fold 0's
model's members, then each other fold's; fold 1's the same models' same members with fold 1's first. Every pass
(one network, one mirroring) and nnU-Net's ensemble of all of them are the same whichever fold's store asks, so a
case that a sibling store already holds is copied, its members reordered, instead of being computed again: four
fifths of the inference of a five-fold fine-tuning.

A donor store is used only when its manifest proves it: the same dataset, plans, configuration and proposal settings
(but for which files are the extra networks), and the same multiset of members, each a deterministic pass (plain,
tta, checkpoint, checkpoint_tta: no dropout) or the ensemble, a pass named by its network's file hash and its
flips. The ensemble and the mean probabilities average the same passes, in another order: they may differ from a
fresh computation in their last bits (a label at a near-tie), as they would between batch sizes
(nnunet_rndpo/proposals/engine.py). Pure functions of manifests, and where to look for donors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

PASS_SOURCES = frozenset({"plain", "tta", "checkpoint", "checkpoint_tta"})
ENSEMBLE_SOURCE = "ensemble"
# settings that name the extra networks (their files are compared by hash, member by member) rather than change them
NETWORK_LIST_SETTINGS = frozenset({"extra_checkpoints", "other_folds"})
# what must be equal for two stores' passes to be the same computation on the same cases
SAME_COMPUTATION_FIELDS = ("format_version", "dataset", "plans", "configuration")


def member_keys(manifest: dict) -> Optional[list[tuple]]:
    """What each member of a store is, independently of its position: ("pass", network file sha256, flips) or
    ("ensemble",); None when a member is not shared by construction (dropout draws, threshold and temperature
    members, which depend on the plain pass of the store's own base)."""
    networks = [manifest.get("checkpoint_sha256"), *manifest.get("extra_checkpoints_sha256", [])]
    keys = []
    for member in manifest["members"]:
        if member["source"] == ENSEMBLE_SOURCE:
            keys.append((ENSEMBLE_SOURCE,))
        elif member["source"] in PASS_SOURCES and not member.get("dropout_p"):
            index = int(member.get("network_index", 0))
            if index >= len(networks) or networks[index] is None:
                return None
            keys.append(("pass", networks[index], tuple(member.get("flip_axes", ()))))
        else:
            return None
    return keys


def donor_order(target: dict, donor: dict) -> Optional[list[int]]:
    """For each member of the `target` store's manifest, the index of the same member in the `donor` store's; None
    when the donor's proposals are not the target's (another computation, or other members)."""
    if any(target.get(field) != donor.get(field) for field in SAME_COMPUTATION_FIELDS):
        return None
    settings = [
        {key: value for key, value in manifest.get("settings", {}).items() if key not in NETWORK_LIST_SETTINGS}
        for manifest in (target, donor)
    ]
    if settings[0] != settings[1]:
        return None
    target_keys, donor_keys = member_keys(target), member_keys(donor)
    if target_keys is None or donor_keys is None or sorted(target_keys) != sorted(donor_keys):
        return None
    free: dict[tuple, list[int]] = {}
    for index, key in enumerate(donor_keys):
        free.setdefault(key, []).append(index)
    return [free[key].pop(0) for key in target_keys]


def donor_folders(store_folder: Path) -> list[Path]:
    """Stores that may hold the same passes: the folders beside `store_folder` (stores named per fold in one folder,
    as a run that names its store does), and the sibling folds' stores of the default layout
    (`.../fold_<F>/<model>__fold_<F>__<checkpoint>`, nnunet_rndpo/nnunet_paths.py: default_store_folder)."""
    store_folder = Path(store_folder)
    candidates = list(store_folder.parent.glob("*/manifest.json"))
    if store_folder.parent.name.startswith("fold_"):
        candidates += store_folder.parent.parent.glob("fold_*/*/manifest.json")
    resolved = store_folder.resolve()
    return sorted({path.parent for path in candidates if path.parent.resolve() != resolved})


def find_donors(store_folder: Path, manifest: dict) -> list[tuple[Path, list[int]]]:
    """(donor store folder, `donor_order`) of every store beside `store_folder` whose proposals are the ones
    `manifest` asks for."""
    donors = []
    for folder in donor_folders(store_folder):
        try:
            donor_manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being written, or not a store: nothing to take from it
        order = donor_order(manifest, donor_manifest)
        if order is not None:
            donors.append((folder, order))
    return donors
