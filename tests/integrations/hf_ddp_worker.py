"""One rank of a Hugging Face Trainer run under DDP (two CPU processes, gloo), monitored; started by
``torchrun`` from ``test_transformers.py``. Rank 0 writes the RMS of each applied update over the lr."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_transformers import UpdateRecorder, trainer_for  # noqa: E402

from adam_monitor.integrations.transformers import AdamMonitorCallback  # noqa: E402


def main(out: str) -> None:
    torch.manual_seed(0)
    recorder = UpdateRecorder()
    trainer = trainer_for(
        Path(out),
        [recorder, AdamMonitorCallback(log_every_n_steps=1)],
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        ddp_backend="gloo",
    )
    trainer.train()
    if int(os.environ["RANK"]) == 0:
        (Path(out) / "applied.json").write_text(json.dumps(recorder.rms))


if __name__ == "__main__":
    main(sys.argv[1])
