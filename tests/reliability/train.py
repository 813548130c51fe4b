"""Train the tiny recipe ``tiny_var.yaml`` through ``infinity-lightning fit``'s own setup,
logging every step's loss.

    python tests/reliability/train.py OUTPUT_DIR LOSS_FILE [key=value ...]

Builds the run with :func:`infinity_lightning.commands.fit.prepare` (recipe, atomic checkpoint
IO, resumable data, ``ckpt_path`` resolution such as ``auto``), adds a
:class:`~infinity_lightning.reliability.LossLog` writing ``LOSS_FILE``, trains, and saves the
final transformer weights to ``OUTPUT_DIR/final.safetensors``.  The kill-and-resume tests run it
in a subprocess and kill it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

#: The recipe of these runs (6 batches per epoch, 10 steps, a checkpoint every 3 steps).
RECIPE = Path(__file__).with_name("tiny_var.yaml")


def main(argv) -> int:
    from infinity_lightning.commands.fit import prepare
    from infinity_lightning.io import atomic_save_safetensors
    from infinity_lightning.reliability import LossLog

    torch.set_num_threads(1)  # same reduction order in every run
    out, loss_file, overrides = argv[0], argv[1], list(argv[2:])
    run = prepare(str(RECIPE), overrides, out, None, "none")
    run["trainer"].callbacks.append(LossLog(loss_file))
    run["trainer"].fit(run["module"], datamodule=run["datamodule"], ckpt_path=run["ckpt_path"])
    atomic_save_safetensors(run["module"].transformer.state_dict(), f"{out}/final.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
