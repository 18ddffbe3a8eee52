"""The model: built pretrained or from a config, special tokens added, embeddings resized; its FLOPs."""
