"""The torchrun entry point of the main job: the same command as ``morec-rec run``.

    torchrun --nproc_per_node=2 integration/run.py --data DIR --out OUT [--base RUN]

Every stage (pretraining, MoRec, evaluation) runs on all ranks; rank 0 writes
``OUT/results.json`` and the plots. Without torchrun it runs in one process.
"""

import sys

from morec_rec.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
