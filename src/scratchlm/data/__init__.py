"""Data: corpus readers, cleaning, deduplication, tokenized shards and the training loader."""
