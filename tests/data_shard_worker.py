"""One process of the 2-process sharding test: the row ids this process reads in one epoch, as JSON.

python tests/data_shard_worker.py OUT.json PROCESS_INDEX NUM_PROCESSES DATASET [DATASET ...]
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402

from innercontrol.config import DataConfig  # noqa: E402
from innercontrol.data import build_dataloader  # noqa: E402

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # datasets sleeps 5 s after each interleaved shuffled stream


def main() -> None:
    out, process_index, num_processes, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    seen = {}
    for name in names:
        for streaming in (False, True):
            cfg = DataConfig(dataset=name, resolution=16, streaming=streaming, num_workers=0, shuffle_buffer=8)
            loader = build_dataloader(cfg, 3, process_index, num_processes, seed=5, infinite=False)
            seen[f"{name} streaming={streaming}"] = [
                [row_id, caption] for batch in loader for row_id, caption in zip(batch["row_id"], batch["caption"])
            ]
    with open(out, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
