"""Evaluation metrics (numpy only): cell detection AP/mAP and slide-level binary ROC metrics."""
