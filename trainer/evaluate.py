"""A classifier run over prepared examples — fine-tuning's dev / test evaluation and `predict` share it.

`gathered_logits` runs this rank's share of a split and gathers every rank's logits back into example order.
Each rank runs the same number of equally sized batches (`text.batching.rank_eval_batches` pads the last one
with repeated examples marked invalid): under ZeRO-3 every forward is a collective, and a rank with one batch
fewer would leave the others waiting for it forever."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .metrics import classification_metrics
from .text.batching import rank_eval_batches

log = logging.getLogger(__name__)


def gathered_logits(logits_of: Callable[[np.ndarray], torch.Tensor], lengths: np.ndarray, batch_size: int,
                    width: int, world: int, rank: int, device, gather, progress=None) -> np.ndarray:
    """Logits (n × width, float32, in example order) of the n examples whose lengths are given.

    logits_of(indexes) → this batch's logits; gather(tensor) → the tensor concatenated over ranks (accelerate's
    `gather`, collective); progress (optional) wraps the batch list (a tqdm bar on the main process). Example
    indexes travel in float64, exact far beyond any data set's size."""
    out = np.zeros((len(lengths), width), dtype=np.float32)
    plan = rank_eval_batches(lengths, batch_size, world, rank)
    for idx, valid in (progress(plan) if progress else plan):
        logits = logits_of(idx).to(device, torch.float64)
        packed = torch.cat([torch.as_tensor(idx, device=device, dtype=torch.float64).unsqueeze(1),
                            torch.as_tensor(valid, device=device, dtype=torch.float64).unsqueeze(1), logits], dim=1)
        table = gather(packed).cpu()
        table = table[table[:, 1] > 0]
        out[table[:, 0].long().numpy()] = table[:, 2:].float().numpy()
    return out


class Evaluator:
    """Dev / test metrics of every task of a fine-tuning run, computed through the engine that trains it.

    `tasks` are `stages.finetune.Task`s (name, vocab, splits, lengths, data.eval_batch_size, batch())."""

    def __init__(self, tasks: list, accelerator, topo):
        self.tasks, self.accelerator, self.topo = tasks, accelerator, topo

    def logits(self, model, task, split: str) -> np.ndarray:
        device = self.accelerator.device

        def logits_of(idx):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in task.batch(split, idx).items()}
            return model(**batch, task=task.name)[1]

        return gathered_logits(logits_of, task.lengths[split], task.data.eval_batch_size, len(task.vocab),
                               self.topo.world_size, self.topo.rank, device, self.accelerator.gather)

    def __call__(self, model, split: str = "dev") -> dict:
        """{task: metrics} on `split` for the tasks that have it (collective)."""
        return {t.name: classification_metrics(self.logits(model, t, split).argmax(-1), t.splits[split].labels,
                                               len(t.vocab)) for t in self.tasks if split in t.splits}

    def write_results(self, model, path: Path, single: bool) -> None:
        """Evaluate dev and test once each (all tasks together) and write `eval_results.json` (collective):
        one task's {split: metrics}, or {task: {split: metrics}} for a multi-task run."""
        model.eval()
        splits = [s for s in ("dev", "test") if any(s in t.splits for t in self.tasks)]
        with torch.no_grad():
            by_split = {s: self(model, s) for s in splits}
        results = {t.name: {s: by_split[s][t.name] for s in splits if s in t.splits} for t in self.tasks}
        if not self.accelerator.is_main_process:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results[self.tasks[0].name] if single else results, indent=1))
        for t in self.tasks:
            for split, r in results[t.name].items():
                log.info(f"{'' if single else t.name + ' '}{split}: accuracy {r['accuracy']:.4f} · "
                         f"error {r['error_rate']:.4f} · macro-F1 {r['macro_f1']:.4f} ({r['n']} examples)")
