"""Multi-task fine-tuning and the whole recipe, with 2 ranks through `accelerate launch`."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from launching import metrics, run

MT = dict(script="finetune.py", config="configs/finetune/tiny_multitask.yaml")
RECIPE = dict(script="recipe.py", config="configs/recipe/tiny.yaml")
# a smaller recipe for tests: every stage, fewer steps
SMALL = ["stages.fit_baseline=false", "pretrain.train.max_steps=20", "pretrain.train.save_every=10",
         "finetune.train.max_steps=8", "finetune.train.eval_every=4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def mfit_zero3(tmp_path_factory, cache):
    """One epoch of multi-task fine-tuning under ZeRO-3 on 2 ranks: the run the next tests read."""
    out = tmp_path_factory.mktemp("mfit") / "mt"
    run("cpu_zero3", out, "train.eval_every=60", cache=cache, timeout=900, **MT)
    return out


def test_multitask_zero3_three_tasks_each_head_learns(mfit_zero3):
    out = mfit_zero3
    results = json.loads((out / "eval_results.json").read_text())
    chance = {"topics": 1 - 1 / 5, "polarity": 1 - 1 / 2, "length": 1 - 1 / 3}
    assert set(results) == set(chance)
    for task, k in chance.items():
        assert results[task]["dev"]["error_rate"] < k, (task, results[task]["dev"])
        assert len(results[task]["test"]["confusion_matrix"]) == round(1 / (1 - k))
        assert (out / "tasks" / task / "hf_model" / "bert_recipe.json").is_file()
    dev = [r for r in metrics(out) if r.get("split") == "dev"]
    assert {r["task"] for r in dev} == {*chance, "average"}
    # every optimizer step ran one task on both ranks: the step count is the global one
    train = [r for r in metrics(out) if "lr" in r]
    assert all(r["world_size"] == 2 and r["zero_stage"] == 3 for r in train)


def test_task_draw_depends_on_seed_and_step_only():
    import numpy as np
    from trainer.multitask import task_of_step
    probs = np.array([0.5, 0.3, 0.2])
    draws = [task_of_step(7, s, probs) for s in range(3000)]
    assert draws == [task_of_step(7, s, probs) for s in range(3000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, probs, atol=0.03)
    assert draws != [task_of_step(8, s, probs) for s in range(3000)]


def test_per_task_finetuning_starts_from_the_multitask_weights(tmp_path, cache, mfit_zero3):
    mt = mfit_zero3  # its export was consolidated from ZeRO-3 shards; the continued run is ZeRO-2
    start = mt / "tasks" / "polarity" / "hf_model"
    out = tmp_path / "fit"
    # one step with a vanishing lr: the continued model must be the MFiT model itself, head included
    run("cpu_zero2", out, f"model.name_or_path={start}", "model.tokenizer=null", "model.config=null",
        "data.train=builtin:polarity", "data.test=builtin:polarity", "text.strategy=head_tail",
        "text.head_tokens=16", "head.layers=-1", "train.max_steps=1", "train.eval_every=1", "optim.lr=1e-30",
        "optim.warmup_steps=0", "optim.warmup_ratio=0", cache=cache, script="finetune.py",
        config="configs/finetune/tiny.yaml")
    a, b = load_file(str(start / "model.safetensors")), load_file(str(out / "hf_model" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("classifier.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    mt_dev = json.loads((mt / "eval_results.json").read_text())["polarity"]["test"]
    fit_dev = json.loads((out / "eval_results.json").read_text())["test"]
    # same weights; the MFiT figure was computed by the ZeRO-3 engine, this one by ZeRO-2: summation order may
    # flip one borderline example of the 500
    assert fit_dev["accuracy"] == pytest.approx(mt_dev["accuracy"], abs=1.01 / fit_dev["n"])


def test_recipe_interrupted_inside_a_stage_resumes_to_the_same_table(tmp_path, cache):
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = run("cpu_zero2", full, *SMALL, cache=cache, timeout=900, **RECIPE)
    table = json.loads((full / "results.json").read_text())
    assert set(table) == {"topics", "polarity", "length"}
    assert all(set(row) == {"ITPT-FiT", "ITPT-MFiT", "ITPT-MFiT-FiT"} for row in table.values())
    assert "| task | ITPT-FiT | ITPT-MFiT | ITPT-MFiT-FiT |" in (full / "results.md").read_text()
    assert "| task |" in proc.stdout
    # the final model's card tells what ran: 2 ranks of DeepSpeed ZeRO-2, written once (main process)
    final = full / "mfit_fit" / "length" / "hf_model"
    lineage = json.loads((final / "lineage.json").read_text())["stages"]
    assert [s["stage"] for s in lineage] == ["ITPT", "MFiT", "FiT"]
    assert all(s["setup"]["engine"] == "deepspeed" and s["setup"]["zero_stage"] == 2 and
               s["setup"]["world_size"] == 2 for s in lineage)
    assert "DeepSpeed ZeRO-2, fp32, 2 × CPU" in (final / "README.md").read_text()

    # stop inside the multi-task stage (after pre-training and the ITPT-FiT stages finished)
    run("cpu_zero2", cut, *SMALL, "finetune.train.stop_at_step=5", "stages.fit_after_pretrain=false",
        cache=cache, timeout=900, **RECIPE)
    assert not (cut / "results.json").exists() and (cut / "pretrain" / "stage.json").is_file()
    assert not (cut / "mfit" / "stage.json").exists() and (cut / "mfit" / "checkpoints").is_dir()
    run("cpu_zero2", cut, *SMALL, cache=cache, timeout=900, **RECIPE)
    assert json.loads((cut / "results.json").read_text()) == table
    resumed = json.loads((cut / "mfit_fit" / "length" / "hf_model" / "lineage.json").read_text())["stages"]
    assert [(s["stage"], s["steps"]) for s in resumed] == [(s["stage"], s["steps"]) for s in lineage]


def test_results_table_puts_the_papers_numbers_under_its_tasks(tmp_path):
    """results.md: the paper's BERT-base error under each task it reports (hub / folder spellings mapped), none
    for tasks it lacks; results.png drawn."""
    from trainer.stages.recipe import write_results
    table = {"ag_news": {"FiT": 0.1, "ITPT-FiT": 0.09}, "sst2": {"FiT": 0.2, "ITPT-FiT": 0.19}}
    write_results(tmp_path, table, ["FiT", "ITPT-FiT"])
    md = (tmp_path / "results.md").read_text()
    assert "| ag_news | 10.00 | 9.00 |\n| *ag_news: paper, BERT-base* | *5.25* | *4.80* |" in md
    assert "sst2: paper" not in md and (tmp_path / "results.png").stat().st_size > 0
