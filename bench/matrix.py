"""Run the whole setup matrix (tests/test_matrix.py, every cell) and write its table to bench/RESULTS_matrix.md.

    python bench/matrix.py [-k PATTERN] [--out bench/RESULTS_matrix.md]

Each cell is a pytest case; this runs them all (BERT_RECIPE_MATRIX=all), reads pytest's JUnit XML and writes
cell → pass / fail (first line of the failure) / skipped (reason) with each cell's time. About 40-60 min on the
2-core CPU machine."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_matrix import EXPECTED, FAMILIES, FAMILY_CELLS, PRECISIONS, SETUPS  # noqa: E402


def outcomes(junit: Path) -> dict:
    """test id (the parametrize id) → (status, detail, seconds)."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        cell = case.get("name").split("[", 1)[-1].rstrip("]")
        kind = case.get("name").split("[", 1)[0]
        status, detail = "pass", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = "skipped" if tag == "skipped" else "FAIL"
                detail = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
        found[(kind, cell)] = (status, detail, float(case.get("time", 0)))
    return found


def render(found: dict, command: str, wall: float) -> str:
    def cell(kind, key):
        status, detail, secs = found.get((kind, key), ("not run", "", 0.0))
        return f"{status} ({secs:.0f} s)" + (f": {detail}" if detail else "")

    lines = ["# Setup matrix (CPU)", "",
             f"Command: `{command}` — {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, total {wall / 60:.1f} min.", "",
             "What every cell asserts: each stage ran under the engine / ZeRO stage / offload / precision it was "
             "launched with (read back from the prepared engine into `metrics.jsonl`), the loss fell, every export "
             "reloads with `from_pretrained` as fp32, the next stage and predict run from it, and a pre-training "
             "run stopped at step 4 and resumed matches the uninterrupted run (loss rel 1e-5, lr rel 1e-9).", "",
             "Expected per setup: " + "; ".join(f"`{s}` → {e} ZeRO-{z}, offload {o}"
                                                 for s, (e, z, o) in EXPECTED.items()) + ".", "",
             "## Recipe cells (BERT): further pre-training → ITPT-FiT ×3 → MFiT → MFiT-FiT ×3 → predict", "",
             "| setup | " + " | ".join(PRECISIONS) + " |", "|---|" + "---|" * len(PRECISIONS)]
    for s in SETUPS:
        lines.append(f"| `{s}` | " + " | ".join(cell("test_recipe_cell", f"{s}-{p}") for p in PRECISIONS) + " |")
    lines += ["", "## Family cells: pre-training (stop + resume) → fine-tuning from its export → predict", "",
              "Precision alternates so that every (family, setup), (family, precision) and (setup, precision) "
              "pair is covered.", "",
              "| family | " + " | ".join(f"`{s}`" for s in SETUPS) + " |", "|---|" + "---|" * len(SETUPS)]
    for f in FAMILIES:
        row = []
        for s in SETUPS:
            p = next(p for ff, ss, p in FAMILY_CELLS if (ff, ss) == (f, s))
            row.append(f"{p}: " + cell("test_family_cell", f"{f}-{s}-{p}"))
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    lines += ["", "## Not in the CPU matrix", "",
              "- fp16: DeepSpeed's CPU accelerator refuses it (\"Type fp16 is not supported on your device\") and "
              "accelerate's CPU autocast has none, so the trainer refuses `model.precision=fp16` without a GPU in "
              "one line. On GPU, steps the loss scaler skips are counted (`skipped_steps`), not errors.",
              "- `single_gpu`, `multi_gpu`, `zero2`, `zero3`, `zero3_offload`, `multi_node` need GPUs; their CPU "
              "twins above run the same code paths (`single`, `cpu_ddp`, `cpu_zero2`, `cpu_zero3`, "
              "`cpu_zero3_offload`), with gloo instead of NCCL.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of cells)")
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS_matrix.md"))
    args = parser.parse_args()
    junit = Path(tempfile.mkdtemp()) / "matrix.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", str(REPO / "tests" / "test_matrix.py"), f"--junitxml={junit}",
           "-p", "no:cacheprovider"] + (["-k", args.k] if args.k else [])
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "BERT_RECIPE_MATRIX": "all"})
    text = render(outcomes(junit), "python bench/matrix.py" + (f" -k '{args.k}'" if args.k else ""),
                  time.time() - t0)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
