"""`python -m trainer.entry.recipe` as a script: `python launch/recipe.py …` (or under `accelerate launch`)."""
from trainer.entry.recipe import main

if __name__ == "__main__":
    main()
