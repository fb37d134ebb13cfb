"""`python -m trainer.entry.finetune` as a script: `python launch/finetune.py …` (or under `accelerate launch`)."""
from trainer.entry.finetune import main

if __name__ == "__main__":
    main()
