"""The embedded default: a corpus the project writes itself and a WordPiece tokenizer trained on it.

The text comes from a small topic grammar, so masked words are predictable from context and the
MLM loss visibly falls within a few hundred steps — with no download."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

BUILTIN_PREFIX = "builtin:"

_TOPICS = {
    "sport": (["the striker", "our goalkeeper", "the coach", "a young player", "the referee", "the captain"],
              ["scored", "missed", "defended", "celebrated", "trained for", "argued about"],
              ["the final goal", "a penalty kick", "the second half", "the league title", "a free kick"],
              ["quickly", "bravely", "at the stadium", "before the whistle", "in the rain"]),
    "cooking": (["the chef", "my grandmother", "a hungry student", "the baker", "our neighbour"],
                ["baked", "stirred", "tasted", "burned", "seasoned", "served"],
                ["the tomato soup", "fresh bread", "a chocolate cake", "the spicy curry", "warm pancakes"],
                ["slowly", "with butter", "in the oven", "for dinner", "on sunday morning"]),
    "science": (["the researcher", "a chemist", "the professor", "our lab team", "the astronomer"],
                ["measured", "observed", "published", "tested", "predicted", "calculated"],
                ["the reaction rate", "a distant galaxy", "the new vaccine", "quantum effects", "the data"],
                ["carefully", "in the laboratory", "with a telescope", "last year", "twice"]),
    "travel": (["the tourist", "a tired pilot", "my cousin", "the guide", "two backpackers"],
               ["visited", "photographed", "explored", "booked", "missed", "crossed"],
               ["the old castle", "a night train", "the mountain pass", "the harbour", "a small island"],
               ["in summer", "by bicycle", "at sunrise", "without a map", "with friends"]),
    "money": (["the banker", "an investor", "the company", "a small shop", "the government"],
              ["borrowed", "invested", "lost", "saved", "taxed", "doubled"],
              ["the quarterly profit", "a large loan", "the stock price", "its savings", "the budget"],
              ["this quarter", "overnight", "after the crisis", "on the market", "again"]),
}


def _sentence(rng: random.Random, topic: str) -> str:
    subjects, verbs, objects, tails = _TOPICS[topic]
    parts = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
    if rng.random() < 0.6:
        parts.append(rng.choice(tails))
    return " ".join(parts) + "."


def grammar_documents(n_docs: int = 4000, seed: int = 1234):
    """Deterministic documents of 2-12 sentences, each document on one topic."""
    rng = random.Random(seed)
    topics = sorted(_TOPICS)
    for _ in range(n_docs):
        topic = rng.choice(topics)
        yield " ".join(_sentence(rng, topic) for _ in range(rng.randint(2, 12)))


_VERDICTS = {"positive": ["it was wonderful.", "we loved every minute.", "truly a great day.", "highly recommended."],
             "negative": ["it was awful.", "we hated every minute.", "truly a terrible day.", "never again."]}


def labelled_examples(name: str, split: str):
    """Builtin classification tasks on the grammar's documents (disjoint seeded splits):
    topics — 5 classes (the document's topic); polarity — 2 (verdict sentences mixed in);
    length — 3 (short 1-3, medium 4-7, long 8-12 sentences)."""
    sizes = {"train": (2000, 11), "dev": (300, 12), "test": (500, 13)}
    n, seed = sizes[split]
    rng = random.Random(seed + 100 * ("topics", "polarity", "length").index(name))
    topics = sorted(_TOPICS)
    for _ in range(n):
        topic = rng.choice(topics)
        count = rng.randint(1, 12)
        sentences = [_sentence(rng, topic) for _ in range(count)]
        if name == "topics":
            yield " ".join(sentences), topic
        elif name == "polarity":
            label = rng.choice(sorted(_VERDICTS))
            for _ in range(rng.randint(1, 2)):
                sentences.insert(rng.randint(0, len(sentences)), rng.choice(_VERDICTS[label]))
            yield " ".join(sentences), label
        else:
            yield " ".join(sentences), "short" if count <= 3 else "medium" if count <= 7 else "long"


def builtin_documents(name: str):
    if name != "grammar":
        from ..errors import UserError
        raise UserError(f"unknown builtin corpus '{BUILTIN_PREFIX}{name}' (known: {BUILTIN_PREFIX}grammar)")
    return grammar_documents()


def train_wordpiece_tokenizer(texts, vocab_size: int, out_dir: Path):
    """Train an uncased WordPiece tokenizer on `texts` and save it as a HF fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    tmp = out_dir.with_name(out_dir.name + f".tmp{random.getrandbits(32)}")
    fast.save_pretrained(str(tmp))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first; theirs is identical
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def builtin_tokenizer_dir(cache_dir: Path, corpus_name: str, vocab_size: int) -> Path:
    key = hashlib.sha1(f"{corpus_name}:{vocab_size}:v1".encode()).hexdigest()[:12]
    out = cache_dir / f"tokenizer-{corpus_name}-{key}"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        train_wordpiece_tokenizer(builtin_documents(corpus_name), vocab_size, out)
    return out
