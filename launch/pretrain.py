"""`python -m trainer.entry.pretrain` as a script: `python launch/pretrain.py …` (or under `accelerate launch`)."""
from trainer.entry.pretrain import main

if __name__ == "__main__":
    main()
