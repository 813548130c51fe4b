"""InfinityPipeline on tiny random components saved in the released and generic layouts."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil

import numpy as np
import pytest
import torch

from infinity_lightning.checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
from infinity_lightning.models.bsq_vae import BSQVAE
from infinity_lightning.models.infinity import InfinityTransformer
from infinity_lightning.models.text_encoder import make_tiny_t5
from infinity_lightning.pipeline import ComponentMismatchError, InfinityPipeline, check_components, make_tiny_pipeline
from infinity_lightning.presets import tokenizer_config, transformer_config
from infinity_lightning.sampling import ForceBits, generate, images_to_uint8
from infinity_lightning.scales import resolve

PROMPT = "a photo of a dog"


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("released"), layout="released")


@pytest.fixture(scope="module")
def pipe(released_dir):
    return InfinityPipeline.from_pretrained(released_dir, device="cpu")


def test_released_layout_matches_direct_generation(pipe, released_dir):
    assert pipe.transformer.config.tokenizer == "tiny" and pipe.text_encoder.width == 64
    # a small model keeps the custom defaults even under a released file name
    assert pipe.default_resolution == "0.06M" and pipe.defaults["cfg"] == 3.0 and pipe.defaults["tau"] == 1.0
    ours = pipe(PROMPT, seed=3, resolution=128, output_type="np")
    assert ours.shape == (1, 128, 128, 3) and ours.dtype == np.uint8
    feats = pipe.text_encoder.encode([PROMPT])
    schedule = resolve("0.06M", 1.0)[:5]
    assert resolve(128, 1.0) == schedule
    ref = generate(pipe.transformer, feats, schedule, tokenizer=pipe.tokenizer, cfg=3.0, tau=1.0, top_k=900,
                   top_p=0.97, seed=3)
    np.testing.assert_array_equal(ours[0], images_to_uint8(ref.images)[0].numpy())
    # default resolution: the 0.06M table (256 px)
    assert pipe.settings()["resolution"] == "0.06M" and resolve("0.06M", 1.0)[-1] == (1, 16, 16)


def test_seeds_decide_the_image(pipe):
    a = pipe(PROMPT, seed=11, resolution=64, output_type="np")
    b = pipe(PROMPT, seed=11, resolution=64, output_type="np")
    c = pipe(PROMPT, seed=12, resolution=64, output_type="np")
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    torch.manual_seed(5)
    d = pipe(PROMPT, resolution=64, output_type="np")
    torch.manual_seed(5)
    e = pipe(PROMPT, resolution=64, output_type="np")
    np.testing.assert_array_equal(d, e)


def test_batch_of_prompts_is_independent_of_batching(pipe):
    prompts = [PROMPT, "a cat sitting on a mat"]
    both = pipe(prompts, seed=20, resolution=64, output_type="np")
    assert both.shape == (2, 64, 64, 3)
    second = pipe(prompts[1], seed=21, resolution=64, output_type="np")
    np.testing.assert_array_equal(both[1], second[0])  # image i uses seed + i
    repeats = pipe(PROMPT, seed=20, num_images_per_prompt=2, resolution=64, output_type="np")
    np.testing.assert_array_equal(repeats[0], both[0])
    assert (repeats[0] != repeats[1]).any()
    # batched through the transformer together: same per-image streams, close images
    batched = pipe(prompts, seed=20, resolution=64, output_type="np", batch_size=2, return_bits=True)
    assert batched.images.shape == (2, 64, 64, 3) and batched.seeds == [20, 21]
    assert np.abs(batched.images.astype(int) - both.astype(int)).mean() < 8
    # an explicit generator samples the call as one batch from that stream
    g = torch.Generator().manual_seed(20)
    one_stream = pipe(prompts, generator=g, resolution=64, output_type="np")
    text = pipe.encode_prompt(prompts)
    ref = generate(pipe.transformer, text, resolve(64, 1.0), tokenizer=pipe.tokenizer, cfg=3.0, tau=1.0,
                   generator=torch.Generator().manual_seed(20))
    np.testing.assert_array_equal(one_stream, images_to_uint8(ref.images).numpy())


def test_negative_prompt_and_guidance_change_the_image(pipe):
    base = pipe(PROMPT, seed=7, resolution=64, output_type="np")
    neg = pipe(PROMPT, seed=7, resolution=64, output_type="np", negative_prompt="a blue car in the city")
    assert (base != neg).any()
    feats = pipe.text_encoder.encode([PROMPT])
    neg_feats = pipe.text_encoder.encode(["a blue car in the city"])
    ref = generate(pipe.transformer, feats, resolve(64, 1.0), tokenizer=pipe.tokenizer, cfg=3.0, tau=1.0,
                   negative_text=neg_feats, seed=7)
    np.testing.assert_array_equal(neg[0], images_to_uint8(ref.images)[0].numpy())
    # a shared negative prompt serves every prompt
    two = pipe([PROMPT, PROMPT], seed=7, resolution=64, output_type="np", negative_prompt="a blue car in the city")
    np.testing.assert_array_equal(two[0], neg[0])
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        pipe(PROMPT, negative_prompt=["a", "b"], resolution=64)
    unguided = pipe(PROMPT, seed=7, resolution=64, output_type="np", cfg=1.0)
    assert (unguided != base).any()


def test_progression_bits_and_hooks(pipe):
    out = pipe(PROMPT, seed=4, resolution=64, output_type="tensor", return_progression=True, return_bits=True)
    K = len(resolve(64, 1.0))
    assert out.images.shape == (1, 3, 64, 64) and len(out.bit_labels[0]) == K
    assert out.progression[0].shape == (K, 3, 64, 64)
    torch.testing.assert_close(out.progression[0][-1], out.images[0], rtol=0, atol=1e-5)
    assert (out.progression[0][0] - out.images[0]).abs().max() > 1e-3
    steps = pipe.generate_per_scale(PROMPT, seed=4, resolution=64)
    assert len(steps) == K and steps[-1].size == (64, 64)
    # forcing another image's bits through a hook reproduces that image
    forced = pipe(PROMPT, seed=99, resolution=64, output_type="tensor", hooks=[ForceBits(out.bit_labels[0])])
    torch.testing.assert_close(forced, out.images, rtol=0, atol=1e-5)


def test_bf16_and_aspect_ratio(released_dir):
    pipe = InfinityPipeline.from_pretrained(released_dir, device="cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    imgs = pipe([PROMPT, "a bowl of fruit"], seed=1, resolution=64, aspect_ratio=[1.0, 2.0])
    assert imgs[0].size == (64, 64)
    h, w = resolve(64, 2.0)[-1][1:]
    assert imgs[1].size == (16 * w, 16 * h) and h == 2 * w
    assert np.asarray(imgs[0]).std() > 0


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "export")
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert names == ["pipeline.json", "text_encoder", "tokenizer.safetensors", "transformer.json",
                     "transformer.safetensors"]
    again = InfinityPipeline.from_pretrained(tmp_path / "export", device="cpu", offload=True)
    assert again.offload and next(again.transformer.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(again(PROMPT, seed=2, resolution=64, output_type="np"),
                                  pipe(PROMPT, seed=2, resolution=64, output_type="np"))


def test_generic_layout_and_component_overrides(tmp_path):
    folder = make_tiny_pipeline(tmp_path / "generic", layout="generic")
    pipe = InfinityPipeline.from_pretrained(folder, device="cpu")
    assert pipe.transformer.config.depth == 2
    # an explicit tokenizer path overrides the folder's file (and is validated)
    other = load_tokenizer("tiny", codebook_dim=8)
    save_tokenizer(other, tmp_path / "d8.pth")
    with pytest.raises(ComponentMismatchError, match="16 bits per latent position, the tokenizer has 8"):
        InfinityPipeline.from_pretrained(folder, tokenizer=tmp_path / "d8.pth", device="cpu")


def test_wrong_pairings_are_refused(tmp_path):
    with torch.device("meta"):
        big = InfinityTransformer(transformer_config("8b"))
        d32 = BSQVAE(tokenizer_config("d32_reg"))
        two_b = InfinityTransformer(transformer_config("2b"))
        d14 = BSQVAE(tokenizer_config("d56_f8_14_patchify"))
    with pytest.raises(ComponentMismatchError, match="infinity_8b needs infinity_vae_d56_f8_14_patchify.pth, "
                                                     "got a d32 tokenizer"):
        check_components(big, d32)
    with pytest.raises(ComponentMismatchError, match="infinity_2b needs infinity_vae_d32reg.pth, got a d14 tokenizer "
                                                     "with 2x2 spatial patchify"):
        check_components(two_b, d14)
    check_components(big, d14)
    check_components(two_b, d32)
    # the released sampling settings come with the released architectures
    pipe = InfinityPipeline(big, d14, None, device="meta")
    assert (pipe.defaults["cfg"], pipe.defaults["tau"], pipe.default_resolution) == (3.0, 1.0, "1M")
    assert InfinityPipeline(two_b, d32, None, device="meta").defaults["tau"] == 0.5

    # the tiny patchify transformer with the stride-16 tiny tokenizer
    folder = tmp_path / "bad"
    folder.mkdir()
    save_transformer(load_transformer("tiny_patchify"), folder / "transformer.pth")
    save_tokenizer(load_tokenizer("tiny"), folder / "tokenizer.pth")
    make_tiny_t5(folder / "text_encoder")
    with pytest.raises(ComponentMismatchError, match=r"needs the 'tiny_f8' tokenizer preset, got a d16 tokenizer "
                                                     r"\(stride 16\)"):
        InfinityPipeline.from_pretrained(folder, device="cpu")
    # text width: the transformer reads 64-wide features
    save_tokenizer(load_tokenizer("tiny_f8"), folder / "tokenizer.pth")
    shutil.rmtree(folder / "text_encoder")
    make_tiny_t5(folder / "text_encoder", d_model=32)
    with pytest.raises(ComponentMismatchError, match="expects 64-wide text features, but the text encoder .* gives "
                                                     "32-wide"):
        InfinityPipeline.from_pretrained(folder, device="cpu")


def test_missing_files_and_offline_hub(tmp_path, released_dir, monkeypatch):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(released_dir / "infinity_2b_reg.pth", folder)
    shutil.copy(released_dir / "infinity_2b_reg.json", folder)
    with pytest.raises(FileNotFoundError, match="no tokenizer .* expected infinity_vae_d32reg.pth"):
        InfinityPipeline.from_pretrained(folder, device="cpu")
    shutil.copy(released_dir / "infinity_vae_d32reg.pth", folder)
    with pytest.raises(FileNotFoundError, match="no text encoder .*flan-t5-xl"):
        InfinityPipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(FileNotFoundError, match="no transformer weights .*infinity_2b_reg.pth"):
        InfinityPipeline.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InfinityPipeline.from_pretrained(tmp_path / "nowhere", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        InfinityPipeline.from_pretrained("FoundationVision/Infinity", variant="8b")
    msg = str(err.value)
    assert "not a local folder" in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download FoundationVision/Infinity infinity_8b_weights/* " \
           "infinity_vae_d56_f8_14_patchify.pth" in msg
