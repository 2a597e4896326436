"""nnU-Net's environment variables, and the one this package needs: nnUNet_extTrainer.

nnU-Net looks trainers up by name, first in its own folder and then in the folders listed in
`nnUNet_extTrainer`. Ours live in the installed package folder `nnunet_rndpo/trainers` (the repository's
top-level `trainers/`), whose modules only re-export classes defined in the library.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NNUNET_FOLDER_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
EXT_TRAINER_VARIABLE = "nnUNet_extTrainer"


def ext_trainer_folder() -> Path:
    """The installed folder that holds our trainer re-exports (works for editable and plain installs). Found, not
    imported: importing the trainers imports nnunetv2, which reads nnU-Net's variables once, at import."""
    spec = importlib.util.find_spec("nnunet_rndpo.trainers")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def ext_trainer_value(current: str | None = None) -> str:
    """`nnUNet_extTrainer` with our folder added (first), keeping the user's other folders."""
    ours = str(ext_trainer_folder())
    others = [p for p in (current or "").split(os.pathsep) if p.strip() and Path(p).resolve() != Path(ours)]
    return os.pathsep.join([ours, *others])


def ext_trainer_is_set(environ: dict | None = None) -> bool:
    environ = os.environ if environ is None else environ
    ours = ext_trainer_folder()
    return any(p.strip() and Path(p).resolve() == ours for p in environ.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep))


def ensure_ext_trainer(environ: dict | None = None) -> None:
    """Add our folder to nnUNet_extTrainer in `environ` (default: this process, inherited by children)."""
    environ = os.environ if environ is None else environ
    if not ext_trainer_is_set(environ):
        environ[EXT_TRAINER_VARIABLE] = ext_trainer_value(environ.get(EXT_TRAINER_VARIABLE))


def export_lines(environ: dict | None = None) -> list[str]:
    """Shell lines that make nnU-Net find our trainers; an unset nnU-Net folder is a comment saying what to do (never
    a live export of a made-up folder: `eval "$(nnunet_rndpo env)"` must not set a folder the user did not choose)."""
    environ = os.environ if environ is None else environ
    lines = [f"export {EXT_TRAINER_VARIABLE}={_shell_quote(ext_trainer_value(environ.get(EXT_TRAINER_VARIABLE)))}"]
    for name in NNUNET_FOLDER_VARIABLES:
        if not environ.get(name):
            lines.append(
                f"# {name} is not set: nnU-Net needs it. Set it to your folder before training, e.g. "
                f"export {name}=/path/to/{name} (nnU-Net's documentation: set_environment_variables.md)"
            )
    return lines


def require_nnunet_folders(environ: dict | None = None) -> dict[str, Path]:
    """The three nnU-Net folders; a clear error naming the unset ones."""
    environ = os.environ if environ is None else environ
    missing = [name for name in NNUNET_FOLDER_VARIABLES if not environ.get(name)]
    if missing:
        raise RuntimeError(
            f"nnU-Net environment variable(s) not set: {', '.join(missing)}. "
            "Set them (see `nnunet_rndpo env`) before running this command."
        )
    return {name: Path(environ[name]) for name in NNUNET_FOLDER_VARIABLES}


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)
