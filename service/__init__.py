"""The HTTP service.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it. torch's
OpenMP runtime (GNU libgomp in the PyPI wheels) reads it once, when torch is imported, so it must be set
before that; ``python -m service`` imports this package first. Without it, an OpenMP thread that finished
its share of an operation spins waiting for the others: on a machine shared with other processes (or
with a second server) the spinning threads take the cores the others need: a demo image took 6-78 s
instead of 0.6-2.6 s with 2 threads (docs/bench_threads.md). The thread count itself is chosen in
``service.engine.set_torch_threads``.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
