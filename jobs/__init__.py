"""Ray job entrypoints: thin doors onto smartccs (``python -m jobs.<name>``)."""
