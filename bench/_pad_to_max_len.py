"""Run the fine-tuning stage with every batch padded to `text.max_len` (the pad-to-512 baseline of
bench/finetune_imdb.py). Same command line as launch/finetune.py; nothing else changes: the same examples,
the same length-grouped batch composition and order, the same model and optimizer — only the padding.

    python bench/_pad_to_max_len.py --config <yaml> [key.sub=value ...]

`trainer.text.batching.Collator.__call__` is wrapped: after the stage's own dynamic padding, input_ids are
right-padded with the pad id, attention_mask and token_type_ids with 0, up to text.max_len columns, so the
attention mask still hides the padding. The two runs are not bit-identical all the same: dropout masks are
drawn over [batch, width, hidden] tensors, so a different width gives different masks for the real tokens
too (plus float rounding), i.e. the runs are statistically equivalent, not equal.
The eval batches go through the same collator, so they are padded as well."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainer.cli import parse_args  # noqa: E402
from trainer.config import FinetuneConfig  # noqa: E402
from trainer.errors import cli_entry  # noqa: E402
from trainer.text import batching  # noqa: E402

PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}  # None → the collator's pad id


def patch_collator(width: int) -> None:
    original = batching.Collator.__call__

    def padded(self, encoded, labels):
        batch = original(self, encoded, labels)
        have = batch["input_ids"].shape[1]
        if have < width:
            for key, value in PAD_VALUES.items():
                t = batch[key]
                fill = self.pad_id if value is None else value
                batch[key] = torch.cat([t, torch.full((t.shape[0], width - have), fill, dtype=t.dtype)], dim=1)
        return batch

    batching.Collator.__call__ = padded


@cli_entry
def main():
    args, cfg = parse_args(FinetuneConfig, __doc__)
    if cfg.text.strategy == "hierarchical":
        sys.exit("error: _pad_to_max_len.py pads flat batches only (not text.strategy=hierarchical)")
    patch_collator(cfg.text.max_len)
    from trainer.stages import finetune
    finetune.run(cfg, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
