"""The main job as a Ray job: ``ray job submit --working-dir . -- python -m jobs.demo``."""

import sys

from smartccs.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
