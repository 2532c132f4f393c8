"""Command-line flags generated from EngineConfig, so the CLI, the server, the profiler, the benchmarks and the
training tools share one set of names (--num-threads, --kv-cache-gb, ...)."""
import argparse
from collections.abc import Iterable
from dataclasses import MISSING, fields

from engine.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
                    helps: dict[str, str] | None = None, **defaults) -> argparse.ArgumentParser:
    """A flag per EngineConfig option (names: only those, e.g. a benchmark's), defaults overridden by keyword (a
    benchmark's own, e.g. num_threads=2) and help texts by helps."""
    options, helps = {f.name: f for f in fields(EngineConfig) if f.default is not MISSING}, helps or {}
    names = list(options) if names is None else list(names)
    if unknown := (set(names) | set(defaults) | set(helps)) - set(options):
        raise ValueError(f"not EngineConfig options: {sorted(unknown)}")
    if stray := (set(defaults) | set(helps)) - set(names):
        raise ValueError(f"defaults or helps for options not added: {sorted(stray)}")
    for name in names:
        default = defaults.get(name, options[name].default)
        flag, help_text = "--" + name.replace("_", "-"), f"{helps.get(name, '')} (default: {default!r})"
        if isinstance(options[name].default, bool):  # --enforce-eager / --no-enforce-eager
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text.lstrip())
            continue
        parser.add_argument(flag, type=type(options[name].default), default=default, help=help_text.lstrip())
    return parser


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig) if f.default is not MISSING}
    return EngineConfig(**{n: getattr(args, n) for n in names})
