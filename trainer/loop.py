"""The one training loop every stage runs: step · accumulate · clip · schedule · log · checkpoint.

A stage decides *what* goes in (a `Job`); the loop decides *how* it is trained. Randomness that affects
training (dropout) is reseeded from (seed, step, rank) at every optimizer step, and data order/masks are
functions of the global sample position, so a resumed run repeats an uninterrupted one exactly."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from . import checkpoint, reshard
from .checkpoint import TrainerState
from .config import OptimConfig, TrainConfig, WandbConfig
from .distributed import Topology, decided_by_main
from .errors import UserError
from .model_card import hardware
from .optim.param_groups import implementation, keep_implementation
from .optim.schedules import GroupSchedule
from .preemption import StopRequest
from .tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Job:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Callable[[int], Iterator[dict]]  # start sample → this rank's micro-batches, forever
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    samples_per_epoch: int
    # (accelerator, model, what was trained: steps, samples, global_batch, best_step, engine facts, hardware) →
    # the final HF export (and its model card, trainer/model_card.py)
    export: Callable[[object, torch.nn.Module, dict], None]
    tokens: Callable[[dict], torch.Tensor] = (  # real tokens (an unpadded batch has no padding to mask)
        lambda b: b["attention_mask"].sum() if "attention_mask" in b else torch.tensor(b["input_ids"].numel()))
    flops_per_token: Optional[float] = None
    # fine-tuning: model → {task: dev metrics} (collective); `select` turns them into (one number, lower is better;
    # {task: (metric, value)}) — trainer/problems.py. The loop keeps the best checkpoint and restores it before
    # `export`, which then evaluates test once; `early_stopping` (EvalConfig) may end the run before its last step
    evaluate: Optional[Callable[[torch.nn.Module], dict]] = None
    select: Optional[Callable[[dict], tuple]] = None
    early_stopping: Optional[object] = None
    # step → a factor per optimizer group (multi-task: 0 for the heads of tasks not drawn, so they do not move)
    lr_gate: Optional[Callable[[int], list]] = None
    # optimizer steps before the lr schedule starts (pre-training's head warm-up): they run at the base lrs × gate
    schedule_start: int = 0


@dataclass
class LoopConfig:
    output_dir: Path
    seed: int
    train: TrainConfig
    optim: OptimConfig
    wandb: WandbConfig
    run_config: dict


def run_length(train: TrainConfig, samples_per_epoch: int, samples_per_step: int) -> str:
    """One line saying which setting ends the run: `train.max_steps` when > 0 (then `train.epochs` does not
    apply), else `train.epochs` (max_steps=-1)."""
    steps = total_steps(train, samples_per_epoch, samples_per_step)
    epochs = steps * samples_per_step / max(1, samples_per_epoch)
    if train.max_steps > 0:
        return (f"the run ends after train.max_steps={steps} optimizer steps (≈ {epochs:.2f} epochs of "
                f"{samples_per_epoch} examples); train.epochs={train.epochs:g} does not apply "
                f"(train.max_steps=-1 runs the epochs)")
    return (f"the run ends after train.epochs={train.epochs:g} = {steps} optimizer steps of {samples_per_step} "
            f"examples (train.max_steps=-1)")


def total_steps(train: TrainConfig, samples_per_epoch: int, samples_per_step: int) -> int:
    if train.max_steps > 0:
        return train.max_steps
    if train.epochs <= 0:
        raise UserError("train.max_steps=-1 needs train.epochs > 0")
    return max(1, math.ceil(train.epochs * samples_per_epoch / samples_per_step))


def _reseed(seed: int, step: int, rank: int) -> None:
    torch.manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1))


def run(job: Job, cfg: LoopConfig, accelerator, topo: Topology, resume_from: Optional[Path]) -> bool:
    """Train to the end (→ True) or to `train.stop_at_step` (→ False, checkpoint written)."""
    train = cfg.train
    samples_per_step = train.micro_batch_size * train.grad_accum * topo.world_size
    steps = total_steps(train, job.samples_per_epoch, samples_per_step)
    steps_per_epoch = max(1, math.ceil(job.samples_per_epoch / samples_per_step))

    base_lrs = [g["lr"] for g in job.optimizer.param_groups]  # from this run's config, not from a checkpoint
    model, optimizer = accelerator.prepare(job.model, job.optimizer)
    state = TrainerState()
    zero = topo.zero_stage if topo.deepspeed else None
    if resume_from is not None:
        state = reshard.load(accelerator, model, job.optimizer, resume_from, zero)
        keep_implementation(basic_optimizer(optimizer))
        moved = f", written by {state.world_size} ranks" if state.world_size != topo.world_size else ""
        log.info(f"resumed from {resume_from} at step {state.step} (sample {state.samples}{moved})")
    # accelerate's restored micro-step counter was counted with the checkpoint's grad_accum; after a move to
    # another world size that differs, so it is set from the optimizer step (where accumulation windows start)
    accelerator.step = state.step * train.grad_accum
    if accelerator.is_main_process:  # lines logged after the checkpoint (or before any) by a killed run are redone
        _truncate_metrics(cfg.output_dir / "metrics.jsonl", state.step)
    state.world_size, state.global_batch, state.zero_stage = topo.world_size, samples_per_step, zero
    # the optimizer the engine really steps (DeepSpeed's may not be the one built here): lrs are set on its groups
    schedule = GroupSchedule(optimizer.optimizer, cfg.optim, steps, base_lrs, job.lr_gate, job.schedule_start)
    lrs = schedule.set_step(state.step)
    log.info(run_length(train, job.samples_per_epoch, samples_per_step))
    facts = {**engine_facts(model, optimizer, topo), "micro_batch_size": train.micro_batch_size,
             "grad_accum": train.grad_accum}
    # DeepSpeed reports its precision; for single / DDP it is read from the first training forward
    watch = None if topo.deepspeed else ComputeDtype(model)
    if watch is None:
        log.info("engine: " + " · ".join(f"{k} {v}" for k, v in facts.items()))
    fp16 = facts["precision"] == "fp16"

    tracker = Tracker(cfg.output_dir, accelerator.is_main_process, cfg.wandb, cfg.run_config, steps, state.step,
                      state.wandb_id, job.flops_per_token, topo.world_size)
    state.wandb_id = tracker.wandb_id
    batches = job.batches(state.samples)
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    step_loss = torch.zeros((), device=device)
    tokens_sum = torch.zeros((), device=device)
    window_steps, t_window, skipped = 0, time.perf_counter(), 0

    def guard():  # collective, before every save (see _check_window_finite)
        _check_window_finite(accelerator, loss_sum, state.step, cfg.output_dir)

    last: dict = {}
    stop = StopRequest()
    try:
        while state.step < steps:
            _reseed(cfg.seed, state.step, topo.rank)
            for _ in range(train.grad_accum):
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in next(batches).items()}
                with accelerator.accumulate(model):
                    loss = job.loss(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and train.max_grad_norm > 0 and not topo.deepspeed:
                        accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float()
                tokens_sum += job.tokens(batch)
            if watch is not None:
                facts["precision"], watch = watch.seen(), None
                log.info("engine: " + " · ".join(f"{k} {v}" for k, v in facts.items()))
            if fp16 and optimizer.step_was_skipped:  # the loss scaler skipped an overflowing step (weights did
                skipped += 1                         # not move): not an error, and not part of the logged loss
            else:
                loss_sum += step_loss
                window_steps += 1
            step_loss.zero_()
            state.step += 1
            state.samples += samples_per_step
            lrs = schedule.set_step(state.step)
            tracker.advance()
            if state.step % train.log_every == 0 or state.step == steps:
                stats = accelerator.reduce(torch.stack([loss_sum, tokens_sum]), reduction="sum")
                elapsed = time.perf_counter() - t_window
                loss_value = stats[0].item() / (max(window_steps, 1) * train.grad_accum * topo.world_size)
                # (a window of fp16 steps that were all skipped logs loss 0 and skipped_steps)
                _refuse_non_finite(loss_value, state.step, cfg.output_dir)
                last = {"step": state.step, "loss": loss_value, "lr": lrs, "world_size": topo.world_size,
                        "zero_stage": topo.zero_stage, "tokens_per_second": stats[1].item() / elapsed,
                        "samples_per_second": window_steps * samples_per_step / elapsed,
                        "samples_seen": state.samples, "epoch": state.samples / job.samples_per_epoch,
                        **facts, **({"skipped_steps": skipped} if fp16 else {})}
                tracker.log(last)
                loss_sum.zero_()
                tokens_sum.zero_()
                window_steps, t_window = 0, time.perf_counter()
            eval_every = train.eval_every or steps_per_epoch
            if job.evaluate is not None and (state.step % eval_every == 0 or state.step == steps):
                if _evaluate(job, model, accelerator, cfg, state, tracker, guard) and state.step < steps:
                    break  # early stopping: the run ends as a finished one does (best model exported, test once)
            preempted = stop.agreed(accelerator, sync_point=state.step % train.log_every == 0)
            if (state.step == train.stop_at_step or preempted) and state.step < steps:
                guard()
                ckpt = checkpoint.save(accelerator, cfg.output_dir, state, train.keep_last)
                why = f"signal {stop.signal_name or 'on another rank'}" if preempted else "train.stop_at_step"
                log.info(f"stopped at step {state.step} ({why}); checkpoint: {ckpt}")
                return False
            if train.save_every > 0 and state.step % train.save_every == 0 and state.step < steps:
                guard()
                checkpoint.save(accelerator, cfg.output_dir, state, train.keep_last)
        guard()
        ckpt = checkpoint.save(accelerator, cfg.output_dir, state, train.keep_last)
        log.info(f"checkpoint: {ckpt}")
        best = checkpoint.checkpoint_root(cfg.output_dir) / checkpoint.BEST
        if job.evaluate is not None and checkpoint.is_complete_on_main(accelerator, best):
            reshard.load(accelerator, model, job.optimizer, best, zero)
            log.info(f"restored the best-on-dev model (step {state.extra['best_step']}) from {best}")
        job.export(accelerator, model, {"steps": state.step, "samples": state.samples,
                                        "global_batch": samples_per_step, "best_step": state.extra.get("best_step"),
                                        **facts, "world_size": topo.world_size, "hardware": hardware(),
                                        "resumed": resume_from is not None})
        tracker.summary({"loss": last.get("loss", float("nan")), "step": state.step})
        tracker.curves()  # <output_dir>/curves.png (main process; a failure to draw is one log line)
    finally:
        stop.restore()
        tracker.close()
    return True


def engine_facts(model, optimizer, topo: Topology) -> dict:
    """What really runs, read from the prepared objects (not from the config): engine, ZeRO stage, offload,
    compute precision and the optimizer class that steps — logged so a run proves its setup. Single / DDP
    precision here is the config's until the first forward replaces it (`ComputeDtype`)."""
    if topo.deepspeed:
        offload = ",".join(f"{what}={cfg.device}" for what, cfg in (("optimizer", model.zero_offload_optimizer()),
                                                                     ("param", model.zero_offload_param()))
                           if cfg is not None and str(cfg.device) not in ("none", "OffloadDeviceEnum.none"))
        precision = "bf16" if model.bfloat16_enabled() else "fp16" if model.fp16_enabled() else "fp32"
        return {"engine": "deepspeed", "zero_stage": model.zero_optimization_stage(),
                "offload": offload.replace("OffloadDeviceEnum.", "") or "none", "precision": precision,
                "optimizer": implementation(basic_optimizer(optimizer))}
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return {"engine": "ddp" if ddp else "single", "zero_stage": 0, "offload": "none",
            "precision": topo.precision, "optimizer": implementation(basic_optimizer(optimizer))}


def basic_optimizer(prepared):
    """The optimizer whose step updates the weights: under accelerate's wrapper, and under DeepSpeed's ZeRO /
    bf16 wrappers too (they hold it as `.optimizer`)."""
    inner = prepared.optimizer
    return getattr(inner, "optimizer", inner)


class ComputeDtype:
    """The precision a training step really computes in, where the engine does not report it (single process,
    DDP): accelerate applies mixed precision as autocast around the model's forward, so the dtype of the first
    Linear layer's output in the first forward is what ran — bf16 under autocast, fp32 without it."""

    NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

    def __init__(self, model: torch.nn.Module):
        self.dtype = None
        linear = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
        self.handle = linear.register_forward_hook(self._hook) if linear is not None else None

    def _hook(self, module, args, output) -> None:
        self.dtype = output.dtype
        self.handle.remove()

    def seen(self) -> str:
        """"bf16" / "fp16" / "fp32" as seen in the forward; "unknown" when no Linear layer ran."""
        if self.handle is not None:
            self.handle.remove()
        return self.NAMES.get(self.dtype, str(self.dtype) if self.dtype is not None else "unknown")


def _refuse_non_finite(loss_value: float, step: int, output_dir: Path) -> None:
    if not math.isfinite(loss_value):
        raise UserError(f"loss is {loss_value} at step {step}; stopped without saving — the last good checkpoint "
                        f"in {checkpoint.checkpoint_root(output_dir)} is intact (lower optim.lr or use bf16, then "
                        f"--resume)")


def _check_window_finite(accelerator, loss_sum: torch.Tensor, step: int, output_dir: Path) -> None:
    """Collective, before every save: the losses since the last log step are finite on every rank, so a save
    between log steps never writes weights a non-finite loss has already reached."""
    total = accelerator.reduce(loss_sum.detach().clone(), reduction="sum")
    _refuse_non_finite(total.item(), step, output_dir)


def _evaluate(job: Job, model, accelerator, cfg: LoopConfig, state: TrainerState, tracker: Tracker, guard) -> bool:
    """Dev evaluation. An evaluation that lowers the selection shortfall by more than the early-stopping min delta
    (any amount without one) saves the `best` checkpoint; → True when early stopping ends the run here.

    The decision is taken on the main process and broadcast: every rank computes the same metrics from the same
    gathered logits, but one decision is the guarantee that all ranks leave the loop at the same step (a rank
    that went on would wait in the next collective forever). The count of evaluations without improvement is in
    the checkpoint's state, so a resumed run keeps its patience."""
    model.eval()
    with torch.no_grad():
        result = job.evaluate(model)
    model.train()
    for task, metrics in result.items():
        tracker.log({"step": state.step, "split": "dev", "task": task,
                     **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}})
    value, picked = job.select(result)
    stopping = job.early_stopping
    patience = stopping.early_stopping_patience if stopping is not None else 0
    min_delta = stopping.early_stopping_min_delta if stopping is not None else 0.0

    def decide() -> tuple[bool, int]:
        improved = value < state.extra.get("best_shortfall", float("inf")) - min_delta
        return improved, 0 if improved else state.extra.get("evals_without_improvement", 0) + 1

    improved, waited = decided_by_main(accelerator, decide)
    state.extra["evals_without_improvement"] = waited
    names = sorted({m for m, _ in picked.values()})
    line = {"step": state.step, "selection": names[0] if len(names) == 1 else "+".join(names), "shortfall": value,
            "improved": improved, "evals_without_improvement": waited}
    if len(result) > 1:  # the mean of every metric all tasks have (accuracy when they are all single-label)
        shared = set.intersection(*({k for k, v in m.items() if isinstance(v, float)} for m in result.values()))
        tracker.log({"step": state.step, "split": "dev", "task": "average",
                     **{k: sum(m[k] for m in result.values()) / len(result) for k in sorted(shared)}})
    tracker.log(line)
    if improved:
        state.extra.update(best_shortfall=value, best_step=state.step)
        guard()
        checkpoint.save(accelerator, cfg.output_dir, state, cfg.train.keep_last, name=checkpoint.BEST)
    if patience and waited >= patience:
        why = (f"early stopping: {waited} dev evaluations without improving the selection shortfall by more than "
               f"{min_delta:g} (best {state.extra.get('best_shortfall', float('nan')):.4f} at step "
               f"{state.extra.get('best_step')})")
        log.info(why)
        tracker.log({"step": state.step, "event": "early_stop", "reason": why,
                     "best_step": state.extra.get("best_step")})
        return True
    return False


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    import json
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except ValueError:  # a line torn by a kill mid-write
            pass
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.rename(path)
