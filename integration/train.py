"""The torchrun entry point of training: the same command as ``morec-rec train``.

    torchrun --nproc_per_node=2 integration/train.py --data DIR --model mf --out RUN

Tables are sharded by TorchRec's planner across the ranks (gloo on CPU, NCCL on GPU);
without torchrun it trains in one process.
"""

import sys

from morec_rec.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
