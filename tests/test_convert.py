"""``infinity-lightning convert``: released <-> safetensors <-> Lightning checkpoints, identical weights."""
from __future__ import annotations

import json

import pytest
import torch

from infinity_lightning.checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
from infinity_lightning.cli import main
from infinity_lightning.commands.convert import convert
from infinity_lightning.io import CheckpointError, safe_load


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_transformer("tiny"), load_tokenizer("tiny")


def test_transformer_round_trip(tiny, tmp_path):
    model, _ = tiny
    ref = model.state_dict()
    save_transformer(model, tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "b.safetensors"), str(tmp_path / "c.ckpt")]) == 0
    ckpt = safe_load(tmp_path / "c.ckpt")
    assert all(k.startswith("transformer.") for k in ckpt["state_dict"])
    assert main(["convert", str(tmp_path / "c.ckpt"), str(tmp_path / "d.pth"), "--to", "released"]) == 0
    released = safe_load(tmp_path / "d.pth")
    assert not any(k.startswith("transformer.") for k in released)  # flat, like infinity_2b_reg.pth
    for name in ("b.safetensors", "c.ckpt", "d.pth"):
        loaded = load_transformer(tmp_path / name)
        assert loaded.config == model.config
        _same(loaded.state_dict(), ref)


def test_lightning_checkpoint_with_both_models_and_ema(tiny, tmp_path):
    model, vae = tiny
    sd = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    sd.update({f"tokenizer.{k}": v for k, v in vae.state_dict().items()})
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, tmp_path / "train.ckpt")
    convert(tmp_path / "train.ckpt", tmp_path / "t.pth", kind="transformer")
    _same(load_transformer(tmp_path / "t.pth").state_dict(), model.state_dict())
    summary = convert(tmp_path / "train.ckpt", tmp_path / "v.safetensors", kind="tokenizer")
    assert summary["kind"] == "tokenizer"
    _same(load_tokenizer(tmp_path / "v.safetensors").state_dict(), vae.state_dict())
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="transformer or a tokenizer; pass --kind"):
        convert(tmp_path / "unknown.pth", tmp_path / "out.pth")
    # original training checkpoint: --use-ema picks the EMA copy
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"trainer": {"gpt_fsdp": model.state_dict(), "gpt_ema_fsdp": ema}}, tmp_path / "ar-ckpt.pth")
    assert main(["convert", str(tmp_path / "ar-ckpt.pth"), str(tmp_path / "ema.pth"), "--use-ema"]) == 0
    got = load_transformer(tmp_path / "ema.pth").state_dict()
    torch.testing.assert_close(got["head.weight"], ema["head.weight"], rtol=0, atol=0)


def test_tokenizer_round_trip(tiny, tmp_path, capsys):
    _, vae = tiny
    save_tokenizer(vae, tmp_path / "vae.pth")  # released {"vae": ...}
    assert main(["convert", str(tmp_path / "vae.pth"), str(tmp_path / "vae.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "tokenizer"
    assert main(["convert", str(tmp_path / "vae.safetensors"), str(tmp_path / "vae.ckpt")]) == 0
    assert main(["convert", str(tmp_path / "vae.ckpt"), str(tmp_path / "back.pth")]) == 0
    assert "vae" in safe_load(tmp_path / "back.pth")
    for name in ("vae.safetensors", "vae.ckpt", "back.pth"):
        loaded = load_tokenizer(tmp_path / name)
        assert loaded.config == vae.config
        _same(loaded.state_dict(), vae.state_dict())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_folder_is_consolidated(tiny, tmp_path):
    import torch.distributed.checkpoint as dcp

    model, _ = tiny
    state = {"state_dict": {f"transformer.{k}": v.clone() for k, v in model.state_dict().items()}}
    dcp.save(state, checkpoint_id=str(tmp_path / "sharded.ckpt"))  # single process: no process group
    assert (tmp_path / "sharded.ckpt" / ".metadata").exists()
    summary = convert(tmp_path / "sharded.ckpt", tmp_path / "merged.safetensors")
    assert summary == {"kind": "transformer", "format": "safetensors", "tensors": len(model.state_dict()),
                       "dst": str(tmp_path / "merged.safetensors")}
    _same(load_transformer(tmp_path / "merged.safetensors").state_dict(), model.state_dict())


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        convert(tmp_path / "missing.pth", tmp_path / "out.pth")
