"""torch.distributed on two CPU processes (gloo, loopback only): what the trainer relies on under DDP.

- sharding: each rank takes `case_ids[rank::world]` (as the trainer does for proposals); together the ranks
  cover every case exactly once, also with fewer cases than ranks; rank 0 writes a file, a barrier, all read it;
- gradient flow: a tiny deep-supervision PlainConvUNet wrapped in DistributedDataParallel (default
  find_unused_parameters=False) trained two steps with `preference_loss_over_scales`, full-resolution-only
  weights and nnU-Net-style weights; a frozen reference copy outside DDP. Every policy parameter gets a finite
  gradient (zero for weight-0 heads), the reference none, and the ranks hold identical parameters afterwards;
- pairs without any disagreement (on every rank, or on one rank only) give a finite loss and no DDP error;
- a control: leaving a head out of the graph does make DDP fail, so the checks above can catch a regression.

Both processes are started once for the whole module (imports dominate the cost); each scenario's outcome
comes back per rank and is checked by its own test.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():  # pragma: no cover - depends on the torch build
    pytest.skip("torch.distributed is not available in this torch build (no gloo backend)", allow_module_level=True)

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT_S = 30  # a rank that waits longer on a collective gives up (instead of hanging the tests)
SPAWN_DEADLINE_S = 120
PATCH = (16, 16, 16)
NUM_CLASSES = 3


# ---------------------------------------------------------------------------------------------------------------
# Scenarios: run in each rank; assert there, return small JSON-able summaries.


def _scenario_sharding(rank: int, world: int, shared: Path) -> dict:
    from nnunet_rndpo.atomic import save_json
    from nnunet_rndpo.proposals.pool import CasePool

    covered = {}
    for count in (7, 4, 1, 0):  # odd, even, fewer cases than ranks, none
        case_ids = [f"case_{i:03d}" for i in range(count)]
        pool = CasePool(dataset_name="Dataset999_Test", source="test", case_ids=case_ids)
        mine = pool.case_ids[rank::world]  # what the trainer does before generating proposals
        assert mine == pool.shard(rank, world), "pool.shard disagrees with the trainer's slicing"
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        flat = [case for part in gathered for case in part]
        assert len(flat) == len(set(flat)), f"{count} cases: a case was taken by two ranks: {gathered}"
        assert sorted(flat) == case_ids, f"{count} cases: the ranks took {gathered}"
        dist.barrier()
        covered[count] = gathered

    # rank 0 writes, the others read after a barrier (as with rndpo_pairs.json)
    pairs_file = shared / "rndpo_pairs.json"
    if rank == 0:
        save_json({"items": [{"case_id": "case_000", "chosen": 1, "rejected": 0}]}, pairs_file)
    dist.barrier()
    read = json.loads(pairs_file.read_text())
    gathered_read: list = [None] * world
    dist.all_gather_object(gathered_read, read)
    assert all(r == gathered_read[0] for r in gathered_read)
    dist.barrier()
    return {"covered": {str(k): v for k, v in covered.items()}}


def _tiny_unet() -> torch.nn.Module:
    """PlainConvUNet as nnU-Net builds it (InstanceNorm, LeakyReLU), 4 stages -> 3 deep-supervision outputs."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)  # the same start on every rank (DDP would broadcast rank 0's weights anyway)
    return PlainConvUNet(
        input_channels=1,
        n_stages=4,
        features_per_stage=(4, 8, 16, 16),
        conv_op=torch.nn.Conv3d,
        kernel_sizes=3,
        strides=(1, 2, 2, 2),
        n_conv_per_stage=1,
        num_classes=NUM_CLASSES,
        n_conv_per_stage_decoder=1,
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )


def _batch(rank: int, step: int, disagreement: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image (2, 1, *PATCH) and per-scale targets (2, 2, *scale): channel 0 chosen, 1 rejected (rank-specific)."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    data = torch.randn((2, 1, *PATCH), generator=generator)
    chosen = torch.randint(0, NUM_CLASSES, (2, 1, *PATCH), generator=generator)
    rejected = chosen.clone()
    if disagreement:
        flip = torch.rand((2, 1, *PATCH), generator=generator) < 0.2
        rejected[flip] = (rejected[flip] + 1) % NUM_CLASSES
    full = torch.cat([chosen, rejected], 1).float()
    # nearest-neighbour downsampling, as nnU-Net's DownsampleSegForDSTransform does for the lower heads
    return data, [full, full[..., ::2, ::2, ::2], full[..., ::4, ::4, ::4]]


def _nnunet_weights(number_of_outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights without its DDP workaround: 1/2^i, the lowest scale 0, normalised."""
    weights = [1 / (2**i) for i in range(number_of_outputs)]
    weights[-1] = 0.0
    return [w / sum(weights) for w in weights]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _same_on_all_ranks(vector: torch.Tensor, world: int) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(world)]
    dist.all_gather(gathered, vector)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _train_two_steps(rank: int, world: int, weights: list[float], disagreement_on_rank) -> dict:
    """Two DDP steps with the preference loss; checks gradients, the reference and cross-rank equality."""
    from torch.nn.parallel import DistributedDataParallel

    from nnunet_rndpo.training.losses import preference_loss_over_scales

    network = _tiny_unet()
    reference = copy.deepcopy(network).eval()  # frozen, never wrapped in DDP (as the trainer's reference)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    reference_before = _flat(reference.parameters()).clone()
    policy = DistributedDataParallel(network)  # CPU: no device_ids; find_unused_parameters=False (the default)
    optimizer = torch.optim.SGD(policy.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    policy_before = _flat(network.parameters()).clone()
    names = [name for name, _ in network.named_parameters()]
    # seg_layers are indexed from the lowest resolution up; the outputs from full resolution down
    head_of_output = {len(weights) - 1 - s: f"decoder.seg_layers.{s}." for s in range(len(weights))}
    losses, zero_heads = [], []
    for step in range(2):  # DDP notices a parameter without gradient only at the next forward
        data, target = _batch(rank, step, disagreement_on_rank(rank))
        optimizer.zero_grad(set_to_none=True)
        output = policy(data)
        assert isinstance(output, (list, tuple)) and len(output) == len(weights), "expected one output per scale"
        with torch.no_grad():
            reference_output = reference(data)
        loss, statistics = preference_loss_over_scales(
            output, reference_output, target, weights, loss_type="rn_dpo", beta=1.0
        )
        assert torch.isfinite(loss), f"rank {rank} step {step}: loss {loss}"
        loss.backward()
        missing = [name for name, p in network.named_parameters() if p.grad is None]
        assert not missing, f"rank {rank} step {step}: no gradient for {missing}"
        not_finite = [name for name, p in network.named_parameters() if not torch.isfinite(p.grad).all()]
        assert not not_finite, f"rank {rank} step {step}: non-finite gradient for {not_finite}"
        assert all(p.grad is None for p in reference.parameters()), "the reference received gradients"
        for index, weight in enumerate(weights):
            head = [p.grad for name, p in network.named_parameters() if name.startswith(head_of_output[index])]
            assert head, f"no parameters found for output {index} ({head_of_output[index]}) among {names}"
            if weight == 0:
                assert all(torch.count_nonzero(g) == 0 for g in head), (
                    f"weight-0 output {index} got a non-zero gradient"
                )
                zero_heads.append(head_of_output[index])
        assert _same_on_all_ranks(_flat(p.grad for p in network.parameters()), world), "gradients differ across ranks"
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 12)
        optimizer.step()
        losses.append(float(loss.detach()))
    policy_after = _flat(network.parameters())
    assert _same_on_all_ranks(policy_after, world), "policy parameters differ across ranks after the steps"
    assert torch.equal(_flat(reference.parameters()), reference_before), "the reference changed"
    gradient_norm = float(_flat(p.grad for p in network.parameters()).norm())
    dist.barrier()
    return {
        "losses": losses,
        "last_gradient_norm": gradient_norm,
        "policy_changed": bool(not torch.equal(policy_after, policy_before)),
        "zero_weight_heads": sorted(set(zero_heads)),
        "skipped_fraction": float(statistics["pairs/skipped_fraction"]),
    }


def _scenario_full_resolution(rank: int, world: int, shared: Path) -> dict:
    return _train_two_steps(rank, world, [1.0, 0.0, 0.0], lambda r: True)


def _scenario_nnunet_weights(rank: int, world: int, shared: Path) -> dict:
    return _train_two_steps(rank, world, _nnunet_weights(3), lambda r: True)


def _scenario_no_disagreement(rank: int, world: int, shared: Path) -> dict:
    return _train_two_steps(rank, world, _nnunet_weights(3), lambda r: False)


def _scenario_no_disagreement_on_one_rank(rank: int, world: int, shared: Path) -> dict:
    return _train_two_steps(rank, world, _nnunet_weights(3), lambda r: r == 0)


def _scenario_control_head_left_out(rank: int, world: int, shared: Path) -> dict:
    """Only the full-resolution output in the loss: DDP must refuse the next step (unused parameters)."""
    from torch.nn.parallel import DistributedDataParallel

    from nnunet_rndpo.training.losses import preference_loss_over_scales

    network = _tiny_unet()
    reference = copy.deepcopy(network).eval()
    policy = DistributedDataParallel(network)
    error = None
    for step in range(2):
        data, target = _batch(rank, step, True)
        try:
            output = policy(data)
        except RuntimeError as caught:
            error = str(caught)
            break
        with torch.no_grad():
            reference_output = reference(data)
        loss, _ = preference_loss_over_scales(
            output[0], reference_output[0], target[0], [1.0], loss_type="rn_dpo", beta=1.0
        )
        loss.backward()
    assert error is not None, "DDP accepted a step although two output heads had no gradient"
    return {"error": error.splitlines()[0]}


SCENARIOS = {
    "sharding": _scenario_sharding,
    "full_resolution": _scenario_full_resolution,
    "nnunet_weights": _scenario_nnunet_weights,
    "no_disagreement": _scenario_no_disagreement,
    "no_disagreement_on_one_rank": _scenario_no_disagreement_on_one_rank,
    "control_head_left_out": _scenario_control_head_left_out,  # last: leaves a DDP reducer in a failed state
}


def _worker(rank: int, world: int, port: int, shared: str) -> None:
    """Entry point of each spawned rank: run every scenario, write the outcomes to rank<N>.json."""
    torch.set_num_threads(1)  # 2 cores shared with other work
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results: dict = {}
    try:
        for name, scenario in SCENARIOS.items():
            started = time.perf_counter()
            try:
                results[name] = {"ok": True, "result": scenario(rank, world, Path(shared))}
            except Exception:  # noqa: BLE001 - reported to the parent per scenario
                results[name] = {"ok": False, "error": traceback.format_exc()}
                break  # the ranks' collectives may be out of step now: stop here
            finally:
                results[name]["seconds"] = round(time.perf_counter() - started, 2)
    finally:
        Path(shared, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes() -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="rndpo_ddp_") as shared:
        context = mp.start_processes(
            _worker, args=(WORLD_SIZE, _free_port(), shared), nprocs=WORLD_SIZE, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    pytest.fail(f"the {WORLD_SIZE} ranks did not finish within {SPAWN_DEADLINE_S} s")
        finally:
            for process in context.processes:  # only the processes started above
                if process.is_alive():
                    process.kill()
                    process.join(5)
        results = []
        for rank in range(WORLD_SIZE):
            path = Path(shared, f"rank{rank}.json")
            assert path.is_file(), f"rank {rank} wrote no results"
            results.append(json.loads(path.read_text()))
    return results


def _result(outcomes: list[dict], name: str) -> list[dict]:
    per_rank = []
    for rank, outcome in enumerate(outcomes):
        if name not in outcome:
            pytest.fail(f"scenario {name!r} did not run on rank {rank} (an earlier scenario failed: {sorted(outcome)})")
        if not outcome[name]["ok"]:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{outcome[name]['error']}")
        per_rank.append(outcome[name]["result"])
    return per_rank


def test_each_case_is_taken_by_exactly_one_rank(outcomes):
    per_rank = _result(outcomes, "sharding")
    # the ranks agree on the split; with 7 cases, rank 0 takes 0, 2, 4, 6 and rank 1 takes 1, 3, 5
    assert per_rank[0]["covered"] == per_rank[1]["covered"]
    assert per_rank[0]["covered"]["7"] == [
        ["case_000", "case_002", "case_004", "case_006"],
        ["case_001", "case_003", "case_005"],
    ]
    assert per_rank[0]["covered"]["1"] == [["case_000"], []]


def test_ddp_full_resolution_only_every_head_gets_a_gradient(outcomes):
    per_rank = _result(outcomes, "full_resolution")
    for result in per_rank:
        assert result["policy_changed"] and result["last_gradient_norm"] > 0
        # the two lower-resolution heads carry weight 0: present in the graph with zero gradient
        assert result["zero_weight_heads"] == ["decoder.seg_layers.0.", "decoder.seg_layers.1."]
    assert per_rank[0]["losses"] != per_rank[1]["losses"]  # each rank saw its own batch


def test_ddp_nnunet_style_weights(outcomes):
    per_rank = _result(outcomes, "nnunet_weights")
    for result in per_rank:
        assert result["policy_changed"] and result["last_gradient_norm"] > 0
        assert result["zero_weight_heads"] == ["decoder.seg_layers.0."]  # nnU-Net's lowest scale has weight 0


def test_ddp_pairs_without_disagreement_give_zero_loss_and_zero_gradients(outcomes):
    for result in _result(outcomes, "no_disagreement"):
        assert result["losses"] == [0.0, 0.0]
        assert result["last_gradient_norm"] == 0.0
        assert result["skipped_fraction"] == 1.0


def test_ddp_one_rank_without_disagreement_still_steps_in_sync(outcomes):
    per_rank = _result(outcomes, "no_disagreement_on_one_rank")
    assert per_rank[1]["losses"] == [0.0, 0.0] and per_rank[0]["losses"][0] > 0
    # gradients are averaged over the ranks, so both ranks step with rank 0's (halved) gradient
    assert per_rank[0]["last_gradient_norm"] == per_rank[1]["last_gradient_norm"] > 0


def test_control_ddp_rejects_a_head_left_out_of_the_graph(outcomes):
    for result in _result(outcomes, "control_head_left_out"):
        assert "reduction" in result["error"] or "unused" in result["error"], result["error"]
