"""Training loops (dense ViT, later meta-network and selector) and their checkpoints."""
