"""The start phase under torch.distributed (two gloo ranks on loopback), as the trainer runs it: every rank makes
and scores its shard of the pool, rank 0 fits the judge once and mines, the ranks wait on a group of their own
(`pipeline.start_ranks`) whose timeout is the setting's, not the default group's.

The default process group gets a timeout of a few seconds; the judge sleeps longer than that in its fit (rank 0
only: the others wait), and rank 1's shard is slow to score (rank 0 waits). Both ranks must come through with the
pairs a single process makes from the same pool, and the default group must still work afterwards (the first
collective of training). nnU-Net's own DDP training needs CUDA (it moves every rank to a GPU), so its epochs are
not run here; the trainer calls exactly this path (`start_ranks`, `prepare_pairs`) before it builds its loaders.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nnunet_rndpo.pipeline import Ranks

if not dist.is_available():  # pragma: no cover - depends on the torch build
    pytest.skip("torch.distributed is not available in this torch build (no gloo backend)", allow_module_level=True)

WORLD_SIZE = 2
DEFAULT_GROUP_TIMEOUT_S = 3  # the default group's, as NCCL's short default would be
SLEEP_S = 6  # longer than DEFAULT_GROUP_TIMEOUT_S
SPAWN_DEADLINE_S = 300

SLOW_JUDGE = f'''
import time

import numpy as np
import torch.distributed as dist

from nnunet_rndpo.judges import Judge


class SlowJudge(Judge):
    """Learns (slowly) from the labeled cases' label maps; scores like agreement-by-volume, slowly on rank 1."""

    name = "slow"

    def __init__(self):
        self.fitted_cases = 0

    def fit_from(self, examples):
        self.fit(examples.true_label_maps())

    def fit(self, labeled_cases):
        time.sleep({SLEEP_S})
        self.fitted_cases = len(list(labeled_cases))

    def fitted_state(self):
        return {{"fitted_cases": self.fitted_cases}} if self.fitted_cases else {{}}

    def load_fitted_state(self, fitted):
        self.fitted_cases = fitted.get("fitted_cases", 0)

    def score(self, case):
        if dist.is_initialized() and dist.get_rank() == 1:
            time.sleep({SLEEP_S} / 2)
        volumes = np.array([np.count_nonzero(p) for p in case.proposals], dtype=float)
        return -np.abs(volumes - np.median(volumes))
'''


def _start_phase(rank, world, port, shared, module_folder, dataset_id, configuration, checkpoint):
    """Entry point of each spawned rank: the start phase, then one collective of the default group."""
    torch.set_num_threads(1)
    sys.path.insert(0, module_folder)
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=DEFAULT_GROUP_TIMEOUT_S),
    )
    result: dict = {}
    try:
        result = {"ok": True, **_prepare(dataset_id, configuration, checkpoint, Path(shared))}
        total = torch.tensor([1.0])
        dist.all_reduce(total)  # the default group after the long start phase: training's first collective
        result["all_reduce"] = float(total)
    except Exception:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    if result["ok"]:
        # the control: the same start phase waiting on the default group fails, so the test above can fail
        try:
            _prepare(dataset_id, configuration, checkpoint, Path(shared) / "control", Ranks(rank, world, dist.barrier))
            result["control"] = "finished"
        except Exception as error:  # noqa: BLE001 - the expected failure, reported to the parent
            result["control"] = f"{type(error).__name__}: {error}"
    try:
        Path(shared, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _prepare(dataset_id: int, configuration: str, checkpoint: str, shared: Path, ranks=None) -> dict:
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.pairs import PairSettings
    from nnunet_rndpo.pipeline import prepare_pairs, start_ranks
    from nnunet_rndpo.proposals.model import load_model
    from nnunet_rndpo.proposals.plan import ProposalSettings
    from nnunet_rndpo.training.settings import PreferenceSettings

    location = locate(dataset_id, configuration, 0)
    model = load_model(checkpoint)
    settings = PairSettings.from_run_settings(
        PreferenceSettings(), judge="slow_judges:SlowJudge", proposals=ProposalSettings(num_proposals=3)
    )
    started = time.monotonic()
    prepared = prepare_pairs(
        location,
        model,
        settings,
        store_folder=shared / "store",
        pairs_file=shared / "rndpo_pairs.json",
        ranks=ranks if ranks is not None else start_ranks(timeout_minutes=5),
        log=lambda message: None,
        progress=False,
        workers=1,
    )
    return {"items": prepared.items, "seconds": time.monotonic() - started, "shard": sorted(prepared.scores)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def slow_judge_module(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slow_judge")
    (folder / "slow_judges.py").write_text(textwrap.dedent(SLOW_JUDGE))
    return folder


@pytest.mark.slow
def test_a_start_phase_longer_than_the_default_groups_timeout_ends_in_the_pairs_of_one_process(
    preprocessed_synthetic, tiny_configuration, base_checkpoint, slow_judge_module, tmp_path, monkeypatch
):
    import torch.multiprocessing as mp

    shared = tmp_path / "ranks"
    shared.mkdir()
    context = mp.start_processes(
        _start_phase,
        args=(
            WORLD_SIZE,
            _free_port(),
            str(shared),
            str(slow_judge_module),
            preprocessed_synthetic.dataset_id,
            tiny_configuration,
            str(base_checkpoint),
        ),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"the ranks did not finish within {SPAWN_DEADLINE_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    ranks = [json.loads((shared / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    for rank, result in enumerate(ranks):
        assert result["ok"], f"rank {rank}:\n{result.get('error')}"
        assert result["all_reduce"] == WORLD_SIZE
        assert result["seconds"] > DEFAULT_GROUP_TIMEOUT_S  # the waits outlasted the default group's timeout
        assert result["control"] != "finished", "waiting on the default group should have timed out"
    assert ranks[0]["items"] == ranks[1]["items"] and ranks[0]["items"]
    # rank 1 scored its own shard (the slow one); rank 0 merged every case's score
    from nnunet_rndpo.proposals.pool import unlabeled_pool

    # the same pool, proposals and judge in one process: the same pairs
    monkeypatch.syspath_prepend(str(slow_judge_module))
    from nnunet_rndpo.nnunet_paths import locate
    from nnunet_rndpo.pairs import PairSettings
    from nnunet_rndpo.pipeline import prepare_pairs
    from nnunet_rndpo.proposals.model import load_model
    from nnunet_rndpo.proposals.plan import ProposalSettings
    from nnunet_rndpo.training.settings import PreferenceSettings

    location = locate(preprocessed_synthetic.dataset_id, tiny_configuration, 0)
    pool = unlabeled_pool(location)
    assert ranks[1]["shard"] == pool.case_ids[1::2] and ranks[0]["shard"] == pool.case_ids
    single = prepare_pairs(
        location,
        load_model(base_checkpoint),
        PairSettings.from_run_settings(
            PreferenceSettings(), judge="slow_judges:SlowJudge", proposals=ProposalSettings(num_proposals=3)
        ),
        store_folder=tmp_path / "single_store",
        pairs_file=tmp_path / "single_pairs.json",
        log=lambda message: None,
        progress=False,
        workers=1,
    )
    assert single.items == ranks[0]["items"]
    sys.modules.pop("slow_judges", None)
