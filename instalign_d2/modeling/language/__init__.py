"""Text encoder (transformers AutoModel) and its tokenizer."""
