"""RankGuard: under Lightning's own multi-process launcher, one rank's failure stops every rank within seconds.

Lightning's ``ddp`` strategy on one machine starts ranks 1..N-1 as child processes of rank 0 (its subprocess
script launcher). Without help, a rank that raises leaves the others blocked in a gloo collective (their
timeout is 30 min) or alive as orphans, and Lightning's own child observer looks only every 5 s. On rank 0
this callback

- kills the child ranks as soon as rank 0 raises (``on_exception``, before any teardown that could wait), and
- watches the child ranks during the run: when one exits with a non-zero code, it writes one line and kills
  the other children and rank 0 itself (rank 0 is then typically blocked in a collective that cannot finish).

Other launchers (torchrun, SLURM) create the processes themselves and stop them on failure; there the
callback does nothing. A single process does nothing too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from subprocess import Popen

import lightning as L

KILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # a rank blocked in a collective ignores SIGTERM


class RankGuard(L.Callback):
    """Stops all ranks when one fails (see the module docstring); ``poll`` seconds between checks of the children."""

    def __init__(self, poll: float = 0.2) -> None:
        self.poll = float(poll)
        self._stop = threading.Event()
        self._children: list[Popen] = []

    @staticmethod
    def children(trainer: L.Trainer) -> list[Popen]:
        """The child rank processes this process launched (rank 0 under the subprocess launcher), else []."""
        return list(getattr(trainer.strategy.launcher, "procs", None) or [])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._children = self.children(trainer)
        if self._children:
            self._stop.clear()
            threading.Thread(target=self._watch, name="flowmap-rank-guard", daemon=True).start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.set()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop.set()
        self._kill_children()

    def _kill_children(self) -> None:
        for proc in self._children:
            if proc.poll() is None:
                try:
                    proc.send_signal(KILL)
                except ProcessLookupError:
                    pass

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            for rank, proc in enumerate(self._children, start=1):
                code = proc.poll()
                if code:  # None: running; 0: finished cleanly
                    if self._stop.is_set():
                        return
                    print(
                        f"error: rank {rank} (pid {proc.pid}) stopped with exit code {code}; stopping every rank",
                        file=sys.stderr,
                        flush=True,
                    )
                    self._kill_children()
                    os.kill(os.getpid(), KILL)
                    return
