"""Run a grid of fine-tuning / pre-training / recipe runs and write the paper's tables and figures from them.

python -m trainer.entry.grid --config configs/grid/<name>.yaml [key.sub=value ...] [--shard i/n] [--report-only]
(or python launch/grid.py …)

Each point is `python -m trainer.entry.<stage>` (under `accelerate launch -m` with a `launcher`) with the base
config plus its axis values, in <output_dir>/points/<name>; finished points are skipped, interrupted ones resumed.
Writes <output_dir>/grid_results.jsonl, results.md and PNG (+ SVG) figures. --shard i/n runs every n-th point
(several machines or a SLURM array: launch/slurm/grid.sbatch).
"""
from trainer.cli import parse_args
from trainer.config import GridConfig
from trainer.errors import cli_entry


@cli_entry
def main():
    args, cfg = parse_args(GridConfig, __doc__, grid=True)
    from trainer import grid
    grid.run(cfg, grid.parse_shard(args.shard), report_only=args.report_only)


if __name__ == "__main__":
    main()
