"""The service's URL paths: one definition for the API that serves them and the clients that
call them (``ccs upload --submit``, the bench's load generator)."""

API_VERSION = "v1"
BATCHES = f"/{API_VERSION}/batches"
"""The batches' routes: ``BATCHES`` (submit), ``BATCHES/<id>`` (status), ``.../results``."""
