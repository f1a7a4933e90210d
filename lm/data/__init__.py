"""Text to token rows: corpora, tokenizers, token files and packing, chat template, task generators."""
