"""Train a tiny recipe through ``infinity-lightning fit``'s own setup, logging every step's loss.

    python tests/reliability/train.py OUTPUT_DIR LOSS_FILE [key=value ...]

Builds the run with :func:`infinity_lightning.commands.fit.prepare` (recipe, atomic checkpoint
IO, resumable data, ``ckpt_path`` resolution such as ``auto``), adds a
:class:`~infinity_lightning.reliability.LossLog` writing ``LOSS_FILE``, trains, and saves the
final transformer weights to ``OUTPUT_DIR/final.safetensors``.  The kill-and-resume tests run it
in a subprocess and kill it.
"""
from __future__ import annotations

import sys

import torch

#: The tiny run: the quick-start recipe at 32 px (4x4 latents, 3 scales), 6 batches per epoch.
TINY = ["data.image_size=32", "module.image_size=32", "data.num_samples=24", "data.batch_size=4",
        "callbacks.sample_logger=null", "callbacks.lr_monitor=false", "module.warmup_steps=2",
        "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]


def main(argv) -> int:
    from infinity_lightning.commands.fit import prepare
    from infinity_lightning.io import atomic_save_safetensors
    from infinity_lightning.reliability import LossLog

    torch.set_num_threads(1)  # same reduction order in every run
    out, loss_file, overrides = argv[0], argv[1], list(argv[2:])
    run = prepare("var/quickstart", TINY + overrides, out, None, "none")
    run["trainer"].callbacks.append(LossLog(loss_file))
    run["trainer"].fit(run["module"], datamodule=run["datamodule"], ckpt_path=run["ckpt_path"])
    atomic_save_safetensors(run["module"].transformer.state_dict(), f"{out}/final.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
