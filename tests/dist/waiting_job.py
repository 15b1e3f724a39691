"""A torchrun rank that joins the jobs' process group, says so, and waits: what the
launcher's death leaves running (``tests/test_resume.py``)."""

import time

from morec_rec.jobs import distributed

env = distributed.init()
print(f"rank {env.rank} ready", flush=True)
time.sleep(300)
