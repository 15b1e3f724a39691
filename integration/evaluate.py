"""The torchrun entry point of evaluation: ``morec-rec evaluate --run RUN`` on N ranks.

    torchrun --nproc_per_node=2 integration/evaluate.py RUN --split test --json

The run directory is positional: torchrun's own parser would take ``--run`` for an
abbreviation of its ``--run-path``. Each rank scores a slice of the users; the metrics are
all-reduced, so they equal a one-process evaluation.
"""

import sys

from morec_rec.jobs.cli import main

if __name__ == "__main__":
    run, *rest = sys.argv[1:] or ["--help"]
    sys.exit(main(["evaluate", "--run", run, *rest]))
