"""`torchrun ... tests/cli/_torchrun_kill.py train ...`: the vitlab CLI, with rank $KILL_RANK killed (SIGKILL, no
clean-up) right after optimizer step $KILL_STEP in torchrun's first attempt only: a rank lost mid-run."""

import os
import signal
import sys

from vitlab.cli import main
from vitlab.train.loop import Trainer

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ["RANK"] == os.environ["KILL_RANK"]:
    after_step, kill_at = Trainer.after_step, int(os.environ["KILL_STEP"])

    def dying_after_step(self, *args):
        after_step(self, *args)
        if self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.after_step = dying_after_step

sys.exit(main(sys.argv[1:]))
