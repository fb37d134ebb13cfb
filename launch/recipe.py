"""The whole recipe (further pre-train → multi-task → per-task fine-tune) entry point.

accelerate launch [--config_file launch/accelerate/<setup>.yaml] launch/recipe.py --config <yaml> [key.sub=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import parse_args  # noqa: E402
from trainer.config import RecipeConfig  # noqa: E402
from trainer.errors import cli_entry  # noqa: E402


@cli_entry
def main():
    args, cfg = parse_args(RecipeConfig, __doc__)  # stages always resume; --overwrite starts the recipe afresh
    from trainer.distributed import shutdown
    from trainer.stages import recipe
    recipe.run(cfg, overwrite=args.overwrite)
    shutdown()


if __name__ == "__main__":
    main()
