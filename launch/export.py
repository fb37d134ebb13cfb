"""`python -m trainer.entry.export` as a script: `python launch/export.py --model <run>/hf_model --format onnx`."""
from trainer.entry.export import main

if __name__ == "__main__":
    main()
