"""The parts of ``scripts/bench.py``: the harness (rows, sizes, worker processes), the queue
implementations it compares (``peers``), one module per section, and the report (targets,
JSON, the table). Run the benchmark with ``python scripts/bench.py``; every worker process
it starts is that script again, run with ``--worker``."""
