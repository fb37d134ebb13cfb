"""Further pre-training (MLM) entry point.

accelerate launch [--config_file launch/accelerate/<setup>.yaml] -m trainer.entry.pretrain --config <yaml> [key.sub=value ...]
(launch/pretrain.py is the same command: `accelerate launch launch/pretrain.py …`)
"""
from trainer.cli import parse_args
from trainer.config import PretrainConfig
from trainer.errors import cli_entry


@cli_entry
def main():
    args, cfg = parse_args(PretrainConfig, __doc__)
    from trainer.distributed import shutdown
    from trainer.stages import pretrain
    pretrain.run(cfg, resume=args.resume, overwrite=args.overwrite)
    shutdown()


if __name__ == "__main__":
    main()
