"""Classify a file (or a hub dataset split) with a model exported by fine-tuning (trainer.entry.finetune).

The truncation / hierarchy and label vocabulary are read from the model dir, so inputs are prepared exactly as
in training (and cached: a second prediction over the same file with the same tokenizer skips tokenizing).
Formats by extension, in and out: .jsonl, .csv, .tsv, .parquet. One output row per input row, in input order:
the pass-through columns asked for, the prediction — `label` (single-label), `labels` (multi-label: a list; one
cell joined by the training separator in csv/tsv) or `value` (regression) —, the probabilities (jsonl: a
`probabilities` object; csv/tsv/parquet: `p_<label>` columns), and `error` when some rows could not be read. With a label column in the input, metrics go
to <output>.metrics.json. Several processes split the rows (one merged output):

    python -m trainer.entry.predict --model runs/tiny-finetune/hf_model --input data.jsonl --output preds.jsonl
    accelerate launch --num_processes 2 -m trainer.entry.predict --model … --input big.parquet --output preds.parquet --id_field id
    python launch/predict.py --model … --backend onnx …    # onnxruntime (after launch/export.py --format onnx)
    (launch/predict.py is the same command)
"""
import argparse
import logging

from trainer import logs
from trainer.cli import Parser, add_log_flags
from trainer.errors import cli_entry

log = logging.getLogger(__name__)


@cli_entry
def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dir written by fine-tuning (<output_dir>/hf_model)")
    parser.add_argument("--input", required=True, help="file with the same text field(s) as training")
    parser.add_argument("--output", required=True, help="file to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--text_fields", nargs="+", default=None, help="default: the training config's")
    parser.add_argument("--label_field", default=None,
                        help="labels for metrics, if the input has them (default: the training config's)")
    parser.add_argument("--id_field", default=None, help="a column copied to the output (first)")
    parser.add_argument("--keep", nargs="+", default=(), metavar="FIELD", help="more columns copied to the output")
    parser.add_argument("--no_probabilities", action="store_true", help="write only the predicted label")
    parser.add_argument("--skip_bad_rows", action="store_true",
                        help="leave unreadable or empty rows out (default: predict them as empty text, marked)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx", "onnx-int8"),
                        help="onnx / onnx-int8: the export's onnx/model.onnx / model_quantized.onnx through "
                             "onnxruntime (write them with launch/export.py --format onnx [--quantize int8])")
    parser.add_argument("--num_proc", type=int, default=1, help="tokenizer processes while preparing the input")
    parser.add_argument("--overwrite", action="store_true")
    add_log_flags(parser)
    args = parser.parse_args()
    logs.setup(args.log_level or "info", args.log_all_ranks)
    from trainer.distributed import shutdown
    from trainer.predict import predict_file
    from trainer.problems import summary_line
    summary = predict_file(args.model, args.input, args.output, text_fields=args.text_fields,
                           label_field=args.label_field, id_field=args.id_field, keep=tuple(args.keep),
                           probabilities=not args.no_probabilities, skip_bad_rows=args.skip_bad_rows,
                           batch_size=args.batch_size, overwrite=args.overwrite, num_proc=args.num_proc,
                           backend=args.backend)
    if summary:
        metrics = summary.get("metrics")
        log.info(f"wrote {summary['predicted']} predictions to {args.output}" + (
            f" · {summary_line(metrics['problem_type'], metrics)} on {metrics['n']} labelled rows "
            f"({args.output}.metrics.json)" if metrics else ""))
    shutdown()


if __name__ == "__main__":
    main()
