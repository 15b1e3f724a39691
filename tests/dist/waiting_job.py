"""A torchrun rank that joins the jobs' process group, says so, and waits: what the
launcher's death leaves running (``tests/test_resume.py``)."""

import os
import time

from morec_rec.jobs import distributed

env = distributed.init()
# One write of the whole line: torchrun runs ranks unbuffered (python -u), where print
# writes the text and its newline apart, and the two ranks' lines could interleave.
os.write(1, f"rank {env.rank} ready\n".encode())
time.sleep(300)
