"""`python -m trainer.entry.prepare_corpus` as a script: `python launch/prepare_corpus.py …`."""
from trainer.entry.prepare_corpus import main

if __name__ == "__main__":
    main()
