"""Command-line flags generated from EngineConfig, so the CLI, the server and the offline API share one set."""
import argparse
from dataclasses import MISSING, fields

from engine.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for f in fields(EngineConfig):
        if f.default is MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):  # --enforce-eager / --no-enforce-eager
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"(default: {f.default!r})")
            continue
        parser.add_argument(flag, type=type(f.default), default=f.default, help=f"(default: {f.default!r})")
    return parser


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig) if f.default is not MISSING}
    return EngineConfig(**{n: getattr(args, n) for n in names})
