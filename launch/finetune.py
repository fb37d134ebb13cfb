"""Fine-tuning for text classification (the paper's strategies) entry point.

accelerate launch [--config_file launch/accelerate/<setup>.yaml] launch/finetune.py --config <yaml> [key.sub=value ...]
python launch/finetune.py --config <yaml> --eval-only model.name_or_path=<run>/hf_model output_dir=<dir>
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import parse_args  # noqa: E402
from trainer.config import FinetuneConfig  # noqa: E402
from trainer.errors import cli_entry  # noqa: E402


@cli_entry
def main():
    args, cfg = parse_args(FinetuneConfig, __doc__, eval_only=True)
    from trainer.stages import finetune
    from trainer.distributed import shutdown
    finetune.run(cfg, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only)
    shutdown()


if __name__ == "__main__":
    main()
