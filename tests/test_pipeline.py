"""InfinityPipeline on tiny random components saved in the released and generic layouts."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from infinity_lightning import loading
from infinity_lightning.checkpoints import load_tokenizer, load_transformer, save_tokenizer, save_transformer
from infinity_lightning.io import CheckpointError
from infinity_lightning.loading import ComponentMismatchError, check_components
from infinity_lightning.models.bsq_vae import BSQVAE
from infinity_lightning.models.infinity import InfinityTransformer
from infinity_lightning.models.text_encoder import PromptTruncatedWarning
from infinity_lightning.pipeline import InfinityPipeline, InfinityPipelineOutput
from infinity_lightning.presets import tokenizer_config, transformer_config
from infinity_lightning.sampling import ForceBits, SamplingConfig, generate, images_to_uint8
from infinity_lightning.scales import ScaleSchedule, resolve
from infinity_lightning.tiny import make_tiny_pipeline, make_tiny_t5

PROMPT = "a photo of a dog"
LONG_PROMPT = " ".join(["a red apple on a wooden table near a small house"] * 6)


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("released"), layout="released")


@pytest.fixture(scope="module")
def pipe(released_dir):
    return InfinityPipeline.from_pretrained(released_dir, device="cpu")


def test_released_layout_matches_direct_generation(pipe):
    assert pipe.transformer.config.tokenizer == "tiny" and pipe.text_encoder.width == 64
    # a small model keeps the custom defaults even under a released file name
    assert pipe.resolution == "0.06M" and (pipe.sampling.cfg, pipe.sampling.tau) == (3.0, 1.0)
    assert pipe.schedule == resolve("0.06M", 1.0) and pipe.schedule[-1] == (1, 16, 16)
    ours = pipe(PROMPT, seed=3, resolution=128, output_type="np")
    assert ours.images.shape == (1, 128, 128, 3) and ours.images.dtype == np.uint8
    feats = pipe.text_encoder.encode([PROMPT])
    schedule = resolve("0.06M", 1.0)[:5]
    assert resolve(128, 1.0) == schedule and ours.schedules == [schedule]
    ref = generate(pipe.transformer, feats, schedule, tokenizer=pipe.tokenizer, cfg=3.0, tau=1.0, top_k=900,
                   top_p=0.97, seed=3)
    np.testing.assert_array_equal(ours[0], images_to_uint8(ref.images)[0].numpy())


def test_output_object_in_every_output_type(pipe):
    prompts = [PROMPT, "a bowl of fruit"]
    tensor = pipe(prompts, seed=5, resolution=64, output_type="tensor")
    assert isinstance(tensor, InfinityPipelineOutput) and tensor.images.shape == (2, 3, 64, 64)
    assert tensor.images.min() < -0.5 and tensor.images.max() <= 1.0 and tensor.images.dtype == torch.float32
    pt = pipe(prompts, seed=5, resolution=64, output_type="pt")
    assert torch.equal(pt.images, (tensor.images + 1) / 2) and 0.0 <= pt.images.min() and pt.images.max() <= 1.0
    np_out = pipe(prompts, seed=5, resolution=64, output_type="np")
    assert np_out.images.dtype == np.uint8 and np_out.images.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(np_out.images, images_to_uint8(tensor.images).numpy())
    pil = pipe(prompts, seed=5, resolution=64)
    assert len(pil) == 2 and [im.size for im in pil] == [(64, 64), (64, 64)]
    np.testing.assert_array_equal(np.asarray(pil[1]), np_out[1])
    # one output object whatever the flags: seeds, the config used and the schedules ride along
    assert pil.seeds == [5, 6] and pil.sampling == pipe.sampling and pil.schedules == [resolve(64, 1.0)] * 2
    assert pil.bit_labels is None and pil.progression is None
    assert [np.asarray(im).shape for im in pil] == [(64, 64, 3)] * 2  # iterates over the images
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(PROMPT, output_type="latent")


def test_seeds_decide_the_image(pipe):
    a = pipe(PROMPT, seed=11, resolution=64, output_type="np").images
    b = pipe(PROMPT, seed=11, resolution=64, output_type="np").images
    c = pipe(PROMPT, seed=12, resolution=64, output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    torch.manual_seed(5)
    d = pipe(PROMPT, resolution=64, output_type="np").images
    torch.manual_seed(5)
    e = pipe(PROMPT, resolution=64, output_type="np").images
    np.testing.assert_array_equal(d, e)


def test_batch_of_prompts_is_independent_of_batching(pipe):
    prompts = [PROMPT, "a cat sitting on a mat"]
    both = pipe(prompts, seed=20, resolution=64, output_type="np").images
    assert both.shape == (2, 64, 64, 3)
    second = pipe(prompts[1], seed=21, resolution=64, output_type="np").images
    np.testing.assert_array_equal(both[1], second[0])  # image i uses seed + i
    repeats = pipe(PROMPT, seed=20, num_images_per_prompt=2, resolution=64, output_type="np").images
    np.testing.assert_array_equal(repeats[0], both[0])
    assert (repeats[0] != repeats[1]).any()
    # batched through the transformer together: same per-image streams, close images
    batched = pipe(prompts, seed=20, resolution=64, output_type="np", batch_size=2, return_bits=True)
    assert batched.images.shape == (2, 64, 64, 3) and batched.seeds == [20, 21]
    assert np.abs(batched.images.astype(int) - both.astype(int)).mean() < 8
    # one generator (not a list) samples the call as one batch from that stream
    one_stream = pipe(prompts, generator=torch.Generator().manual_seed(20), resolution=64, output_type="np")
    assert one_stream.seeds == [None, None]
    text = pipe.encode_prompt(prompts)
    ref = generate(pipe.transformer, text, resolve(64, 1.0), tokenizer=pipe.tokenizer, cfg=3.0, tau=1.0,
                   generator=torch.Generator().manual_seed(20))
    np.testing.assert_array_equal(one_stream.images, images_to_uint8(ref.images).numpy())


def test_generator_list_draws_each_stream_once(pipe):
    prompts = [PROMPT, "a cat sitting on a mat", "a bowl of fruit"]
    gens = [torch.Generator().manual_seed(30 + i) for i in range(3)]
    listed = pipe(prompts, generator=gens, resolution=64, output_type="np")
    assert listed.seeds == [None] * 3
    alone = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(30 + i)
        alone.append(pipe(prompt, generator=[g], resolution=64, output_type="np").images[0])
        np.testing.assert_array_equal(listed.images[i], pipe(prompt, seed=30 + i, resolution=64, output_type="np")[0])
        # the per-image stream advanced exactly as in the call of its own: nothing is drawn twice
        assert torch.equal(gens[i].get_state(), g.get_state())
    np.testing.assert_array_equal(listed.images, np.stack(alone))
    # batched: the same number of draws from every stream
    batched_gens = [torch.Generator().manual_seed(30 + i) for i in range(3)]
    pipe(prompts, generator=batched_gens, resolution=64, batch_size=3, output_type="np")
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(batched_gens, gens))
    fresh = torch.Generator().manual_seed(30)
    assert not torch.equal(fresh.get_state(), gens[0].get_state())
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        pipe(prompts, generator=gens[:2], resolution=64)
    with pytest.raises(ValueError, match="seed or generator, not both"):
        pipe(PROMPT, seed=1, generator=[gens[0]], resolution=64)
    with pytest.raises(ValueError, match="generator 0 must be a torch.Generator"):
        pipe(PROMPT, generator=[30], resolution=64)


def test_sampling_options_as_keywords_or_config(pipe):
    by_kw = pipe(PROMPT, seed=8, resolution=64, output_type="np", tau=0.5, top_k=1)
    by_config = pipe(PROMPT, seed=8, resolution=64, output_type="np", sampling=SamplingConfig(tau=0.5, top_k=1))
    np.testing.assert_array_equal(by_kw.images, by_config.images)
    assert by_kw.sampling.tau == 0.5 and by_kw.sampling.top_k == 1 and pipe.sampling.tau == 1.0
    assert (by_kw.images != pipe(PROMPT, seed=8, resolution=64, output_type="np").images).any()
    with pytest.raises(TypeError, match=r"unknown sampling option\(s\) \['guidance'\]"):
        pipe(PROMPT, guidance=2.0)


def test_everything_is_checked_before_any_work(pipe, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("text encoded before the arguments were checked")

    monkeypatch.setattr(pipe, "_encode", no_work)
    bad = [(dict(tau=0.0), "tau .* must be > 0"), (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
           (dict(cfg=-1.0), "cfg must be >= 0"), (dict(aspect_ratio=10.0), "outside the templates"),
           (dict(num_images_per_prompt=0), "num_images_per_prompt must be"), (dict(batch_size=0), "batch_size must"),
           (dict(seed=[1, 2]), "2 seeds for 1 images"), (dict(negative_prompt=["a", "b"]), "2 negative prompts")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            pipe(PROMPT, resolution=64, **kwargs)
    with pytest.raises(ValueError, match="non-empty list"):
        pipe([], resolution=64)
    with pytest.raises(ValueError, match="prompt 1 has"):
        pipe([PROMPT, LONG_PROMPT], resolution=64)


def test_resolution_and_aspect_ratio_outside_the_templates(pipe):
    with pytest.raises(ValueError, match=r"aspect ratio \(h/w\) 10.0 is outside the templates \(0.333 ... 3.0\)"):
        pipe(PROMPT, aspect_ratio=10.0, resolution=64)
    with pytest.raises(ValueError, match="resolution 4096 is larger than the largest schedule"):
        pipe(PROMPT, resolution=4096)
    with pytest.warns(UserWarning, match="resolution 110 is not a schedule size; using the nearest, 96x96 px"):
        assert pipe(PROMPT, seed=1, resolution=110, output_type="np").images.shape == (1, 96, 96, 3)
    with pytest.raises(ValueError, match="unknown pixel budget|resolution '2M'"):
        InfinityPipeline(pipe.transformer, pipe.tokenizer, pipe.text_encoder, device="cpu", resolution="2M")


def test_prompt_length_check_and_truncation(pipe):
    assert pipe.text_length == 32 == pipe.transformer.config.text_maxlen
    n_tokens = len(pipe.text_encoder.tokenizer(LONG_PROMPT)["input_ids"])
    assert n_tokens > 32
    with pytest.raises(ValueError, match=rf"prompt 1 has {n_tokens} tokens, more than the 32 .*truncate_prompts"):
        pipe([PROMPT, LONG_PROMPT], resolution=64)
    with pytest.raises(ValueError, match=rf"negative prompt 0 has {n_tokens} tokens"):
        pipe(PROMPT, negative_prompt=LONG_PROMPT, resolution=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe([LONG_PROMPT, PROMPT, LONG_PROMPT], seed=2, resolution=64, output_type="np", truncate_prompts=True)
    cut = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(cut) == 1 and "2 prompt(s) longer than 32 tokens" in str(cut[0].message)
    with pytest.warns(PromptTruncatedWarning, match=rf"prompt 0: {n_tokens} tokens"):
        feats = pipe.encode_prompt(LONG_PROMPT, truncate_prompts=True)
    assert feats.lens == [32]
    by_embeds = pipe(prompt_embeds=feats, seed=2, resolution=64, output_type="np")
    np.testing.assert_array_equal(out.images[0], by_embeds.images[0])
    assert pipe.text_encoder.max_length == 512  # the limit is lowered only while encoding
    with pytest.raises(ValueError, match="prompt_embeds 0 has 40 rows, more than text_maxlen=32"):
        pipe(prompt_embeds=type(feats).pack([torch.zeros(40, 64)]), resolution=64)


def test_progress_bar(pipe, capsys):
    K = len(resolve(64, 1.0))
    pipe(PROMPT, seed=1, resolution=64, progress=True)
    err = capsys.readouterr().err
    assert "scales" in err and f"{K}/{K}" in err
    pipe(PROMPT, seed=1, resolution=64, progress=False)
    assert capsys.readouterr().err == ""
    pipe(PROMPT, seed=1, resolution=64)  # default: only on a terminal (captured stderr is not one)
    assert capsys.readouterr().err == ""


def test_negative_prompt_and_guidance_change_the_image(pipe):
    base = pipe(PROMPT, seed=7, resolution=64, output_type="np").images
    neg = pipe(PROMPT, seed=7, resolution=64, output_type="np", negative_prompt="a blue car in the city").images
    assert (base != neg).any()
    feats = pipe.text_encoder.encode([PROMPT])
    neg_feats = pipe.text_encoder.encode(["a blue car in the city"])
    ref = generate(pipe.transformer, feats, resolve(64, 1.0), tokenizer=pipe.tokenizer, cfg=3.0, tau=1.0,
                   negative_text=neg_feats, seed=7)
    np.testing.assert_array_equal(neg[0], images_to_uint8(ref.images)[0].numpy())
    # a shared negative prompt serves every prompt
    two = pipe([PROMPT, PROMPT], seed=7, resolution=64, output_type="np", negative_prompt="a blue car in the city")
    np.testing.assert_array_equal(two[0], neg[0])
    unguided = pipe(PROMPT, seed=7, resolution=64, output_type="np", cfg=1.0).images
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
    torch.testing.assert_close(forced.images, out.images, rtol=0, atol=1e-5)


def test_bf16_and_aspect_ratio(released_dir):
    pipe = InfinityPipeline.from_pretrained(released_dir, device="cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    imgs = pipe([PROMPT, "a bowl of fruit"], seed=1, resolution=64, aspect_ratio=[1.0, 2.0])
    assert imgs[0].size == (64, 64)
    h, w = resolve(64, 2.0)[-1][1:]
    assert imgs[1].size == (16 * w, 16 * h) and h == 2 * w
    assert np.asarray(imgs[0]).std() > 0
    mixed = pipe([PROMPT, "a bowl of fruit"], seed=1, resolution=64, aspect_ratio=[1.0, 2.0], output_type="np")
    assert [a.shape for a in mixed.images] == [(64, 64, 3), (16 * h, 16 * w, 3)]  # a list when sizes differ


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "export")
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert names == ["pipeline.json", "text_encoder", "tokenizer.safetensors", "transformer.json",
                     "transformer.safetensors"]
    stored = json.loads((tmp_path / "export" / "pipeline.json").read_text())
    assert stored == {"format_version": 2, "schedule": "0.06M",
                      "sampling": {"cfg": 3.0, "tau": 1.0, "top_k": 900, "top_p": 0.97, "gumbel": False,
                                   "cfg_insertion_layer": 0}}
    again = InfinityPipeline.from_pretrained(tmp_path / "export", device="cpu", offload=True)
    assert again.offload and next(again.transformer.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(again(PROMPT, seed=2, resolution=64, output_type="np").images,
                                  pipe(PROMPT, seed=2, resolution=64, output_type="np").images)


def test_pipeline_json_schedule_and_sampling_versions(pipe, tmp_path):
    folder = tmp_path / "export"
    schedule = ScaleSchedule([(1, 1), (2, 2), (2, 4)])  # a prefix of the 1:2 template, 32x64 px
    assert schedule.template == 0.5
    custom = InfinityPipeline(pipe.transformer, pipe.tokenizer, pipe.text_encoder, device="cpu", resolution=schedule,
                              sampling={"tau": 0.7, "top_k": 5})
    custom.save_pretrained(folder)
    stored = json.loads((folder / "pipeline.json").read_text())
    assert stored["schedule"] == schedule.to_dict() and stored["sampling"]["tau"] == 0.7
    loaded = InfinityPipeline.from_pretrained(folder, device="cpu")
    assert loaded.schedule == schedule and (loaded.sampling.tau, loaded.sampling.top_k) == (0.7, 5)
    assert loaded(PROMPT, seed=1, output_type="np").images.shape[1:3] == schedule.pixel_size(16)
    # format 1, as older exports and the quick start write it
    (folder / "pipeline.json").write_text(json.dumps({"format_version": 1, "default_resolution": 128,
                                                      "defaults": {"cfg": 2.0, "tau": 0.6}}))
    old = InfinityPipeline.from_pretrained(folder, device="cpu")
    assert old.resolution == 128 and (old.sampling.cfg, old.sampling.tau, old.sampling.top_k) == (2.0, 0.6, 900)
    override = InfinityPipeline.from_pretrained(folder, device="cpu", resolution=64, sampling={"tau": 0.9})
    assert override.resolution == 64 and (override.sampling.cfg, override.sampling.tau) == (2.0, 0.9)
    (folder / "pipeline.json").write_text(json.dumps({"format_version": 3, "schedule": 64}))
    with pytest.raises(CheckpointError, match="pipeline.json: format_version 3 is not understood"):
        InfinityPipeline.from_pretrained(folder, device="cpu")
    (folder / "pipeline.json").write_text(json.dumps({"format_version": 2, "schedule": 64, "sampling": {"temp": 1}}))
    with pytest.raises(CheckpointError, match=r"pipeline.json: unknown sampling option\(s\) \['temp'\]"):
        InfinityPipeline.from_pretrained(folder, device="cpu")


def test_generic_layout_and_component_overrides(tmp_path):
    folder = make_tiny_pipeline(tmp_path / "generic", layout="generic")
    pipe = InfinityPipeline.from_pretrained(folder, device="cpu")
    assert pipe.transformer.config.depth == 2
    # an explicit tokenizer path overrides the folder's file (and is validated)
    other = load_tokenizer("tiny", codebook_dim=8)
    save_tokenizer(other, tmp_path / "d8.pth")
    with pytest.raises(ComponentMismatchError, match="16 bits per latent position, the tokenizer has 8"):
        InfinityPipeline.from_pretrained(folder, tokenizer=tmp_path / "d8.pth", device="cpu")


def test_component_from_pretrained_and_tokenizer_device_dtype(released_dir):
    vae = BSQVAE.from_pretrained(released_dir / "infinity_vae_d32reg.pth")
    ref = load_tokenizer(released_dir / "infinity_vae_d32reg.pth")
    assert isinstance(vae, BSQVAE) and not vae.training
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), ref.state_dict().values()))
    half = BSQVAE.from_pretrained(released_dir / "infinity_vae_d32reg.pth", dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.quantizer.lfq.mask.dtype == torch.long  # integer buffers keep their type
    assert next(load_tokenizer("tiny", device="meta").parameters()).device.type == "meta"
    with pytest.raises(ValueError, match="tokenizer dtype 'int3' is not a dtype"):
        load_tokenizer("tiny", dtype="int3")
    model = InfinityTransformer.from_pretrained(released_dir / "infinity_2b_reg.pth", dtype=torch.bfloat16)
    assert isinstance(model, InfinityTransformer) and model.config.depth == 2
    assert model.head.weight.dtype == torch.bfloat16
    expected = load_transformer(released_dir / "infinity_2b_reg.pth").head.weight
    assert torch.equal(model.head.weight.float(), expected.bfloat16().float())
    assert InfinityTransformer.from_pretrained("tiny", depth=4).config.depth == 4


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
    # the released sampling settings and resolution come with the released architectures
    pipe = InfinityPipeline(big, d14, None, device="meta")
    assert (pipe.sampling.cfg, pipe.sampling.tau, pipe.resolution, pipe.token_stride) == (3.0, 1.0, "1M", 16)
    assert InfinityPipeline(two_b, d32, None, device="meta").sampling.tau == 0.5

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
    with pytest.raises(ValueError, match="unknown variant '3b'; expected one of"):
        InfinityPipeline.from_pretrained(folder, variant="3b", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        InfinityPipeline.from_pretrained("FoundationVision/Infinity", variant="8b")
    msg = str(err.value)
    assert "not a local folder" in msg and "HF_HUB_OFFLINE" in msg
    assert "huggingface-cli download FoundationVision/Infinity infinity_8b_weights/* " \
           "infinity_vae_d56_f8_14_patchify.pth" in msg


def test_a_missing_local_folder_never_reaches_the_hub(tmp_path, monkeypatch):
    asked = []

    def hub(repo_id, *args, **kwargs):
        asked.append(repo_id)
        raise FileNotFoundError("hub asked")

    monkeypatch.setattr(loading, "_snapshot", hub)
    for name in ("./nowhere", "~/nowhere-at-all", str(tmp_path / "nowhere"), "weights/infinity/2b", "nowhere",
                 "owner/model.safetensors", "../owner/name"):
        with pytest.raises(FileNotFoundError, match=f"pipeline folder '{name}' does not exist"):
            InfinityPipeline.from_pretrained(name, device="cpu")
    assert asked == []
    with pytest.raises(FileNotFoundError, match="hub asked"):  # an owner/name id does go to the Hub
        InfinityPipeline.from_pretrained("FoundationVision/Infinity", device="cpu")
    assert asked == ["FoundationVision/Infinity"]
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file; a pipeline is a folder"):
        InfinityPipeline.from_pretrained(tmp_path / "file.txt", device="cpu")
