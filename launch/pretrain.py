"""Further pre-training (MLM) entry point.

accelerate launch [--config_file launch/accelerate/<setup>.yaml] launch/pretrain.py --config <yaml> [key.sub=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import parse_args  # noqa: E402
from trainer.config import PretrainConfig  # noqa: E402
from trainer.errors import cli_entry  # noqa: E402


@cli_entry
def main():
    args, cfg = parse_args(PretrainConfig, __doc__)
    from trainer.stages import pretrain
    from trainer.distributed import shutdown
    pretrain.run(cfg, resume=args.resume, overwrite=args.overwrite)
    shutdown()


if __name__ == "__main__":
    main()
