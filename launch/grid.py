"""`python -m trainer.entry.grid` as a script: `python launch/grid.py …` (or under `accelerate launch`)."""
from trainer.entry.grid import main

if __name__ == "__main__":
    main()
