"""Turn a fine-tuned export into what serving needs: ONNX for onnxruntime (trainer/onnx_export.py).

    python launch/export.py --model runs/trec-minilm/hf_model --format onnx [--quantize int8]

writes <model>/onnx/model.onnx (dynamic batch and sequence axes; checked against PyTorch before it is kept),
with --quantize int8 also onnx/model_quantized.onnx (dynamic int8), and updates the model card. Predict with it:
`python launch/predict.py --model <model> --backend onnx …` (or --backend onnx-int8).
"""
import argparse
import json
import logging

from trainer import logs
from trainer.cli import Parser, add_log_flags
from trainer.errors import cli_entry

log = logging.getLogger(__name__)


@cli_entry
def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dir written by fine-tuning (<output_dir>/hf_model)")
    parser.add_argument("--format", required=True, choices=("onnx",))
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="also write onnx/model_quantized.onnx (onnxruntime dynamic int8 quantization)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23: ONNX's Attention op, which onnxruntime runs as one kernel)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing onnx/ folder")
    add_log_flags(parser)
    args = parser.parse_args()
    logs.setup(args.log_level or "info", args.log_all_ranks)
    from trainer.onnx_export import export
    info = export(args.model, quantize=args.quantize == "int8", overwrite=args.overwrite, opset=args.opset)
    int8 = (f"; int8: {info['int8_check_max_abs_diff']:.1e}, an approximation — measure its test error with "
            f"bench/onnx_speed.py" if "int8_check_max_abs_diff" in info else "")
    log.info(f"wrote {', '.join(info['files'].values())} to {info['dir']} (inputs {', '.join(info['inputs'])}; "
             f"max |output difference| vs PyTorch on a check batch: {info['check_max_abs_diff']:.1e}{int8})")
    log.debug(json.dumps(info))


if __name__ == "__main__":
    main()
