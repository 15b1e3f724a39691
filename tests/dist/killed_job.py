"""``morec-rec ARGS`` that SIGKILLs itself at a chosen point: the resume tests' fault.

    python tests/dist/killed_job.py --at-step N -- run ...      (torchrun: rank 0 only)
    python tests/dist/killed_job.py --between-renames N -- run ...

``--at-step N``: in the middle of MoRec training step N + 1 (inside the loss hook,
MoRec's or a baseline coordinator's, before the backward), so N steps are done.
``--between-renames N``: in the N-th checkpoint save of ``last``, right after the old
``last`` was renamed aside and before the new one takes its place. Under torchrun only the first attempt is killed: a restart
(``--max-restarts``) runs to its end.
"""

import argparse
import os
import signal
import sys

from morec_rec.jobs.cli import main
from morec_rec.jobs import checkpoint
from morec_rec.plugin.baseline import BaselineLoss
from morec_rec.plugin.hook import MoRecLoss


def kill() -> None:
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ.get("RANK", "0") == "0" and first_attempt:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(n: int) -> None:
    steps = 0

    def counting(hook: type) -> None:
        call = hook.__call__

        def counted(self, batch):
            nonlocal steps
            if self.model.training:
                steps += 1
                if steps == n + 1:
                    kill()
            return call(self, batch)

        hook.__call__ = counted

    counting(MoRecLoss)
    counting(BaselineLoss)  # a baseline coordinator's hook, and MoRec's under loss_forms


def kill_between_renames(n: int) -> None:
    install = checkpoint._install
    saves = 0

    def interrupted(path):
        nonlocal saves
        if path.name == "last" and path.exists():
            saves += 1
            if saves == n:
                path.rename(checkpoint._old(path))
                kill()
        install(path)

    checkpoint._install = interrupted


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--at-step", type=int)
    parser.add_argument("--between-renames", type=int)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    if options.at_step is not None:
        kill_at_step(options.at_step)
    if options.between_renames is not None:
        kill_between_renames(options.between_renames)
    sys.exit(main(options.args[1:] if options.args[:1] == ["--"] else options.args))
