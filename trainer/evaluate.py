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

from . import problems
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
    """Dev / test metrics of every task of a fine-tuning run, computed through the engine that trains it, and the
    number the run selects its best checkpoint by (`shortfall`, trainer/problems.py).

    `tasks` are `stages.finetune.Task`s (name, problem, vocab, spec, splits, lengths, data, batch())."""

    def __init__(self, tasks: list, accelerator, topo, select_metric: str = "auto"):
        self.tasks, self.accelerator, self.topo = tasks, accelerator, topo
        self.select = problems.selection_metrics([t.problem for t in tasks], select_metric)

    def logits(self, model, task, split: str) -> np.ndarray:
        device = self.accelerator.device

        def logits_of(idx):
            batch = {k: v.to(device) if torch.is_tensor(v) else v
                     for k, v in task.batch(split, idx, labels=False).items()}
            return model(**batch, task=task.name)[1]

        return gathered_logits(logits_of, task.lengths[split], task.data.eval_batch_size, task.spec.num_outputs,
                               self.topo.world_size, self.topo.rank, device, self.accelerator.gather)

    def _metrics(self, task, logits: np.ndarray, split: str) -> dict:
        thresholds = np.asarray(task.spec.thresholds, dtype=np.float32) if task.spec.thresholds else None
        return problems.metrics(task.problem, logits, task.splits[split].labels, task.vocab, thresholds)

    def __call__(self, model, split: str = "dev") -> dict:
        """{task: metrics} on `split` for the tasks that have it (collective)."""
        return {t.name: self._metrics(t, self.logits(model, t, split), split) for t in self.tasks if split in t.splits}

    def shortfall(self, result: dict) -> tuple[float, dict]:
        """(mean shortfall from perfect over the tasks — lower is better —, {task: (metric, value)})."""
        picked = {t.name: (m, result[t.name][m]) for t, m in zip(self.tasks, self.select) if t.name in result}
        return sum(problems.shortfall(m, v) for m, v in picked.values()) / len(picked), picked

    def write_results(self, model, path: Path, single: bool) -> None:
        """Evaluate dev and test once each (all tasks together) and write `eval_results.json` (collective):
        one task's {split: metrics}, or {task: {split: metrics}} for a multi-task run. A multi-label task with
        `data.tune_thresholds` first picks each label's threshold on dev (kept in its head, saved with it)."""
        model.eval()
        splits = [s for s in ("dev", "test") if any(s in t.splits for t in self.tasks)]
        with torch.no_grad():
            logits = {s: {t.name: self.logits(model, t, s) for t in self.tasks if s in t.splits} for s in splits}
        for t in self.tasks:
            if t.data.tune_thresholds:
                t.spec.thresholds = problems.tune_thresholds(logits["dev"][t.name], t.splits["dev"].labels,
                                                             t.data.threshold).tolist()
                log.info(f"{'' if single else t.name + ' '}thresholds tuned on dev: "
                         + ", ".join(f"{lab}={x:.2f}" for lab, x in zip(t.vocab, t.spec.thresholds)))
        results = {t.name: {s: self._metrics(t, logits[s][t.name], s) for s in splits if s in t.splits}
                   for t in self.tasks}
        if not self.accelerator.is_main_process:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results[self.tasks[0].name] if single else results, indent=1))
        for t in self.tasks:
            for split, r in results[t.name].items():
                log.info(f"{'' if single else t.name + ' '}{split}: {problems.summary_line(t.problem, r)} "
                         f"({r['n']} examples)")
