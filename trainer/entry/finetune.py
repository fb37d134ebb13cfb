"""Fine-tuning for text classification (the paper's strategies) entry point.

accelerate launch [--config_file launch/accelerate/<setup>.yaml] -m trainer.entry.finetune --config <yaml> [key.sub=value ...]
python -m trainer.entry.finetune --config <yaml> --eval-only model.name_or_path=<run>/hf_model output_dir=<dir>
(launch/finetune.py is the same command: `accelerate launch launch/finetune.py …`, `python launch/finetune.py …`)
"""
from trainer.cli import parse_args
from trainer.config import FinetuneConfig
from trainer.errors import cli_entry


@cli_entry
def main():
    args, cfg = parse_args(FinetuneConfig, __doc__, eval_only=True)
    from trainer.distributed import shutdown
    from trainer.stages import finetune
    finetune.run(cfg, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only)
    shutdown()


if __name__ == "__main__":
    main()
