"""The analyst-facing result tables: their schemas, their atomic per-batch writes, their reads."""
