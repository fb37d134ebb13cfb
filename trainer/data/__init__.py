"""The data layer below masked-LM corpora (`trainer/corpus/`) and classification splits (`trainer/text/`).

Both read the same files and hub datasets, cache what they tokenize in one directory with one preparer per entry,
and tokenize with the same worker pool; that lives here so neither side depends on the other:
`records` (files and formats), `hub` (hub datasets), `cache` (the build-once cache), `tokenize_pool` (parallel
tokenization), `builtin` (the generated demo corpus, tokenizer and tasks)."""
