"""`python -m trainer.entry.supervise` as a script: `python launch/supervise.py <launch command> …`."""
import sys

from trainer.entry.supervise import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
