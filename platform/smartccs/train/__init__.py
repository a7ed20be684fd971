"""Training: self-supervised pretraining of the tile encoder (DINO) on Ray Train."""
