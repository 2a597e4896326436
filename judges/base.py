"""The judge interface: what a judge sees (JudgeInput), what it returns (one score per proposal), the registry.

A judge scores the K proposals of one case; higher = better. Label-free judges never read
`JudgeInput.true_labels`; only the research oracle (`needs_labels = True`) does, and the learned judges read it
in `fit`, on labeled cases only. Multi-class judges score each foreground class and average over classes
unless they document otherwise.
"""

from __future__ import annotations

import abc
import importlib
import pickle
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np

from nnunet_rndpo.atomic import save_pickle

STATE_FORMAT = 1


class JudgeError(ValueError):
    """A judge could not be built, failed on a case, or returned unusable scores."""


class JudgeInput:
    """Everything a judge may look at for one case.

    proposals: (K, *spatial) integer label maps, 0 = background, on the image's grid.
    labels: the foreground label values to judge, e.g. (1, 2).
    image: (C, *spatial) preprocessed image, if available.
    mean_probabilities: (num_classes, *spatial) base-model softmax averaged over the proposals' passes;
        channel index = label value, channel 0 = background.
    true_labels: (*spatial) true label map: only for the oracle, for fitting learned judges, and the audit.
    proposal_models: which model made each proposal (K entries: 0 = the base, i = extra network i (another fold),
        "ensemble" = nnU-Net's ensemble of them all), if known.

    `image` and `mean_probabilities` may be given as functions that load them: a judge that never looks at one
    never loads it (at CT size the mean probabilities of a case are gigabytes). They are checked when loaded.
    """

    def __init__(
        self,
        case_id: str,
        proposals: np.ndarray,
        labels: Sequence[int],
        image: np.ndarray | Callable[[], np.ndarray | None] | None = None,
        mean_probabilities: np.ndarray | Callable[[], np.ndarray | None] | None = None,
        true_labels: np.ndarray | None = None,
        proposal_models: Sequence | None = None,
    ) -> None:
        self.case_id = str(case_id)
        self.proposals = np.asarray(proposals)
        self.labels = tuple(int(label) for label in labels)
        where = self._where
        if self.proposals.ndim < 2:
            raise ValueError(f"{where}: proposals must be (K, *spatial), got shape {self.proposals.shape}")
        if not np.issubdtype(self.proposals.dtype, np.integer) and self.proposals.dtype != bool:
            raise ValueError(f"{where}: proposals must be integer label maps, got dtype {self.proposals.dtype}")
        if not self.labels or 0 in self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{where}: labels must be distinct foreground values (not 0), got {self.labels}")
        self._sources: dict[str, Any] = {}
        self._loaded: dict[str, np.ndarray | None] = {}
        self.image = image
        self.mean_probabilities = mean_probabilities
        self.true_labels = None if true_labels is None else np.asarray(true_labels)
        if self.true_labels is not None and self.true_labels.shape != self.spatial_shape:
            raise ValueError(f"{where}: true_labels must have shape {self.spatial_shape}, got {self.true_labels.shape}")
        self.proposal_models = None if proposal_models is None else tuple(proposal_models)
        if self.proposal_models is not None and len(self.proposal_models) != self.proposal_count:
            raise ValueError(
                f"{where}: proposal_models names {len(self.proposal_models)} models for {self.proposal_count} proposals"
            )

    @property
    def _where(self) -> str:
        return f"case {self.case_id!r}"

    def _checked(self, name: str, value: Any) -> np.ndarray | None:
        if value is None:
            return None
        value = np.asarray(value)
        if value.shape[1:] != self.spatial_shape:
            raise ValueError(
                f"{self._where}: {name} must be (channels, *{self.spatial_shape}), got shape {value.shape}"
            )
        if name == "mean_probabilities" and value.shape[0] <= max(self.labels):
            raise ValueError(
                f"{self._where}: mean_probabilities has {value.shape[0]} channels, "
                f"too few for label {max(self.labels)} (channel index = label value)"
            )
        return value

    def _get(self, name: str) -> np.ndarray | None:
        if name not in self._loaded:
            self._loaded[name] = self._checked(name, self._sources[name]())
        return self._loaded[name]

    def _set(self, name: str, value: Any) -> None:
        self._sources[name] = value
        self._loaded.pop(name, None)
        if not callable(value):
            self._loaded[name] = self._checked(name, value)

    @property
    def image(self) -> np.ndarray | None:
        return self._get("image")

    @image.setter
    def image(self, value: Any) -> None:
        self._set("image", value)

    @property
    def mean_probabilities(self) -> np.ndarray | None:
        return self._get("mean_probabilities")

    @mean_probabilities.setter
    def mean_probabilities(self, value: Any) -> None:
        self._set("mean_probabilities", value)

    @property
    def proposal_count(self) -> int:
        return int(self.proposals.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.proposals.shape[1:])


class FitExamples(Protocol):
    """The labeled examples a judge may learn from, each kind made only when a judge asks for it
    (nnunet_rndpo/judging.py makes them from nnU-Net's folders; tests make them by hand)."""

    def true_label_maps(self, with_images: bool = False) -> Sequence[JudgeInput]:
        """The labeled training cases, each as its true label map (one 'proposal') with `true_labels` set, and
        with its image when asked: what a judge of anatomy or an atlas learns from."""

    def held_out_predictions(self) -> Sequence[JudgeInput]:
        """Each fold model's proposals for the labeled cases it did not train on, with `true_labels` set: honest
        examples of the model's errors, for a judge that learns from proposals."""


class Judge(abc.ABC):
    """Base class of all judges. Subclasses set `name` and implement `score`; a judge that learns implements `fit`
    and, when it learns from anything but the models' held-out predictions, `fit_from` (which asks for its data).

    Persistence: `options()` returns the constructor keywords, `fitted_state()` what `fit` learned; `state()`
    bundles both with the class path so `Judge.load` can rebuild the judge beside the proposal store.
    """

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    # True for judges whose scores come from per-voxel class probabilities of their own (atlas), which
    # `score_with_voxels` returns: the `judge_voxels` preference region pushes only where they side with the pick.
    gives_voxel_probabilities: ClassVar[bool] = False

    def fit(self, labeled_cases: Sequence[JudgeInput]) -> None:
        """Learn from labeled cases (proposals + reference). Most judges have nothing to learn."""

    def fit_from(self, examples: FitExamples) -> None:
        """Ask `examples` for what this judge learns from, and fit on it. By default a judge that learns learns from
        proposals: the fold models' held-out predictions (a regressor of mask quality, a user's own judge). Judges
        that learn from the labels alone override this to ask for the true label maps."""
        if self.learns:
            self.fit(examples.held_out_predictions())

    @property
    def learns(self) -> bool:
        """Whether `fit` learns anything, i.e. whether labeled cases must be prepared for it: by default,
        whether the class overrides `fit` (a combination judge learns only if one of its judges does)."""
        return type(self).fit is not Judge.fit

    @abc.abstractmethod
    def score(self, case: JudgeInput) -> np.ndarray:
        """(K,) float scores for the case's proposals, higher = better."""

    def score_with_voxels(self, case: JudgeInput) -> tuple[np.ndarray, np.ndarray | None]:
        """The scores and, for a judge that `gives_voxel_probabilities`, the (num_classes, *spatial) per-voxel
        class probabilities (channel index = label value) they were computed from; None for the others."""
        return self.score(case), None

    def options(self) -> dict[str, Any]:
        """Constructor keywords that rebuild this judge (unfitted)."""
        return {}

    def fitted_state(self) -> dict[str, Any]:
        """What `fit` learned; empty for judges without a fit."""
        return {}

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        """Restore what `fitted_state` returned."""
        if fitted:
            raise JudgeError(f"judge {self.display_name!r} has no fitted state to restore")

    @property
    def display_name(self) -> str:
        return self.name or type(self).__name__

    def describe(self) -> str:
        """One line for logs and reports."""
        options = ", ".join(f"{key}={value!r}" for key, value in sorted(self.options().items()))
        return f"judge {self.display_name!r} ({type(self).__name__}{', ' + options if options else ''})"

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in sorted(self.options().items()))
        return f"{type(self).__name__}({options})"

    def state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "name": self.display_name,
            "options": self.options(),
            "fitted": self.fitted_state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Judge":
        """Rebuild a judge from `state()`; called on the base class it resolves the stored class path."""
        if state.get("format") != STATE_FORMAT:
            raise JudgeError(f"unsupported judge state format {state.get('format')!r} (expected {STATE_FORMAT})")
        judge_class = _import_attribute(state["class"]) if cls is Judge else cls
        if not (isinstance(judge_class, type) and issubclass(judge_class, Judge)):
            raise JudgeError(f"{state['class']!r} is not a Judge subclass")
        judge = judge_class(**state["options"])
        judge.load_fitted_state(state["fitted"])
        return judge

    def save(self, path: str | Path) -> None:
        """Write the judge (options and fitted state) atomically as a pickle."""
        save_pickle(self.state(), path)

    @staticmethod
    def load(path: str | Path) -> "Judge":
        """Load a judge written by `save`. Pickles run code when loaded: load only files you wrote."""
        with open(path, "rb") as handle:
            state = pickle.load(handle)
        return Judge.from_state(state)


def score_case(judge: Judge, case: JudgeInput) -> np.ndarray:
    """Score one case and check the result: (K,) finite floats, else a JudgeError naming judge and case."""
    return _checked_scores(judge, case, _call(judge, case, judge.score))


def score_case_with_voxels(judge: Judge, case: JudgeInput) -> tuple[np.ndarray, np.ndarray | None]:
    """`score_case` and the judge's per-voxel class probabilities (`Judge.score_with_voxels`), checked: None for a
    judge without them, else finite float32 of shape (num_classes, *spatial) with a channel for every label."""
    raw_scores, raw_probabilities = _call(judge, case, judge.score_with_voxels)
    scores = _checked_scores(judge, case, raw_scores)
    where = f"judge {judge.display_name!r} on case {case.case_id!r}"
    if raw_probabilities is None:
        if judge.gives_voxel_probabilities:
            raise JudgeError(
                f"{where} says it gives voxel probabilities (gives_voxel_probabilities) but score_with_voxels "
                "returned none: override score_with_voxels to return (scores, probabilities)"
            )
        return scores, None
    probabilities = np.asarray(raw_probabilities, dtype=np.float32)
    if probabilities.shape[1:] != case.spatial_shape or probabilities.shape[0] <= max(case.labels):
        raise JudgeError(
            f"{where} returned voxel probabilities of shape {probabilities.shape}, expected "
            f"(at least {max(case.labels) + 1}, *{case.spatial_shape})"
        )
    if not np.all(np.isfinite(probabilities)):
        raise JudgeError(f"{where} returned non-finite voxel probabilities")
    return scores, probabilities


def _call(judge: Judge, case: JudgeInput, method) -> Any:
    try:
        return method(case)
    except Exception as error:
        raise JudgeError(
            f"judge {judge.display_name!r} on case {case.case_id!r} failed: {type(error).__name__}: {error}"
        ) from error


def _checked_scores(judge: Judge, case: JudgeInput, raw_scores: Any) -> np.ndarray:
    where = f"judge {judge.display_name!r} on case {case.case_id!r}"
    try:
        scores = np.asarray(raw_scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise JudgeError(f"{where} returned scores that are not numbers: {error}") from error
    if scores.shape != (case.proposal_count,):
        raise JudgeError(f"{where} returned scores of shape {scores.shape}, expected ({case.proposal_count},)")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise JudgeError(
            f"{where} returned non-finite scores (NaN or inf) for proposals {bad.tolist()}: {scores[bad].tolist()}"
        )
    return scores


_REGISTRY: dict[str, type[Judge]] = {}


def register_judge(name: str, judge_class: type[Judge], *, replace: bool = False) -> None:
    """Make `judge_class` available to `get_judge(name)`."""
    if not (isinstance(judge_class, type) and issubclass(judge_class, Judge)):
        raise JudgeError(f"cannot register {judge_class!r} as {name!r}: not a Judge subclass")
    if ":" in name or not name:
        raise JudgeError(f"invalid judge name {name!r}: names are non-empty and contain no ':'")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not judge_class and not replace:
        raise JudgeError(f"judge name {name!r} is already registered to {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = judge_class


def available_judges() -> list[str]:
    return sorted(_REGISTRY)


def judges_with_voxel_probabilities() -> list[str]:
    """Registered judges that `gives_voxel_probabilities` (what the `judge_voxels` preference region needs)."""
    return sorted(name for name, judge_class in _REGISTRY.items() if judge_class.gives_voxel_probabilities)


def get_judge(spec: str, **options: Any) -> Judge:
    """Build a judge from a registered name ("agreement") or a dotted path ("mypkg.module:MyJudge")."""
    if ":" in spec:
        judge_class = _import_attribute(spec)
        where = f"judge {spec!r}"
    elif spec in _REGISTRY:
        judge_class = _REGISTRY[spec]
        where = f"judge {spec!r}"
    else:
        raise JudgeError(
            f"unknown judge {spec!r}; valid names: {', '.join(available_judges())}, "
            "or a dotted path 'package.module:ClassName'"
        )
    if not callable(judge_class):
        raise JudgeError(f"{where} is not a class or factory")
    try:
        judge = judge_class(**options)
    except TypeError as error:
        raise JudgeError(f"{where} does not accept options {sorted(options)}: {error}") from error
    if not isinstance(judge, Judge):
        raise JudgeError(f"{where} built a {type(judge).__name__}, not a nnunet_rndpo Judge subclass instance")
    return judge


def _import_attribute(path: str) -> Any:
    module_name, _, attribute_path = path.partition(":")
    if not module_name or not attribute_path:
        raise JudgeError(f"invalid dotted path {path!r}: expected 'package.module:ClassName'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise JudgeError(f"cannot import module {module_name!r} for judge {path!r}: {error}") from error
    for attribute in attribute_path.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError as error:
            raise JudgeError(f"module {module_name!r} has no attribute {attribute_path!r} (judge {path!r})") from error
    return target
