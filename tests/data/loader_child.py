"""A main process for the loader shutdown tests: `python -m tests.data.loader_child MODE DIR`.

Builds a train loader with 2 grain workers over a few generated images and takes batches, then:
  kill    prints {"workers": [pids], "tracker": pid} and SIGKILLs itself;
  close   closes the iterator twice while a batch stays referenced, and exits;
  resume  restores a second iterator from the first one's state, never closes, and exits.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys

import numpy as np
from absl import flags
from PIL import Image

from dermjax.data import pipeline

KEPT: list = []  # referenced until the interpreter exits, as a long-lived run object would


def main(mode: str, directory: str) -> None:
    flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags
    paths = []
    for i in range(8):
        paths.append(os.path.join(directory, f"{i}.png"))
        Image.fromarray(np.full((10, 12, 3), i, np.uint8)).save(paths[-1])
    records = pipeline.Records(paths, np.arange(8) % 2, np.zeros((8, 2)), np.zeros(8, bool))
    loader = pipeline.train_loader(
        records, batch_size=2, img_size=(8, 8), geometric=False, seed=0, num_workers=2
    )
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    KEPT.extend([loader, it, batches])
    if mode == "kill":
        workers = [p.pid for p in multiprocessing.active_children()]
        tracker = multiprocessing.resource_tracker._resource_tracker._pid
        print(json.dumps({"workers": workers, "tracker": tracker}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "close":
        it.close()
        pipeline.close_iterator(it)
    elif mode == "resume":
        restored = iter(loader)
        restored.set_state(it.get_state())
        KEPT.extend([restored, next(restored)])


if __name__ == "__main__":
    main(*sys.argv[1:])
