"""The paper's published test error rates (%) — Sun et al. 2019, BERT-base uncased — to print beside ours.

Transcribed from its Tables 2–7 and Fig. 4 (see ../shared/PAPER.md). Keys use this project's config values."""
from __future__ import annotations

from typing import Optional

# Table 2 (IMDb / Sogou): text.strategy, with text.chunk_pool for hierarchical
TRUNCATION = {"imdb": {"head": 5.63, "tail": 5.44, "head_tail": 5.42, "hierarchical/mean": 5.89,
                       "hierarchical/max": 5.71, "hierarchical/attention": 5.49},
              "sogou": {"head": 2.58, "tail": 3.17, "head_tail": 2.43, "hierarchical/mean": 2.83,
                        "hierarchical/max": 2.47, "hierarchical/attention": 2.65}}

# Table 3 (IMDb): the paper's layer k (0-based transformer layers) is head.layers = k + 1 here (0 = embeddings)
LAYER = {"imdb": {**{str(k + 1): e for k, e in enumerate(
    [11.07, 9.81, 9.29, 8.66, 7.83, 6.83, 6.83, 6.41, 6.04, 5.70, 5.46, 5.42])},
    "-1": 5.42, "12": 5.42, "first4/concat": 8.69, "first4/mean": 9.09, "first4/max": 8.76,
    "last4/concat": 5.43, "last4/mean": 5.44, "last4/max": 5.42, "all/concat": 5.44}}

# Table 4 (IMDb): (optim.lr, optim.layer_decay)
LR_DECAY = {"imdb": {(2.5e-5, 1.0): 5.52, (2.5e-5, 0.95): 5.46, (2.5e-5, 0.90): 5.44, (2.5e-5, 0.85): 5.58,
                     (2e-5, 1.0): 5.42, (2e-5, 0.95): 5.40, (2e-5, 0.90): 5.52, (2e-5, 0.85): 5.65}}

# Tables 5–7: recipe stage label → dataset → error
_DATASETS = ["imdb", "yelp_p", "yelp_f", "trec", "yahoo", "ag", "dbp", "sogou"]
STAGES = {label: dict(zip(_DATASETS, row)) for label, row in {
    "Feat": [6.79, 2.39, 30.47, 4.20, 22.72, 5.92, 0.70, 2.50],
    "FiT": [5.40, 2.28, 30.06, 2.80, 22.42, 5.25, 0.71, 2.43],
    "ITPT-FiT": [4.37, 1.92, 29.42, 3.20, 22.38, 4.80, 0.68, 1.93],
    "IDPT-FiT": [4.88, 1.87, 29.25, 2.20, 21.86, 4.88, 0.65, None],
    "CDPT-FiT": [5.18, 1.97, 29.20, 2.80, 21.94, 5.08, 0.67, None]}.items()}
STAGES["MFiT-FiT"] = {"imdb": 5.36, "yelp_p": 2.19, "ag": 5.20, "dbp": 0.68}
STAGES["CDPT-MFiT-FiT"] = {"imdb": 4.96, "yelp_p": 2.06, "ag": 5.13, "dbp": 0.67}

# a task's name in a recipe → the paper's column (names as the hub and this repo's data folders spell them)
ALIASES = {"ag_news": "ag", "agnews": "ag", "yelp_polarity": "yelp_p", "yelp_review_full": "yelp_f",
           "dbpedia": "dbp", "dbpedia_14": "dbp", "yahoo_answers": "yahoo", "yahoo_answers_topics": "yahoo"}


def stage_error(task: str, label: str) -> Optional[float]:
    """The paper's error for a recipe task and stage label (e.g. "imdb", "ITPT-FiT"), or None."""
    name = task.lower()
    return STAGES.get(label, {}).get(ALIASES.get(name, name))


def stage_cells(task: str, labels: list) -> Optional[list]:
    """A markdown table row's cells for the paper's errors on `task` under each stage label ("–" where it has
    none), led by the row's name; None when the paper has no number for the task at all."""
    ref = [stage_error(task, label) for label in labels]
    if all(v is None for v in ref):
        return None
    return [f"*{task}: paper, BERT-base*"] + [f"*{v:.2f}*" if v is not None else "–" for v in ref]


# Fig. 4 (IMDb, 0.4 % of the training data)
FEW_SHOT = {"imdb": {("FiT", 0.004): 17.26, ("ITPT-FiT", 0.004): 9.23}}


def lookup(table: dict, dataset: Optional[str], key) -> Optional[float]:
    """The paper's number for `key` on `dataset`, or None where the paper has none."""
    if not dataset:
        return None
    column = table.get(dataset.lower())
    return None if column is None else column.get(key)
