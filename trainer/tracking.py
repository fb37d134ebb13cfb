"""What a run reports: `metrics.jsonl`, wandb (main process only), a progress bar, tokens/s and MFU."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from . import logs
from .config import WandbConfig
from .plot import CURVES  # (stdlib only: matplotlib is imported when a figure is drawn)

# dense bf16 peak per GPU (TFLOP/s), for MFU
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                "V100": 125.0, "A6000": 155.0, "4090": 165.0}


def peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                tflops = 756.0
            return tflops * 1e12
    return None


class Tracker:
    def __init__(self, output_dir: Path, is_main: bool, wandb_cfg: WandbConfig, run_config: dict,
                 total_steps: int, start_step: int, wandb_id: Optional[str], flops_per_token: Optional[float],
                 world_size: int):
        self.is_main = is_main
        self.path = output_dir / "metrics.jsonl"
        self.wandb_run = None
        self.bar = None
        self._unhook_log = None
        self.flops_per_token = flops_per_token
        self.peak = peak_flops()
        self.world_size = world_size
        self.wandb_id = wandb_id
        if not is_main:
            return
        # a figure of a run being replaced (--overwrite) or continued is stale from now on; redrawn at the end
        (output_dir / CURVES).unlink(missing_ok=True)
        if wandb_cfg.mode != "disabled":
            import wandb
            self.wandb_run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                                        tags=list(wandb_cfg.tags), mode=wandb_cfg.mode, config=run_config,
                                        group=wandb_cfg.group,
                                        dir=str(output_dir), id=wandb_id, resume="allow" if wandb_id else None)
            self.wandb_id = self.wandb_run.id
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0)
        self._unhook_log = _log_around(self.bar)

    def log(self, record: dict) -> None:
        """Write one metrics line (main process) and mirror it to wandb and the bar."""
        if not self.is_main:
            return
        # flops_per_token: trainer/flops.py (the model's FLOPs per real token); tokens_per_second: all ranks
        if self.flops_per_token and self.peak and "tokens_per_second" in record:
            record["mfu"] = record["tokens_per_second"] * self.flops_per_token / (self.peak * self.world_size)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            prefix = "/".join(record[k] for k in ("split", "task") if k in record) + "/" if "split" in record else ""
            flat = {prefix + k: v for k, v in record.items() if k not in ("lr", "step") and isinstance(v, (int, float))}
            flat.update({f"lr/group_{i}": lr for i, lr in enumerate(record.get("lr", []))})
            self.wandb_run.log(flat, step=record["step"])
        if self.bar is not None and "lr" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{max(record['lr']):.2e}",
                                 tok_s=f"{record.get('tokens_per_second', 0):,.0f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.wandb_run.summary[k] = v

    def curves(self) -> None:
        """`<output_dir>/curves.png` from `metrics.jsonl`, at the end of a finished run (main process only).
        A failure to draw is one log line, never a failed run (see trainer/plot.py)."""
        if self.is_main:
            from .plot import write_curves  # matplotlib is imported there, only when a run finishes
            self._close_bar()  # the bar's last redraw must not land in the middle of the log line
            write_curves(self.path.parent)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._unhook_log()
            self.bar = None

    def close(self) -> None:
        self._close_bar()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _log_around(bar):
    """While the progress bar (stderr) is drawn, each job-log line (stdout; one terminal) clears it first and
    redraws it after — tqdm's `external_write_mode` — so a line never lands in the middle of the bar. Returns the
    undo."""
    handlers = [h for h in logging.getLogger(logs.ROOT).handlers if getattr(h, "_trainer", False)]
    for handler in handlers:
        def emit(record, _emit=handler.emit):
            with type(bar).external_write_mode():
                _emit(record)
        handler.emit = emit

    def undo() -> None:
        for handler in handlers:
            vars(handler).pop("emit", None)
    return undo
