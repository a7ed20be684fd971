"""Test-time adaptation: the model follows each center's staining and scanning at inference."""
