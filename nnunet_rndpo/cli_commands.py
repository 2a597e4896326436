"""Subcommands beyond `env`: propose, judge, audit, export, demo (each a thin call into the library)."""
from __future__ import annotations
