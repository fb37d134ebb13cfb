"""The command-line entry points, one module each, run as modules of the installed package:

    python -m trainer.entry.<name> …                                   (one process)
    accelerate launch [--config_file launch/accelerate/<setup>.yaml] -m trainer.entry.<name> …

pretrain, finetune, recipe and predict train or predict (plain or under `accelerate launch`); prepare_corpus and grid
run in one process; supervise and node_command wrap a launch line (preemption; SLURM). The `launch/*.py` files of
the repository are shims that call these `main()`s, for the commands users already type."""
