"""`python -m trainer.entry.predict` as a script: `python launch/predict.py …` (or under `accelerate launch`)."""
from trainer.entry.predict import main

if __name__ == "__main__":
    main()
