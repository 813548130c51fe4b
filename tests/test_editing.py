"""Image editing by bit forcing (inpaint, outpaint, variations) on tiny random pipelines."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from infinity_lightning import editing, images
from infinity_lightning.cli import main
from infinity_lightning.pipeline import InfinityPipeline
from infinity_lightning.tiny import make_tiny_pipeline
from infinity_lightning.sampling import ForceBits, generate, images_to_uint8, vae_to_tokens

PROMPT = "a photo of a cat"
RES = 128  # 16 px tokens: grids 1, 2, 4, 6, 8 (the 6x6 cells overlap, 128 / 6 is not whole)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("editing")
    return {"plain": make_tiny_pipeline(root / "plain", layout="generic"),
            "patchify": make_tiny_pipeline(root / "patchify", layout="generic", transformer="tiny_patchify",
                                           tokenizer="tiny_f8")}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: InfinityPipeline.from_pretrained(folder, device="cpu") for name, folder in folders.items()}


def _picture(size=RES, seed=0) -> Image.Image:
    """A smooth gradient with a dark square and some noise: structure at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    arr = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x) + 60], axis=-1)
    arr[size // 4:size // 2, size // 2:3 * size // 4] = (20, 20, 200)
    arr = arr + rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _block_mask(size=RES, rows=(40, 88), cols=(24, 72)) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def _token_bits(labels: torch.Tensor, patchify: bool) -> torch.Tensor:
    """VAE-layout labels (1, 1, H, W, d) -> token layout (h*w, d_tok)."""
    return vae_to_tokens(labels, patchify)[0]


def _vae_schedule(schedule, patchify):
    f = 2 if patchify else 1
    return [(1, f * h, f * w) for _, h, w in schedule]


# -- inpainting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain", "patchify"])
def test_inpaint_keeps_the_image_bits_outside_the_mask(pipes, name):
    pipe = pipes[name]
    patchify = name == "patchify"
    image, mask = _picture(), _block_mask()
    out = editing.inpaint(pipe, PROMPT, image, mask, seed=3, resolution=RES, output_type="tensor")
    assert [tuple(g) for g in out.schedule] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]
    assert out.images.shape == (1, 3, RES, RES)
    # the forced source is the training quantization of the image
    reference = editing.encode_image_bits(pipe.tokenizer, image, out.schedule, patchify)
    for a, b in zip(out.image_bit_labels, reference):
        assert torch.equal(a, b)
    keep = editing.scale_masks(mask, out.schedule)
    kept_counts, changed = [], 0
    for k, (generated, source, keep_k) in enumerate(zip(out.bit_labels[0], reference, keep)):
        g, s = _token_bits(generated, patchify), _token_bits(source, patchify)
        kept = keep_k[0, :, 0]
        assert torch.equal(g[kept], s[kept]), f"scale {k}: a kept token's bits differ from the image's"
        kept_counts.append(int(kept.sum()))
        changed += int((g[~kept] != s[~kept]).sum())
    # the block covers rows 2..5 / cols 1..4 of the 8x8 grid: 48 of 64 tokens kept there
    assert kept_counts == [0, 0, 10, 24, 48]
    # negative check: the regenerated tokens were sampled, not copied
    last_regenerated = _token_bits(out.bit_labels[0][-1], patchify)[~keep[-1][0, :, 0]]
    assert changed > 0
    assert (last_regenerated != _token_bits(reference[-1], patchify)[~keep[-1][0, :, 0]]).float().mean() > 0.2


def test_inpaint_decodes_its_bits_and_blends_only_when_asked(pipes):
    pipe = pipes["plain"]
    image, mask = _picture(), _block_mask()
    original = np.asarray(image)
    plain = editing.inpaint(pipe, PROMPT, image, mask, seed=4, resolution=RES, output_type="np")
    decoded = pipe.tokenizer.decode(pipe.tokenizer.codes_from_bits(plain.bit_labels[0],
                                                                   _vae_schedule(plain.schedule, False)))
    # blend=False: every pixel is the decoder's, outside the mask too
    np.testing.assert_array_equal(plain.images[0], images_to_uint8(decoded)[0].numpy())
    outside = ~mask
    assert (plain.images[0][outside] != original[outside]).any()
    blended = editing.inpaint(pipe, PROMPT, image, mask, seed=4, resolution=RES, output_type="np", blend=True)
    np.testing.assert_array_equal(blended[0][outside], original[outside])
    np.testing.assert_array_equal(blended[0][mask], plain.images[0][mask])
    # tensor output: the original floats outside, the generated inside
    t_plain = editing.inpaint(pipe, PROMPT, image, mask, seed=4, resolution=RES, output_type="tensor")
    t_blend = editing.inpaint(pipe, PROMPT, image, mask, seed=4, resolution=RES, output_type="tensor", blend=True)
    source = plain.source[0]
    assert torch.equal(t_blend[0][:, torch.from_numpy(outside)], source[:, torch.from_numpy(outside)])
    assert torch.equal(t_blend[0][:, torch.from_numpy(mask)], t_plain[0][:, torch.from_numpy(mask)])
    # feathered: exact original beyond 4 px from the mask, a ramp within
    soft = editing.inpaint(pipe, PROMPT, image, mask, seed=4, resolution=RES, output_type="tensor", blend=True,
                           feather=4)[0]
    near = F.max_pool2d(torch.from_numpy(mask).float()[None, None], 9, stride=1, padding=4)[0, 0].bool()
    assert torch.equal(soft[:, ~near], source[:, ~near])
    assert torch.equal(soft[:, torch.from_numpy(mask)], t_plain[0][:, torch.from_numpy(mask)])
    ring = near & ~torch.from_numpy(mask)
    assert not torch.equal(soft[:, ring], source[:, ring]) and not torch.equal(soft[:, ring], t_plain[0][:, ring])
    # one pixel right of the mask's right edge (column 72) is a 4/5 mix of generated and original
    expected = 0.8 * t_plain[0][:, 60, 72] + 0.2 * source[:, 60, 72]
    torch.testing.assert_close(soft[:, 60, 72], expected, rtol=0, atol=1e-6)


def test_inpaint_seeds_prompts_and_grow(pipes):
    pipe = pipes["plain"]
    image, mask = _picture(), _block_mask()
    both = editing.inpaint(pipe, [PROMPT, "a red car"], image, mask, seed=7, resolution=RES, output_type="tensor")
    assert both.seeds == [7, 8] and both.images.shape[0] == 2
    second = editing.inpaint(pipe, "a red car", image, mask, seed=8, resolution=RES, output_type="tensor")
    assert torch.equal(both.images[1], second[0])
    # a negative prompt replaces the null condition of the guidance: other samples, same forced bits
    negative = editing.inpaint(pipe, "a red car", image, mask, seed=8, negative_prompt="a blue sky", resolution=RES,
                               output_type="tensor")
    assert not torch.equal(negative.images[0], second[0])
    kept = negative.keep_masks[-1][0, :, 0]
    assert torch.equal(_token_bits(negative.bit_labels[0][-1], False)[kept],
                       _token_bits(negative.image_bit_labels[-1], False)[kept])
    grown = editing.inpaint(pipe, PROMPT, image, mask, seed=7, grow=1, resolution=RES, output_type="tensor")
    # grow=1: rows 1..6 / cols 0..5 of 8x8 and rows 0..5 / cols 0..4 of 6x6 regenerated, all of 4x4
    assert [int(k.sum()) for k in grown.keep_masks] == [0, 0, 0, 36 - 30, 64 - 36]


def test_inpaint_keep_scales_forces_coarse_scales_everywhere(pipes):
    pipe = pipes["plain"]
    out = editing.inpaint(pipe, PROMPT, _picture(), _block_mask(), seed=2, keep_scales=2, resolution=RES,
                          output_type="tensor")
    assert [int(k.sum()) for k in out.keep_masks] == [1, 4, 10, 24, 48]
    for k in range(2):
        assert torch.equal(out.bit_labels[0][k], out.image_bit_labels[k])


def test_inpaint_errors(pipes):
    pipe = pipes["plain"]
    image = _picture()
    with pytest.raises(ValueError, match=r"mask size 128x64 \(width x height\) differs from the image size 128x128"):
        editing.inpaint(pipe, PROMPT, image, np.ones((64, 128), bool), resolution=RES)
    with pytest.raises(ValueError, match="marks no pixel"):
        editing.inpaint(pipe, PROMPT, image, np.zeros((RES, RES), bool), resolution=RES)
    with pytest.raises(ValueError, match="covers every token of the last scale"):
        editing.inpaint(pipe, PROMPT, image, np.ones((RES, RES), bool), resolution=RES)
    # one masked pixel per 16 px cell is enough to regenerate every token
    sparse = np.zeros((RES, RES), bool)
    sparse[::16, ::16] = True
    with pytest.raises(ValueError, match=r"\(grow=0\) covers every token"):
        editing.inpaint(pipe, PROMPT, image, sparse, resolution=RES)
    with pytest.raises(ValueError, match=r"keep_scales 6 is out of range: this 5-scale schedule allows 0\.\.5"):
        editing.inpaint(pipe, PROMPT, image, _block_mask(), keep_scales=6, resolution=RES)
    with pytest.raises(ValueError, match="output_type"):
        editing.inpaint(pipe, PROMPT, image, _block_mask(), resolution=RES, output_type="jpeg")
    with pytest.raises(ValueError, match=r"tensor values must be in \[-1, 1\]"):
        editing.inpaint(pipe, PROMPT, torch.rand(3, RES, RES) * 255, _block_mask(), resolution=RES)


def test_mask_follows_the_image_resize(pipes):
    """A 192x256 image and its mask are resized to cover 128x128 and centre-cropped together."""
    pipe = pipes["plain"]
    image = _picture(256).crop((32, 0, 224, 256))  # 192 wide, 256 high -> 128x170, crop rows 21..148
    mask = np.zeros((256, 192), bool)
    # rows 100..139 -> 66..92 of the 170 resized rows (any overlap), minus the 21 cropped: 45..71;
    # cols 60..99 -> 40..66 of 128
    mask[100:140, 60:100] = True
    square = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]  # not the 3:4 template the ratio would pick
    out = editing.inpaint(pipe, PROMPT, image, mask, seed=0, resolution=square, output_type="tensor")
    assert out.images.shape == (1, 3, RES, RES)
    rows = torch.nonzero(out.pixel_mask.any(dim=1))[:, 0]
    cols = torch.nonzero(out.pixel_mask.any(dim=0))[:, 0]
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (45, 71, 40, 66)


# -- mask resampling -----------------------------------------------------------------------------
def _regenerated(keep: torch.Tensor, h: int, w: int):
    assert keep.shape == (1, h * w, 1) and keep.dtype == torch.bool
    return sorted(map(tuple, torch.nonzero(~keep.view(h, w)).tolist()))


def test_scale_masks_hand_computed():
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]
    mask = np.zeros((128, 128), bool)
    mask[16:24, 40:48] = True  # one 8x8 block
    keep = editing.scale_masks(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), schedule)
    # 6x6 cells: rows/cols floor(i*128/6) .. ceil((i+1)*128/6)-1 = 0..21, 21..42, 42..63, 64..85, ...
    assert _regenerated(keep[0], 1, 1) == [(0, 0)]
    assert _regenerated(keep[1], 2, 2) == [(0, 0)]
    assert _regenerated(keep[2], 4, 4) == [(0, 1)]
    assert _regenerated(keep[3], 6, 6) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert _regenerated(keep[4], 8, 8) == [(1, 2)]
    grown = editing.scale_masks(mask, schedule, grow=1)
    assert _regenerated(grown[1], 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert _regenerated(grown[2], 4, 4) == [(r, c) for r in (0, 1) for c in (0, 1, 2)]
    assert _regenerated(grown[3], 6, 6) == [(r, c) for r in (0, 1, 2) for c in (0, 1, 2, 3)]
    assert _regenerated(grown[4], 8, 8) == [(r, c) for r in (0, 1, 2) for c in (1, 2, 3)]
    # a block exactly on one 16 px cell regenerates only that cell; a mask at another pixel size
    # of the same grid (64 px, 8 px cells) gives the same cells
    aligned = np.zeros((128, 128), bool)
    aligned[32:48, 96:112] = True
    assert _regenerated(editing.scale_masks(aligned, schedule)[4], 8, 8) == [(2, 6)]
    small = torch.from_numpy(aligned[::2, ::2].copy())
    assert [torch.equal(a, b) for a, b in zip(editing.scale_masks(small, schedule),
                                              editing.scale_masks(aligned, schedule))] == [True] * 5


def test_scale_masks_errors():
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    with pytest.raises(ValueError, match=r"mask size 60x64 \(width x height\) is not a multiple of .* 4x4"):
        editing.scale_masks(np.zeros((64, 60), bool), schedule)
    with pytest.raises(ValueError, match="grow must be a whole number of tokens >= 0"):
        editing.scale_masks(np.zeros((64, 64), bool), schedule, grow=-1)
    with pytest.raises(ValueError, match=r"mask must be one channel \(H, W\)"):
        editing.scale_masks(np.zeros((64, 64, 3), bool), schedule)


# -- variations ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain", "patchify"])
def test_variations_keeping_every_scale_is_the_reconstruction(pipes, name):
    pipe = pipes[name]
    patchify = name == "patchify"
    image = _picture()
    out = editing.variations(pipe, image, keep_scales=5, resolution=RES, output_type="tensor")
    x = out.source
    assert torch.equal(x, images.pil_to_tensor(image)[None])
    summed, bits = pipe.tokenizer.quantize_multiscale(pipe.tokenizer.encode_raw(x), _vae_schedule(out.schedule, patchify))
    assert torch.equal(out.images, pipe.tokenizer.decode(summed))
    assert all(torch.equal(a, b) for a, b in zip(out.bit_labels[0], bits))
    pil = editing.variations(pipe, image, keep_scales=5, resolution=RES)
    np.testing.assert_array_equal(np.asarray(pil[0]), images_to_uint8(pipe.tokenizer.decode(summed))[0].numpy())


@pytest.mark.parametrize("name", ["plain", "patchify"])
def test_forcing_every_scale_through_the_sampler(pipes, name):
    """The sampler with every scale forced reproduces the quantizer's bits and codes exactly; its
    decoded image differs from the reconstruction only by the decoder input's memory layout."""
    pipe = pipes[name]
    patchify = name == "patchify"
    out = editing.variations(pipe, _picture(), keep_scales=5, resolution=RES, output_type="tensor")
    summed, bits = pipe.tokenizer.quantize_multiscale(pipe.tokenizer.encode_raw(out.source),
                                                      _vae_schedule(out.schedule, patchify))
    gen = generate(pipe.transformer, pipe.encode_prompt([PROMPT]), out.schedule, seed=0,
                   hooks=[ForceBits(bits, patchify=patchify)])
    assert all(torch.equal(a, b) for a, b in zip(gen.bit_labels, bits))
    assert torch.equal(gen.summed_codes, summed)
    assert not gen.summed_codes.is_contiguous() and summed.is_contiguous()
    assert torch.equal(pipe.tokenizer.decode(gen.summed_codes.contiguous()), out.images)
    assert (pipe.tokenizer.decode(gen.summed_codes) - out.images).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["plain", "patchify"])
def test_variations_keeping_nothing_is_plain_generation(pipes, name):
    pipe = pipes[name]
    out = editing.variations(pipe, _picture(), PROMPT, keep_scales=0, seed=11, resolution=RES, output_type="tensor")
    plain = pipe(PROMPT, seed=11, resolution=RES, output_type="tensor", return_bits=True)
    assert torch.equal(out.images, plain.images)
    pt = editing.variations(pipe, _picture(), PROMPT, keep_scales=0, seed=11, resolution=RES, output_type="pt")
    assert torch.equal(pt.images, (plain.images + 1) / 2)
    assert all(torch.equal(a, b) for a, b in zip(out.bit_labels[0], plain.bit_labels[0]))
    # and the image's bits were not used
    assert not torch.equal(out.bit_labels[0][-1], out.image_bit_labels[-1])


@pytest.mark.parametrize("name", ["plain", "patchify"])
def test_variations_keep_the_first_scales(pipes, name):
    pipe = pipes[name]
    res = editing.variations(pipe, _picture(), [PROMPT, PROMPT], keep_scales=3, seed=[5, 6], resolution=RES,
                             output_type="tensor")
    for labels in res.bit_labels:
        for k in range(3):
            assert torch.equal(labels[k], res.image_bit_labels[k])
        assert not torch.equal(labels[3], res.image_bit_labels[3])
    assert not torch.equal(res.bit_labels[0][4], res.bit_labels[1][4])  # different seeds, different detail
    with pytest.raises(ValueError, match=r"keep_scales 6 is out of range: this 5-scale schedule allows 0\.\.5"):
        editing.variations(pipe, _picture(), keep_scales=6, resolution=RES)
    with pytest.raises(ValueError, match="keep_scales -1 is out of range"):
        editing.variations(pipe, _picture(), keep_scales=-1, resolution=RES)


# -- outpainting ---------------------------------------------------------------------------------
def test_outpaint_to_a_wide_template(pipes):
    pipe = pipes["plain"]
    image = _picture(64)
    # template 0.5 at about 113 px: grids up to 5x10 tokens, a 80x160 canvas
    out = editing.outpaint(pipe, "a wide landscape", image, 0.5, resolution=113, seed=1, output_type="pil")
    assert out.images[0].size == (160, 80) and out.images[0].size[1] / out.images[0].size[0] == 0.5
    left, top, width, height = out.settings["box"]
    assert (left, top, width, height) == (32, 0, 80, 80)
    # the original covers token columns 2..6 of the last 5x10 grid: all of them kept and forced
    keep = out.keep_masks[-1].view(5, 10)
    expected = torch.zeros(5, 10, dtype=torch.bool)
    expected[:, 2:7] = True
    assert torch.equal(keep, expected)
    for k, (g, s, m) in enumerate(zip(out.bit_labels[0], out.image_bit_labels, out.keep_masks)):
        kept = m[0, :, 0]
        assert torch.equal(_token_bits(g, False)[kept], _token_bits(s, False)[kept])
    # the new area was generated
    assert (_token_bits(out.bit_labels[0][-1], False)[~keep.flatten()]
            != _token_bits(out.image_bit_labels[-1], False)[~keep.flatten()]).any()
    # the forced bits are the canvas's: the image itself in the box
    canvas = out.source[0]
    assert torch.equal(canvas[:, :, 32:112], images.pil_to_tensor(images.resize_cover_crop(image, 80, 80)))
    tall = editing.outpaint(pipe, "a tall tower", image, 2.0, anchor="bottom", resolution=113, seed=1,
                            output_type="np", blend=True)
    assert tall.images.shape == (1, 160, 80, 3) and tall.settings["box"] == (0, 80, 80, 80)
    np.testing.assert_array_equal(tall.images[0, 80:], np.asarray(images.resize_cover_crop(image, 80, 80)))


def test_outpaint_errors(pipes):
    pipe = pipes["plain"]
    with pytest.raises(ValueError, match=r"aspect_ratio 0\.9 \(height / width\) is not a template ratio; choose one of"):
        editing.outpaint(pipe, PROMPT, _picture(64), 0.9, resolution=RES)
    with pytest.raises(ValueError, match="already fills"):
        editing.outpaint(pipe, PROMPT, _picture(64), 1.0, resolution=RES)
    with pytest.raises(ValueError, match="anchor 'middle'"):
        editing.outpaint(pipe, PROMPT, _picture(64), 0.5, anchor="middle", resolution=113)
    assert editing.template_ratio(2 / 3) == 0.666


# -- from a folder and the command line ----------------------------------------------------------
def test_inpaint_from_pretrained_matches_the_pipeline(folders, pipes):
    direct = editing.inpaint(pipes["plain"], PROMPT, _picture(), _block_mask(), seed=9, resolution=RES, output_type="np")
    loaded = editing.inpaint_from_pretrained(folders["plain"], PROMPT, _picture(), _block_mask(), seed=9,
                                             resolution=RES, output_type="np")
    np.testing.assert_array_equal(direct.images, loaded.images)


def test_inpaint_command(folders, pipes, tmp_path, capsys):
    good, bad, mask = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "mask.png"
    _picture().save(good)
    bad.write_bytes(b"not an image")
    Image.fromarray(_block_mask().astype(np.uint8) * 255, mode="L").save(mask)
    out = tmp_path / "out"
    rc = main(["inpaint", "--pipeline", str(folders["plain"]), "--image", str(good), "--image", str(bad),
               "--mask", str(mask), "--prompt", PROMPT, "--seed", "3", "--resolution", str(RES), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["written"] == [str(out / "good.png")]
    assert [s["image"] for s in summary["skipped"]] == [str(bad)] and "cannot read image" in summary["skipped"][0]["error"]
    assert f"skipped {bad}" in captured.err
    expected = editing.inpaint(pipes["plain"], PROMPT, str(good), str(mask), seed=3, resolution=RES, output_type="np")
    np.testing.assert_array_equal(np.asarray(Image.open(out / "good.png")), expected[0])
    record = json.loads((out / "good.json").read_text())
    assert record["seed"] == 3 and record["mask"] == str(mask) and record["prompt"] == PROMPT
    # outputs are kept unless asked
    with pytest.raises(SystemExit, match="output file.* exist .*--overwrite"):
        main(["inpaint", "--pipeline", str(folders["plain"]), "--image", str(good), "--mask", str(mask),
              "--prompt", PROMPT, "--resolution", str(RES), "--out", str(out)])
    # outpainting into one file
    wide = tmp_path / "wide.png"
    assert main(["inpaint", "--pipeline", str(folders["plain"]), "--image", str(good), "--outpaint", "0.5",
                 "--prompt", PROMPT, "--resolution", "113", "--out", str(wide)]) == 0
    assert Image.open(wide).size == (160, 80)


@pytest.mark.parametrize("argv,message", [
    (["--grow", "-1"], "--grow must be >= 0, got -1"),
    (["--top-p", "1.5"], r"--top-p must be in \[0, 1\], got 1.5"),
    (["--outpaint", "0.9"], "give --mask MASK .* or --outpaint RATIO, not both or neither"),
    (["--feather", "3"], "--feather applies to --blend"),
])
def test_inpaint_command_rejects_bad_arguments(folders, tmp_path, argv, message):
    image, mask = tmp_path / "a.png", tmp_path / "m.png"
    _picture(64).save(image)
    Image.fromarray(_block_mask(64, (8, 24), (8, 24)).astype(np.uint8) * 255, mode="L").save(mask)
    with pytest.raises(SystemExit, match=message):
        main(["inpaint", "--pipeline", str(folders["plain"]), "--image", str(image), "--mask", str(mask),
              "--prompt", PROMPT, "--out", str(tmp_path / "o.png")] + argv)
    assert not (tmp_path / "o.png").exists()


def test_inpaint_command_names_missing_files(folders, tmp_path):
    mask = tmp_path / "m.png"
    Image.fromarray(_block_mask(64, (8, 24), (8, 24)).astype(np.uint8) * 255, mode="L").save(mask)
    missing = tmp_path / "missing.png"
    with pytest.raises(SystemExit, match=f"image file\\(s\\) not found: {missing}"):
        main(["inpaint", "--pipeline", str(folders["plain"]), "--image", str(missing), "--mask", str(mask),
              "--prompt", PROMPT, "--out", str(tmp_path / "o")])
    _picture(64).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match=f"mask file\\(s\\) not found: {tmp_path / 'nomask.png'}"):
        main(["inpaint", "--pipeline", str(folders["plain"]), "--image", str(tmp_path / "a.png"),
              "--mask", str(tmp_path / "nomask.png"), "--prompt", PROMPT, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--pipeline folder not found"):
        main(["inpaint", "--pipeline", str(tmp_path / "nowhere"), "--image", str(tmp_path / "a.png"),
              "--mask", str(mask), "--prompt", PROMPT, "--out", str(tmp_path / "o")])


def test_variations_command(folders, pipes, tmp_path, capsys):
    image = tmp_path / "photo.png"
    _picture().save(image)
    out = tmp_path / "var"
    rc = main(["variations", "--pipeline", str(folders["plain"]), "--image", str(image), "--keep-scales", "2",
               "--num-images", "2", "--seed", "4", "--resolution", str(RES), "--out", str(out)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == [
        str(out / "photo_0.png"), str(out / "photo_1.png")]
    expected = editing.variations(pipes["plain"], str(image), "", 2, seed=4, num_images_per_prompt=2, resolution=RES,
                                  output_type="np")
    for j in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"photo_{j}.png")), expected[j])
        assert json.loads((out / f"photo_{j}.json").read_text())["seed"] == 4 + j
    with pytest.raises(SystemExit, match=r"--keep-scales 9 is out of range: .* at most 5 scales \(0\.\.5\)"):
        main(["variations", "--pipeline", str(folders["plain"]), "--image", str(image), "--keep-scales", "9",
              "--resolution", str(RES), "--out", str(tmp_path / "v.png")])
