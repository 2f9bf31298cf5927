"""One fresh process's timing of exported models under a latency table's conditions, for
``prune.latency_profile.table_latencies(..., processes=N)``.

    python -m prune.latency_worker TABLE FOLDER REPEATS NAME [NAME ...]   # prints {"NAME": seconds, ...}

Why another process: a small model's pass time depends on state a process carries, not on the
model (the demo's cut models measured, as a fraction of the teacher timed interleaved in the same
process, 0.52-0.60 across six fresh processes, each steady within itself; a training process timed
the same shapes 10-25% off its fresh-process median). Timing in a few fresh processes and taking
the median samples that state instead of inheriting one draw of it.
"""

from __future__ import annotations

import json
import sys
from typing import List


def main(argv: List[str]) -> int:
    table_path, folder, repeats, names = argv[0], argv[1], int(argv[2]), argv[3:]
    from .checkpoints.export import load_pruned
    from .latency import load_table
    from .latency_profile import time_here

    models = {name: load_pruned(f"{folder}/{name}") for name in names}
    print(json.dumps(time_here(load_table(table_path), models, repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
