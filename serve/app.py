"""The door for ``serve run serve/config.yaml``: the application builder, from the library.

serve run serve/config.yaml
serve run serve.app:build store.uri=./ccs-data     # without a config file
"""

from smartccs.service.app import build

__all__ = ["build"]
