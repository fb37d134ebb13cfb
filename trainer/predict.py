"""Batch prediction with an exported classifier: same truncation/hierarchy as training, labels + probabilities."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .classifier import Classifier
from .config import ClassificationDataConfig
from .errors import UserError
from .text.batching import Collator, example_lengths
from .text.data import read_split
from .text.truncation import Encoder


def predict_file(model_dir: str, input_path: str, output_path: str, text_fields: Optional[list] = None,
                 batch_size: int = 64, overwrite: bool = False) -> int:
    from transformers import AutoTokenizer
    if os.path.exists(output_path) and not overwrite:
        raise UserError(f"{output_path} exists; pass --overwrite to replace it")
    if not Path(model_dir).is_dir():
        raise UserError(f"model dir not found: {model_dir}")
    model, recipe = Classifier.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fields = text_fields or recipe.get("text_fields") or ["text"]
    # labels are not needed to predict: read with a label field that every record "has"
    data_cfg = ClassificationDataConfig(text_fields=fields, label_field=fields[0])
    split = read_split(input_path, data_cfg, "test")
    encoded = Encoder(tokenizer, model.text_cfg).encode(split.texts)
    collate = Collator(tokenizer.pad_token_id, model.hierarchical)
    labels = recipe["labels"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    probs = np.empty((len(encoded), len(labels)), dtype=np.float32)
    order = np.argsort(-example_lengths(encoded), kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([encoded[i] for i in idx], np.zeros(len(idx), dtype=np.int64))
            batch = {k: v.to(device) for k, v in batch.items()}
            _, logits = model(**batch)
            probs[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
    tmp = f"{output_path}.tmp"
    with open(tmp, "w") as f:
        for p in probs:
            f.write(json.dumps({"label": labels[int(p.argmax())],
                                "probabilities": {str(lab): round(float(x), 6) for lab, x in zip(labels, p)}}) + "\n")
    os.replace(tmp, output_path)
    return len(probs)
