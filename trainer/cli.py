"""Shared command line of the launch scripts: --config, key.sub=value overrides, --resume, --overwrite, --help."""
from __future__ import annotations

import argparse

from . import config as config_mod
from .errors import UserError


class Parser(argparse.ArgumentParser):
    """Command-line mistakes are bad input like any other: one `error:` line (via cli_entry), exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def parse_args(schema, doc: str, argv=None, eval_only: bool = False, grid: bool = False):
    parser = Parser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key.sub=value):\n" + "\n".join(config_mod.describe(schema)))
    parser.add_argument("--config", help="YAML run config")
    if grid:  # a grid always skips finished points and resumes interrupted ones
        parser.add_argument("--shard", default=None, metavar="i/n", help="run every n-th point from the i-th")
        parser.add_argument("--report-only", action="store_true", help="collect finished points and redraw only")
    else:
        parser.add_argument("--resume", action="store_true", help="continue from the output dir's latest checkpoint")
        parser.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir")
    if eval_only:
        parser.add_argument("--eval-only", action="store_true",
                            help="no training: evaluate model.name_or_path (an exported classifier) or the output "
                                 "dir's latest checkpoint on dev/test; writes eval_results.json")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if not grid and args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    return args, config_mod.load(schema, args.config, args.overrides)
