"""The whole recipe (further pre-train → multi-task → per-task fine-tune) entry point.

accelerate launch [--config_file launch/accelerate/<setup>.yaml] -m trainer.entry.recipe --config <yaml> [key.sub=value ...]
(launch/recipe.py is the same command: `accelerate launch launch/recipe.py …`)
"""
from trainer.cli import parse_args
from trainer.config import RecipeConfig
from trainer.errors import cli_entry


@cli_entry
def main():
    args, cfg = parse_args(RecipeConfig, __doc__)  # stages always resume; --overwrite starts the recipe afresh
    from trainer.distributed import shutdown
    from trainer.stages import recipe
    recipe.run(cfg, overwrite=args.overwrite)
    shutdown()


if __name__ == "__main__":
    main()
