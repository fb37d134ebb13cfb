"""Classify a jsonl/csv/tsv/parquet file with a model exported by launch/finetune.py.

The truncation / hierarchy and label vocabulary are read from the model dir, so inputs are prepared exactly as
in training. Writes one JSON object per input row: {"label": ..., "probabilities": {label: p, ...}}.

    python launch/predict.py --model runs/tiny-finetune/hf_model --input data.jsonl --output preds.jsonl
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import Parser  # noqa: E402
from trainer.errors import cli_entry  # noqa: E402


@cli_entry
def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dir written by finetune.py (<output_dir>/hf_model)")
    parser.add_argument("--input", required=True, help="file with the same text field(s) as training")
    parser.add_argument("--output", required=True, help="jsonl to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--text_fields", nargs="+", default=None, help="default: the training config's")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    from trainer.predict import predict_file
    n = predict_file(args.model, args.input, args.output, args.text_fields, args.batch_size, args.overwrite)
    print(f"wrote {n} predictions to {args.output}")


if __name__ == "__main__":
    main()
