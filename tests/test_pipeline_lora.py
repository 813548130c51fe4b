"""The pipeline's editing methods (inpaint, outpaint, variations) and LoRA methods (load_lora,
set_adapters, unload_lora, fuse_lora, from_pretrained(lora=...)) on a tiny random pipeline whose
transformer has every path active."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from infinity_lightning import editing, lora
from infinity_lightning.checkpoints import load_transformer, save_transformer
from infinity_lightning.io import CheckpointError
from infinity_lightning.pipeline import InfinityPipeline
from infinity_lightning.sampling import vae_to_tokens
from infinity_lightning.tiny import make_tiny_pipeline

from .test_transformer import randomize, tiny_text

pytest.importorskip("peft")

PROMPT = "a photo of a cat"
RES = 64                                   # 16 px tokens: grids 1, 2, 4
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny pipeline folder with an active transformer, and two random adapters for it."""
    root = tmp_path_factory.mktemp("pipeline_lora")
    folder = make_tiny_pipeline(root / "pipe", layout="generic")
    model = randomize(load_transformer(folder / "transformer.pth", cond_drop_rate=0.0), seed=1, scale=0.6)
    save_transformer(model, folder / "transformer.pth")
    adapters = {}
    for name, targets, seed in (("a", lora.DEFAULT_TARGETS, 11), ("b", ("ffn.fc1", "head"), 12)):
        adapted = load_transformer(folder / "transformer.pth")
        torch.manual_seed(seed)
        lora.add_lora(adapted, lora.LoraSettings(rank=2, alpha=4, init="random", targets=targets))
        adapters[name] = lora.save_lora(adapted, root / f"adapter_{name}")
    return {"pipe": folder, **adapters}


@pytest.fixture()
def pipe(folders):
    return InfinityPipeline.from_pretrained(folders["pipe"], device="cpu")


def logits(pipe: InfinityPipeline) -> torch.Tensor:
    """Teacher-forced logits of fixed random inputs (more sensitive than sampled images)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 2, (2, 20, 16), generator=g).float() * 2 - 1      # 21 tokens, the first is the text
    with torch.no_grad():
        return pipe.transformer(tiny_text(2, 64), x, SCHEDULE)


def image_and_mask():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    arr[16:48, 16:48] = (30, 60, 200)
    mask = np.zeros((RES, RES), bool)
    mask[8:40, 24:56] = True
    return Image.fromarray(arr), mask


# -- editing through the pipeline -------------------------------------------------------------
def test_pipeline_editing_methods_are_the_editing_functions_bit_for_bit(pipe):
    image, mask = image_and_mask()
    out = pipe.inpaint(PROMPT, image, mask, seed=3, resolution=RES, output_type="tensor")
    direct = editing.inpaint(pipe, PROMPT, image, mask, seed=3, resolution=RES, output_type="tensor")
    assert torch.equal(out.images, direct.images)
    assert isinstance(out, editing.EditOutput) and out.seeds == [3]
    regenerated = 0
    for generated, source, keep in zip(out.bit_labels[0], out.image_bit_labels, out.keep_masks):
        g, s, kept = vae_to_tokens(generated)[0], vae_to_tokens(source)[0], keep[0, :, 0]
        assert torch.equal(g[kept], s[kept])                          # the image's bits, exactly
        regenerated += int((g[~kept] != s[~kept]).any(dim=-1).sum())
    assert regenerated > 0                                            # and new ones where masked
    with pytest.raises(ValueError, match="marks no pixel"):
        pipe.inpaint(PROMPT, image, np.zeros((RES, RES), bool), resolution=RES)

    plain = pipe(PROMPT, seed=5, resolution=RES, output_type="tensor", return_bits=True)
    same = pipe.variations(image, PROMPT, keep_scales=0, seed=5, resolution=RES, output_type="tensor")
    assert torch.equal(same.images, plain.images)
    kept = pipe.variations(image, PROMPT, keep_scales=2, seed=5, resolution=RES, output_type="tensor")
    assert all(torch.equal(kept.bit_labels[0][k], kept.image_bit_labels[k]) for k in range(2))
    assert not torch.equal(kept.bit_labels[0][2], kept.image_bit_labels[2])

    wide = pipe.outpaint(PROMPT, image, 0.5, resolution=113, seed=1, output_type="np")
    assert wide.images.shape[1:] == (80, 160, 3) and wide.settings["box"] == (32, 0, 80, 80)
    assert torch.equal(wide.keep_masks[-1].view(5, 10)[:, 2:7], torch.ones(5, 5, dtype=torch.bool))


def test_vae_to_tokens_orders_patchified_bits_as_pixel_unshuffle():
    labels = torch.arange(1 * 1 * 4 * 4 * 2).reshape(1, 1, 4, 4, 2)
    plain = vae_to_tokens(labels)
    assert plain.shape == (1, 16, 2) and torch.equal(plain[0, 5], labels[0, 0, 1, 1])
    patched = vae_to_tokens(labels, patchify=True)
    assert patched.shape == (1, 4, 8)
    # token (0, 1) holds latent rows 0-1, cols 2-3; bit-major, then row, then column
    block = labels[0, 0, 0:2, 2:4]                                    # (2, 2, d)
    assert torch.equal(patched[0, 1], block.permute(2, 0, 1).reshape(-1))
    assert vae_to_tokens(plain) is plain
    with pytest.raises(ValueError, match=r"\(B, 1, H, W, d\) or \(B, L, d_tok\)"):
        vae_to_tokens(torch.zeros(1, 4, 4, 2))


# -- LoRA --------------------------------------------------------------------------------------
def test_several_adapters_scales_and_unloading_restore_exact_outputs(pipe, folders):
    base_logits = logits(pipe)
    base_image = pipe(PROMPT, seed=2, resolution=RES, output_type="tensor").images
    base_keys = sorted(pipe.transformer.state_dict())

    assert pipe.load_lora(folders["a"], adapter_name="a") == "a"
    only_a = logits(pipe)
    assert (only_a - base_logits).abs().max() > 1e-2                 # the adapter changes the model
    assert pipe.load_lora(folders["b"]) == "default"                  # a free name when none is given
    both = logits(pipe)
    assert (both - only_a).abs().max() > 1e-2
    assert {n: a["active"] for n, a in pipe.lora_adapters().items()} == {"a": True, "default": True}
    assert "LoRA adapters ['a', 'default']" in repr(pipe)

    pipe.set_adapters(["a"])
    assert torch.equal(logits(pipe), only_a)
    pipe.set_adapters(["a", "default"], [1.0, 0.0])                   # scale 0: off
    assert torch.equal(logits(pipe), only_a)
    pipe.set_adapters(["a", "default"], [0.5, 1.0])
    half = logits(pipe)
    assert not torch.equal(half, both) and pipe.lora_adapters()["a"]["scale"] == 0.5
    with pytest.raises(KeyError, match="no LoRA adapter 'c'"):
        pipe.set_adapters(["c"])
    with pytest.raises(ValueError, match="carries LoRA adapters .*fuse_lora"):
        pipe.save_pretrained(folders["pipe"].parent / "refused")

    pipe.unload_lora("default")
    pipe.set_adapters(["a"], [1.0])
    assert torch.equal(logits(pipe), only_a)
    pipe.unload_lora()
    assert pipe.lora_adapters() == {} and sorted(pipe.transformer.state_dict()) == base_keys
    assert torch.equal(logits(pipe), base_logits)
    assert torch.equal(pipe(PROMPT, seed=2, resolution=RES, output_type="tensor").images, base_image)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    pipe.unload_lora()                                                # nothing loaded: nothing to do


def test_fuse_gives_the_adapted_outputs(pipe, folders, tmp_path):
    pipe.load_lora(folders["a"], scale=0.7)
    pipe.load_lora(folders["b"], adapter_name="b")
    adapted = logits(pipe)
    assert pipe.fuse_lora() == ["default", "b"]
    assert pipe.lora_adapters() == {}
    fused = logits(pipe)
    torch.testing.assert_close(fused, adapted, rtol=0, atol=1e-5)
    # a fused pipeline is a plain one again: it saves and reloads to the same outputs
    saved = pipe.save_pretrained(tmp_path / "fused")
    torch.testing.assert_close(logits(InfinityPipeline.from_pretrained(saved, device="cpu")), adapted, rtol=0,
                               atol=1e-5)


def test_from_pretrained_loads_adapters_and_edits_with_them(folders):
    pipe = InfinityPipeline.from_pretrained(folders["pipe"], device="cpu", lora={"a": folders["a"]})
    plain = InfinityPipeline.from_pretrained(folders["pipe"], device="cpu")
    plain.load_lora(folders["a"], adapter_name="a")
    assert list(pipe.lora_adapters()) == ["a"]
    assert torch.equal(logits(pipe), logits(plain))
    listed = InfinityPipeline.from_pretrained(folders["pipe"], device="cpu", lora=[folders["a"], folders["b"]])
    assert list(listed.lora_adapters()) == ["default", "default_1"]
    # editing runs on the adapted transformer: the kept tokens are still the image's bits
    image, mask = image_and_mask()
    out = pipe.inpaint(PROMPT, image, mask, seed=3, resolution=RES, output_type="tensor")
    base = InfinityPipeline.from_pretrained(folders["pipe"], device="cpu").inpaint(
        PROMPT, image, mask, seed=3, resolution=RES, output_type="tensor")
    kept = out.keep_masks[-1][0, :, 0]
    assert torch.equal(vae_to_tokens(out.bit_labels[0][-1])[0][kept], vae_to_tokens(out.image_bit_labels[-1])[0][kept])
    assert not torch.equal(out.images, base.images)


def test_lora_errors_name_the_folder(folders, tmp_path):
    with pytest.raises(CheckpointError, match=f"LoRA adapter folder not found: {tmp_path / 'none'}"):
        InfinityPipeline.from_pretrained(folders["pipe"], device="cpu", lora=tmp_path / "none")
    with pytest.raises(TypeError, match="expected adapter folders"):
        InfinityPipeline.from_pretrained(folders["pipe"], device="cpu", lora=[3])
    wider = load_transformer("tiny", embed_dim=128, num_heads=2)
    lora.add_lora(wider, lora.LoraSettings(rank=2))
    other = lora.save_lora(wider, tmp_path / "wider")
    pipe = InfinityPipeline.from_pretrained(folders["pipe"], device="cpu")
    with pytest.raises(CheckpointError, match="does not match this transformer: .*shape mismatches"):
        pipe.load_lora(other)
    assert pipe.lora_adapters() == {}                                 # a failed load leaves nothing behind
