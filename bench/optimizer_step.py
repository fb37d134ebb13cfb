"""The optimizer step on its own: torch's AdamW kernels over the trainer's layer-wise parameter groups.

    python bench/optimizer_step.py [--threads N] [--repeats 20]

A fine-tuning step on CPU spent 38 % of its time in torch's single-tensor Adam (a Python loop over the
tensors: torch's CPU default) and 4.6 % in gradient clipping (issue 20, py-spy). This times, in one run and
alternating so that machine load hits each alike, the step of the same AdamW (make_optimizer's groups: ξ = 0.95
per layer, weight-decay split) over an all-MiniLM-L6-v2-shaped classifier (6 layers, 384 wide, 22.7 M
parameters, 105 tensors; built from its config, no download) with each kernel — single-tensor, foreach, fused
(what `make_optimizer` builds) — and clip_grad_norm_ as a loop and as foreach. Ratios are against the
single-tensor step of the same run."""
from __future__ import annotations

import argparse
import time

import _common as C


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per implementation per round")
    args = parser.parse_args()
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from trainer.optim.layer_decay import layer_decay_scales
    from trainer.optim.param_groups import build_param_groups, implementation, make_optimizer
    torch.set_num_threads(args.threads)
    C.header("optimizer_step")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                                     num_attention_heads=12, intermediate_size=1536, num_labels=6))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    scale, part = layer_decay_scales(model, model.bert, 0.95)

    def groups():
        return build_param_groups(model, lr=1e-4, weight_decay=0.01, lr_scale=scale, part=part)

    fused = make_optimizer(groups(), [0.9, 0.999], 1e-8)
    plain = [{k: v for k, v in g.items() if k not in ("names", "parts", "task")} for g in groups()]
    optimizers = {"single-tensor": torch.optim.AdamW([dict(g) for g in plain], foreach=False),
                  "foreach": torch.optim.AdamW([dict(g) for g in plain], foreach=True),
                  "fused (make_optimizer)": fused}
    clips = {"clip loop": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False),
             "clip foreach": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)}
    work = {**{k: o.step for k, o in optimizers.items()}, **clips}
    for f in work.values():  # warm-up: optimizer state allocated, kernels loaded
        f()
    times = {k: [] for k in work}
    meter = C.LoadMeter().start()
    for _ in range(3):  # rounds, each implementation in turn
        for name, f in work.items():
            t = time.perf_counter()
            for _ in range(args.repeats):
                f()
            times[name].append((time.perf_counter() - t) / args.repeats)
    other = meter.stop()
    print(f"{len(fused.param_groups)} groups, {len(params)} tensors, "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters; make_optimizer → {implementation(fused)}")
    base = C.median(times["single-tensor"])
    for name, ts in times.items():
        ref = base if not name.startswith("clip") else C.median(times["clip loop"])
        print(f"  {name:24s} {C.median(ts) * 1e3:7.1f} ms  ({ref / C.median(ts):.2f}× the "
              f"{'single-tensor step' if not name.startswith('clip') else 'clip loop'})")
    print(C.load_note(other))
    print(f"SUMMARY optimizer_step: fused AdamW {base / C.median(times['fused (make_optimizer)']):.1f}× faster than "
          f"torch's CPU default (single-tensor), foreach {base / C.median(times['foreach']):.1f}×; clip foreach "
          f"{C.median(times['clip loop']) / C.median(times['clip foreach']):.2f}× the loop")


if __name__ == "__main__":
    main()
