"""Shared command-line plumbing of the scripts."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml


def apply_yaml_config(parser: argparse.ArgumentParser, argv: Sequence[str], known: Iterable[str]) -> dict[str, Any]:
    """If ``argv`` has ``--config FILE``, make the YAML mapping in it the parser's defaults.

    The command line then overrides the file. Unknown names are refused, naming them. Returns the
    values read (``{}`` without ``--config``).
    """
    pre, _ = parser.parse_known_args(argv)
    if not getattr(pre, "config", None):
        return {}
    path = Path(pre.config)
    if not path.is_file():
        raise ValueError(f"--config {pre.config!r} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {pre.config!r} must hold a mapping of argument names to values.")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {pre.config!r} has unknown arguments: {unknown}.")
    parser.set_defaults(**values)
    return values
