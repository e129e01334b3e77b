"""``python -m segfactory.cli``: what pipelines run in their subprocesses and SLURM jobs."""

import sys

from segfactory.cli import main

sys.exit(main())
