"""The pre-training export keeps the starting checkpoint's pooler (HF's masked-LM classes have none), so a
classifier reading the pooler after further pre-training starts from the real one, not from random weights."""
from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertModel

from launching import run


def test_further_pretraining_export_keeps_the_pooler(tmp_path, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    conf = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    start = BertModel(conf)  # an encoder with a pooler, as bert-base ships
    start.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")

    out = tmp_path / "run"
    run(None, out, f"model.name_or_path={tmp_path / 'start'}", "model.tokenizer=null", "model.config=null",
        "train.max_steps=4", "train.log_every=1", cache=tmp_path / "cache")  # 2 head warm-up steps, then 2
    exported = AutoModel.from_pretrained(out / "hf_model")
    for name, value in start.pooler.state_dict().items():
        assert torch.equal(exported.pooler.state_dict()[name], value), name
    # the encoder itself was trained, and the MLM model still loads from the export
    assert not torch.equal(exported.encoder.layer[0].attention.self.query.weight,
                           start.encoder.layer[0].attention.self.query.weight)
    AutoModelForMaskedLM.from_pretrained(out / "hf_model")
