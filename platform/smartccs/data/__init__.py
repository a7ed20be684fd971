"""Ray Data pipelines over slides in the store."""
