"""`python -m trainer.entry.node_command` as a script: `python launch/slurm/node_command.py [options] -- …`."""
import sys

from trainer.entry.node_command import main

if __name__ == "__main__":
    sys.exit(main())
