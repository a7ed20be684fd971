"""The screening engine: tiles -> cells -> bags -> slide results, for the job and the service."""
