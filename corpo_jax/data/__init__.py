"""Data: tokenizer, bundled and user tasks, text format, grain pipelines, trace distillation."""
