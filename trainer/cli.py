"""Shared command line of the launch scripts: --config, key.sub=value overrides, --resume, --overwrite,
--eval-only (fine-tuning), --shard / --report-only (grids), --log-level / --log-all-ranks, --help.

Parsing also sets up the job log (trainer/logs.py) from the config's `log` section, so every line a run writes,
from config checks on, has its time, level and rank."""
from __future__ import annotations

import argparse

from . import config as config_mod
from . import logs
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
    add_log_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if not grid and args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    overrides = list(args.overrides)
    if args.log_level:
        overrides.append(f"log.level={args.log_level}")
    if args.log_all_ranks:
        overrides.append("log.all_ranks=true")
    cfg = config_mod.load(schema, args.config, overrides)
    logs.setup(cfg.log.level, cfg.log.all_ranks)
    return args, cfg


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=logs.LEVELS, default=None,
                        help="job log level (config key log.level; default info)")
    parser.add_argument("--log-all-ranks", action="store_true",
                        help="every rank writes the job log (config key log.all_ranks; default: main process)")
