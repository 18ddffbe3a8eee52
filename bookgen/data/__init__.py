"""Data flow: parse the corpus, split it, train or load the tokenizer, store tokens, make batches."""
