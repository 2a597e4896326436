"""`nnunet_rndpo` command line: each subcommand is a thin call into the library.

Heavy imports (torch, nnU-Net) happen inside the subcommands, after the nnU-Net environment variables are
final: nnunetv2 reads them once, at import time.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, help_text: str):
    """Register `configure(parser)`'s companion `run(args)` under `name`."""

    def register(configure: Callable[[argparse.ArgumentParser], None]):
        def with_runner(run: Callable[[argparse.Namespace], int]):
            SUBCOMMANDS[name] = (help_text, configure, run)
            return run

        return with_runner

    return register


def _configure_env(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="exit 1 if nnUNet_extTrainer does not include our trainers")


@subcommand("env", "print the `export nnUNet_extTrainer=...` line (and unset nnU-Net variables)")(_configure_env)
def _run_env(args: argparse.Namespace) -> int:
    from nnunet_rndpo.nnunet_env import export_lines, ext_trainer_is_set

    if args.check:
        return 0 if ext_trainer_is_set() else 1
    print("\n".join(export_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    _load_subcommands()
    parser = argparse.ArgumentParser(
        prog="nnunet_rndpo",
        description="Preference fine-tuning (Region-Normalized DPO) for nnU-Net v2. "
        "Run `eval \"$(nnunet_rndpo env)\"` once so that nnUNetv2_train -tr nnUNetTrainerRNDPO finds our trainers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, _) in SUBCOMMANDS.items():
        configure(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def _load_subcommands() -> None:
    # Subcommands defined in other modules register themselves on import.
    import nnunet_rndpo.cli_commands  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _, _, run = SUBCOMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m nnunet_rndpo.cli`: run the imported module's main, because the subcommands in cli_commands
    # register themselves on nnunet_rndpo.cli.SUBCOMMANDS, not on this __main__ copy's.
    from nnunet_rndpo.cli import main as _package_main

    sys.exit(_package_main())
