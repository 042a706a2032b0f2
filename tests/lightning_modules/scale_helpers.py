"""A callback for the kill-and-resume test, imported by `mmalign fit` subprocesses."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L


class PauseAt(L.Callback):
    """At the end of global step ``$MMALIGN_TEST_PAUSE_AT``, write ``<marker>`` and sleep, so
    the test can SIGKILL the process at a known point; without the variable it does nothing."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)
        self.step = int(os.environ.get("MMALIGN_TEST_PAUSE_AT", "0"))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.step and trainer.global_step == self.step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)
