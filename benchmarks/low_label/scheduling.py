"""Running a plan's stages across processes: claim files (one process per arm), waiting for what another part makes
(a base, the audit, an arm), the parts (`--part_id/--num_parts`: each takes every num_parts-th arm of a stage, or
the next arm no part holds) and `--only`. Every finished arm is a result file, so a rerun resumes where a run
stopped."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from benchmarks.low_label.arms import Arm


def claim(folder: Path, arm_name: str):
    """Whether this process may run the arm (a context manager): the claim file `<arm>.claim`, so that two runner
    processes over one work folder (e.g. a shard and an --only run) never train the same arm into the same output
    folder (nnunet_rndpo.atomic.exclusive_claim: a dead process's claim is taken over)."""
    from nnunet_rndpo.atomic import exclusive_claim

    return exclusive_claim(folder / f"{arm_name}.claim")


def result_file(work: Path, arm: Arm) -> Path:
    """An arm's result, `<work>/arms/<name>.json`: there once the arm has finished."""
    return work / "arms" / f"{arm.name}.json"


def wait_for(path: Path, poll_seconds: float = 20.0) -> Path:
    """Another part of the run makes this file (a base model, the audit, an arm's result): wait for it."""
    while not path.is_file():
        print(f"waiting for {path} (made by another part)", flush=True)
        time.sleep(poll_seconds)
    return path


class StopPlan(Exception):
    """Raised by a stage to end the plan with an exit code (a failed gate, a sweep that only prints its table)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class Parts:
    """This process's share: `part_id` of `num_parts`, and the arms `--only` names (None: every arm)."""

    part_id: int = 0
    num_parts: int = 1
    only: Optional[set] = None

    def wanted(self, arm: Arm) -> bool:
        return self.only is None or arm.name in self.only

    def share(self, arms: list[Arm]) -> list[Arm]:
        return arms[self.part_id :: self.num_parts]


# How the parts divide a stage's arms:
SPLIT_AND_WAIT = (
    "split_and_wait"  # each part its share, then every part waits for all of them (a later stage reads them)
)
SPLIT = "split"  # each part its share, no wait
EVERY_PART = "every_part"  # every part goes through every arm; the claims keep two parts off one arm; no wait
# every part takes the next arm no part holds whose inputs are there, in the stage's order (the arms the targets
# read first), then waits for all: no part idles beside a fixed share while another has arms left, nor waits for a
# model another part trains while an arm it could run is left
QUEUE = "queue"


@dataclass(frozen=True)
class Stage:
    """One step of a plan: its arms (given what earlier stages chose, `Context.choices`), how the parts divide them,
    and what it does with their results (`then`: record a choice, run the audit, end the plan with StopPlan)."""

    name: str
    arms: Callable[["Context"], list[Arm]]
    share: str = SPLIT_AND_WAIT
    only_filters: bool = True  # whether --only narrows its arms (False: the plan needs them whatever --only says)
    then: Optional[Callable[["Context", dict], None]] = None
    # what a part does when its share is done and it would wait for the other parts' (work a later stage reads)
    meanwhile: Optional[Callable[["Context"], None]] = None


@dataclass
class Context:
    """What a plan's stages read: the work folder, the parts, the CLI's options and the choices made so far."""

    work: Path
    parts: Parts
    options: object = None  # the parsed CLI arguments
    bench: object = None  # runner.Bench: the protocol, schedule, threads and device every arm shares
    choices: dict = field(default_factory=dict)


def run_queue(
    arms: list[Arm], run: Callable[[Arm], None], ready: Callable[[Arm], bool], poll_seconds: float = 20.0
) -> None:
    """Runs the first arm whose inputs are there until none is left; while every arm left waits for a model another
    part trains, waits."""
    left = list(arms)
    while left:
        arm = next((arm for arm in left if ready(arm)), None)
        if arm is None:
            names = ", ".join(waiting.name for waiting in left)
            print(f"waiting for the inputs of {names} (made by another part)", flush=True)
            time.sleep(poll_seconds)
            continue
        left.remove(arm)
        run(arm)


def run_stages(
    stages: list[Stage],
    context: Context,
    run: Callable[[Arm], None],
    load: Callable[[list[Arm]], dict],
    until: Optional[str] = None,
    ready: Callable[[Arm], bool] = lambda arm: True,
) -> int:
    """Runs the stages in order (up to and including `until`), each with `run(arm)` (which skips a finished arm
    and one another process holds); `load(arms)` gives a stage's finished results for its `then`; `ready(arm)`:
    whether the arm's inputs are there (a queue stage runs ready arms first). Returns the exit code (0, or a
    stage's StopPlan code)."""
    for stage in stages:
        arms = stage.arms(context)
        chosen = [arm for arm in arms if context.parts.wanted(arm)] if stage.only_filters else arms
        if stage.share == QUEUE:
            run_queue(chosen, run, ready)
        else:
            for arm in chosen if stage.share == EVERY_PART else context.parts.share(chosen):
                run(arm)
        if stage.share in (SPLIT_AND_WAIT, QUEUE):
            results = [result_file(context.work, arm) for arm in chosen]
            if stage.meanwhile is not None and not all(result.is_file() for result in results):
                stage.meanwhile(context)
            for result in results:
                wait_for(result)
        try:
            if stage.then is not None:
                stage.then(context, load(arms))
        except StopPlan as stop:
            return stop.code
        if stage.name == until:
            print(f"stopped after stage {until} (--until)", flush=True)
            break
    return 0
