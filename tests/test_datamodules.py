"""Training and prediction DataModules: batch format, bucketing, splitting, bad data, caches."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infinity_lightning import scales
from infinity_lightning.datamodules import (
    DATAMODULES,
    ImageFolderDataModule,
    JsonlDataModule,
    PromptDataModule,
    ShapesDataModule,
    TextFeatureCache,
    TooManySkipsError,
    WebDatasetDataModule,
    build_datamodule,
    select_caption,
)
from infinity_lightning.datamodules.transforms import SkipSample, open_image, resize_and_crop
from infinity_lightning.datamodules.webdataset import expand_braces


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    _image(w, h, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_jsonl_data(root: Path, sizes, name: str = "1.000_000000010.jsonl"):
    """Images of the given (w, h) sizes and one jsonl file; caption i is 'caption i'."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (w, h) in enumerate(sizes):
        _image(w, h, i).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"image_path": f"img/{i}.png", "h_div_w": h / w, "long_caption": f"caption {i}",
                                 "text": ""}))
    (root / name).write_text("\n".join(lines) + "\n")
    return [f"caption {i}" for i in range(len(sizes))]


def _collect(dm):
    batches = list(dm.train_dataloader())
    return batches, [c for b in batches for c in b["captions"]]


# ------------------------------------------------------------------------------------------------
# transform
# ------------------------------------------------------------------------------------------------


def test_resize_and_crop_follows_cover_then_centre_crop():
    img = _image(300, 200)  # w/h = 1.5 > 64/64 -> height 64, width int(64 * 1.5) = 96
    out = resize_and_crop(img, 64, 64)
    assert out.size == (64, 64)
    ref = img.resize((96, 64), Image.LANCZOS).crop((16, 0, 80, 64))  # offset (96 - 64) // 2
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    tall = resize_and_crop(_image(100, 301), 32, 64)  # taller than target: width 64, height int(64*3.01)
    ref = _image(100, 301).resize((64, 192), Image.LANCZOS).crop((0, 80, 64, 112))
    assert np.array_equal(np.asarray(tall), np.asarray(ref))


# ------------------------------------------------------------------------------------------------
# batches, buckets
# ------------------------------------------------------------------------------------------------


def test_jsonl_batches_have_one_template_and_the_pixel_size_of_it(tmp_path):
    sizes = [(64, 64)] * 4 + [(96, 48)] * 4 + [(40, 80)] * 4  # h/w 1.0, 0.5, 2.0
    _write_jsonl_data(tmp_path, sizes)
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, pn="0.06M", seed=3, max_skip_fraction=0.0)
    batches, captions = _collect(dm)
    assert len(batches) == 6 == len(dm.train_dataloader())
    ratio_of = {f"caption {i}": h / w for i, (w, h) in enumerate(sizes)}
    seen = set()
    for b in batches:
        t = b["h_div_w_template"]
        assert t in scales.TEMPLATE_RATIOS
        H, W = scales.resolve("0.06M", t).pixel_size()
        assert b["images"].shape == (2, 3, H, W) and b["images"].dtype == torch.float32
        assert -1.0 <= float(b["images"].min()) and float(b["images"].max()) <= 1.0
        assert float(b["images"].max()) > 0.9  # random pixels span the range
        assert all(scales.nearest_template(ratio_of[c]) == t for c in b["captions"])
        seen.add(t)
    assert seen == {1.0, 0.5, 2.0}
    assert sorted(captions) == sorted(ratio_of)


def test_image_size_overrides_pn_with_square_batches(tmp_path):
    _write_jsonl_data(tmp_path, [(64, 64)] * 2 + [(96, 48)] * 2)
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=4, image_size=32)
    (b,) = list(dm.train_dataloader())
    assert b["images"].shape == (4, 3, 32, 32) and b["h_div_w_template"] == 1.0


def test_h_div_w_templates_restricts_buckets(tmp_path):
    _write_jsonl_data(tmp_path, [(64, 64)] * 2 + [(96, 48)] * 2)
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, h_div_w_templates=[1.0, 0.666])
    templates = sorted(b["h_div_w_template"] for b in dm.train_dataloader())
    assert templates == [0.666, 1.0]  # h/w 0.5 went to the nearest allowed template
    with pytest.raises(ValueError, match="not an aspect-ratio template"):
        JsonlDataModule(data_dir=tmp_path, h_div_w_templates=[0.9])


# ------------------------------------------------------------------------------------------------
# ranks x workers, epochs, drop_last
# ------------------------------------------------------------------------------------------------


def test_two_ranks_two_workers_cover_every_record_exactly_once(tmp_path):
    sizes = [(64, 64)] * 9 + [(96, 48)] * 6 + [(40, 80)] * 4
    expected = _write_jsonl_data(tmp_path, sizes)
    got = []
    lengths = []
    for rank in (0, 1):
        dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=16, num_workers=2, rank=rank,
                             world_size=2, drop_last=False, seed=5)
        batches, caps = _collect(dm)
        assert len(batches) == len(dm.train_dataloader())
        lengths.append(len(batches))
        got += caps
    assert sorted(got) == sorted(expected)  # no duplicates, no gaps
    assert sum(lengths) == 5 + 3 + 2 and abs(lengths[0] - lengths[1]) <= 1


def test_drop_last_gives_equal_steps_per_rank_without_duplicates(tmp_path):
    sizes = [(64, 64)] * 9 + [(96, 48)] * 5
    _write_jsonl_data(tmp_path, sizes)
    per_rank = []
    for rank in (0, 1):
        dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=16, num_workers=2, rank=rank,
                             world_size=2, drop_last=True)
        batches, caps = _collect(dm)
        assert all(len(b["captions"]) == 2 for b in batches)
        per_rank.append(caps)
    # 4 + 2 full batches, cut to a multiple of the world size: 3 steps per rank.
    assert [len(c) for c in per_rank] == [6, 6]
    both = per_rank[0] + per_rank[1]
    assert len(set(both)) == len(both)


def test_epochs_are_deterministic_and_independent_of_worker_count(tmp_path):
    _write_jsonl_data(tmp_path, [(64, 64)] * 12)

    def order(num_workers, epoch=None):
        dm = JsonlDataModule(data_dir=tmp_path, batch_size=3, image_size=16, num_workers=num_workers, seed=1)
        if epoch is not None:
            dm.set_epoch(epoch)
        return _collect(dm)[1]

    e0 = order(0)
    assert e0 == order(0, epoch=0)
    assert sorted(e0) == sorted(order(2))  # same records; workers interleave batches
    e1 = order(0, epoch=1)
    assert e1 != e0 and sorted(e1) == sorted(e0)
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=3, image_size=16, seed=1)
    loader = dm.train_dataloader()
    first = [c for b in loader for c in b["captions"]]
    second = [c for b in loader for c in b["captions"]]  # a second pass is the next epoch
    assert first == e0 and second == e1
    assert dm.state_dict() == {"epoch": 1}


def test_same_record_gets_the_same_tensor_in_every_layout(tmp_path):
    _write_jsonl_data(tmp_path, [(70, 50)] * 4)
    a = {c: img for b in JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=32).train_dataloader()
         for c, img in zip(b["captions"], b["images"])}
    b_ = {c: img for b in JsonlDataModule(data_dir=tmp_path, batch_size=1, image_size=32,
                                          num_workers=2).train_dataloader()
          for c, img in zip(b["captions"], b["images"])}
    assert a.keys() == b_.keys() and all(torch.equal(a[k], b_[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# jsonl layout
# ------------------------------------------------------------------------------------------------


def test_jsonl_file_name_count_need_not_match(tmp_path, caplog):
    expected = _write_jsonl_data(tmp_path, [(64, 64)] * 6, name="1.000_000002500.jsonl")
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=16, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="infinity_lightning.datamodules"):
        _, caps = _collect(dm)
    assert sorted(caps) == sorted(expected)
    assert any("says 2500 records but the file has 6 lines" in r.getMessage() for r in caplog.records)


def test_jsonl_record_is_bucketed_by_its_own_ratio(tmp_path):
    _write_jsonl_data(tmp_path, [(64, 64), (64, 64), (96, 48), (96, 48)])  # all in 1.000_*.jsonl
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, pn="0.06M")
    by_template = {b["h_div_w_template"]: sorted(b["captions"]) for b in dm.train_dataloader()}
    assert by_template == {1.0: ["caption 0", "caption 1"], 0.5: ["caption 2", "caption 3"]}


def test_caption_selection_rules():
    rng = np.random.default_rng(0)
    assert select_caption("long one. two.", "short", rng, short_caption_prob=1.0) == "short"
    assert select_caption("long one. two.", "short", rng, short_caption_prob=0.0) == "long one. two."
    assert select_caption("long --ar 3:2", "", rng) == "long "
    assert select_caption("--only", "", rng) == "--only"
    five = "A cat. It sits. On a mat. In the sun. Happily."
    seen = Counter(select_caption(five, "", np.random.default_rng(i), dynamic_length=True,
                                  long_caption_type="caption-InternVL2.0") for i in range(200))
    # n_short = 2 (first sentence is short): m uniform in [3, 5] sentences, never fewer.
    assert set(seen) == {"A cat. It sits. On a mat", "A cat. It sits. On a mat. In the sun",
                         "A cat. It sits. On a mat. In the sun. Happily"}
    short = select_caption(five, "", np.random.default_rng(0), short_caption_prob=1.0, dynamic_length=True,
                           long_caption_type="caption")
    assert short == "A cat. It sits"  # empty text -> the first n_short sentences
    # user prompts are never cut
    assert select_caption(five, "", rng, dynamic_length=True, long_caption_type="user_prompt") == five


def test_short_caption_prob_reaches_the_batches(tmp_path):
    (tmp_path / "a.png").parent.mkdir(exist_ok=True)
    _image(32, 32).save(tmp_path / "a.png")
    rec = {"image_path": "a.png", "h_div_w": 1.0, "long_caption": "a long caption", "text": "short"}
    (tmp_path / "1.000_4.jsonl").write_text("\n".join(json.dumps(rec) for _ in range(4)))
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=4, image_size=16, short_caption_prob=1.0)
    assert next(iter(dm.train_dataloader()))["captions"] == ["short"] * 4


# ------------------------------------------------------------------------------------------------
# bad data
# ------------------------------------------------------------------------------------------------


def _bad_jsonl_dataset(root: Path, n_good: int = 8):
    img = root / "img"
    img.mkdir(parents=True)
    lines = []

    def rec(path, caption="ok", **extra):
        d = {"image_path": path, "h_div_w": 1.0, "long_caption": caption}
        d.update(extra)
        return json.dumps(d).encode()

    for i in range(n_good):
        _image(32, 32, i).save(img / f"good{i}.png")
        lines.append(rec(f"img/good{i}.png", f"good {i}"))
    jpeg = _jpeg_bytes(64, 64)
    (img / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (img / "zero.jpg").write_bytes(b"")
    (img / "text.png").write_text("this is not an image")
    Image.new("RGB", (200, 200), "red").save(img / "huge.png")
    lines += [
        rec("img/truncated.jpg"),
        rec("img/zero.jpg"),
        rec("img/text.png"),
        rec("img/huge.png"),
        rec("img/missing.png"),
        json.dumps({"image_path": "img/good0.png", "h_div_w": 1.0}).encode(),  # no caption
        rec("img/good1.png", caption="  "),  # empty caption
        b'{"image_path": "img/good2.png", "h_div_w": 1.0, "long_caption": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"image_path": "img/good3.png", "h_div_w": 1.0, "long_caption": ',  # malformed
    ]
    (root / "1.000_000000017.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def test_each_kind_of_bad_record_is_skipped_counted_and_logged(tmp_path, caplog):
    _bad_jsonl_dataset(tmp_path)
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=4, image_size=16, drop_last=False, max_skip_fraction=None,
                         max_image_pixels=100 * 100)
    with caplog.at_level(logging.WARNING, logger="infinity_lightning.datamodules"):
        batches, caps = _collect(dm)
    summary = dm.skip_summary()
    assert summary["reasons"] == {"corrupt_image": 1, "empty_file": 1, "not_an_image": 1, "too_large": 1,
                                  "missing_file": 1, "missing_caption": 1, "empty_caption": 1}
    assert summary["index_reasons"] == {"bad_encoding": 1, "malformed_line": 1}
    assert summary["skipped"] == 7 and summary["attempted"] == sum(len(b["captions"]) for b in batches) + 7
    assert {c for c in caps} == {f"good {i}" for i in range(8)}  # every good record, bad ones replaced
    messages = " ".join(r.getMessage() for r in caplog.records)
    for name in ("truncated.jpg", "zero.jpg", "text.png", "huge.png", "missing.png", ":17", ":16"):
        assert name in messages
    assert "skipped 7 of" in messages  # epoch summary


def test_pil_decompression_bomb_guard_is_a_counted_skip(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "warn.png")  # 1600 px: PIL warns (> limit, < 2 x limit)
    Image.new("RGB", (100, 100)).save(tmp_path / "error.png")  # 10000 px: PIL raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("warn.png", "error.png"):
        with pytest.raises(SkipSample) as e:
            open_image(tmp_path / name)
        assert e.value.reason == "too_large"


def test_too_many_skips_is_a_clear_error(tmp_path):
    _write_jsonl_data(tmp_path, [(32, 32)] * 4)
    lines = (tmp_path / "1.000_000000010.jsonl").read_text()
    for i in range(4):
        (tmp_path / "img" / f"z{i}.png").write_bytes(b"")
        lines += json.dumps({"image_path": f"img/z{i}.png", "h_div_w": 1.0, "long_caption": "x"}) + "\n"
    (tmp_path / "1.000_000000010.jsonl").write_text(lines)
    for kwargs in ({"max_skip_fraction": 0.1}, {"max_skips": 2, "max_skip_fraction": None},
                   {"max_skip_fraction": 0.1, "num_workers": 2}):
        dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=16, drop_last=False, **kwargs)
        with pytest.raises(TooManySkipsError, match="empty_file"):
            _collect(dm)
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=16, drop_last=False, max_skip_fraction=0.6)
    _collect(dm)
    assert dm.skip_summary()["reasons"] == {"empty_file": 4}
    # Unusable lines are checked while indexing.
    (tmp_path / "1.000_000000010.jsonl").write_text("{not json\n" * 5 + lines)
    with pytest.raises(TooManySkipsError, match="malformed_line"):
        JsonlDataModule(data_dir=tmp_path, batch_size=2, max_skip_fraction=0.2).setup()


def test_all_bad_data_never_hangs(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "z.png").write_bytes(b"")
    rec = json.dumps({"image_path": "img/z.png", "h_div_w": 1.0, "long_caption": "x"})
    (tmp_path / "1.000_000000001.jsonl").write_text((rec + "\n") * 6)
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=16, max_skip_fraction=None)
    batches, _ = _collect(dm)
    assert batches == [] and dm.skip_summary()["reasons"] == {"empty_file": 6}


# ------------------------------------------------------------------------------------------------
# image folder
# ------------------------------------------------------------------------------------------------


def test_image_folder_with_sidecar_txt_and_recursion(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for i, rel in enumerate(["a.png", "sub/b.jpg", "sub/deeper/c.webp"]):
        _image(48, 32, i).save(tmp_path / rel)
        (tmp_path / rel).with_suffix(".txt").write_text(f"picture {i}\n")
    _image(32, 32).save(tmp_path / "nocaption.png")
    _image(32, 32).save(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    dm = ImageFolderDataModule(data_dir=tmp_path, batch_size=1, image_size=16, drop_last=False,
                               max_skip_fraction=None)
    _, caps = _collect(dm)
    assert set(caps) == {"picture 0", "picture 1", "picture 2"}  # the bad one may be replaced by a good one
    summary = dm.skip_summary()
    assert summary["index_reasons"] == {"missing_caption": 1}
    assert summary["reasons"] == {"bad_encoding": 1}


def test_image_folder_with_captions_jsonl(tmp_path):
    (tmp_path / "x").mkdir()
    _image(64, 32, 0).save(tmp_path / "x" / "wide.png")
    _image(32, 64, 1).save(tmp_path / "tall.png")
    _image(32, 32, 2).save(tmp_path / "emptycap.png")
    lines = [{"file": "x/wide.png", "caption": "a wide picture"}, {"file": "tall.png", "caption": "a tall one"},
             {"file": "emptycap.png", "caption": ""}, {"file": "gone.png", "caption": "missing"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(d) for d in lines) + "\nnot json\n")
    dm = ImageFolderDataModule(data_dir=tmp_path, batch_size=1, pn="0.06M", max_skip_fraction=None)
    got = {b["captions"][0]: b["h_div_w_template"] for b in dm.train_dataloader()}
    assert got == {"a wide picture": 0.5, "a tall one": 2.0}
    assert dm.skip_summary()["index_reasons"] == {"empty_caption": 1, "missing_file": 1, "malformed_line": 1}


# ------------------------------------------------------------------------------------------------
# webdataset
# ------------------------------------------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, start: int, n: int, sizes=((32, 32),)) -> list:
    caps = []
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            w, h = sizes[i % len(sizes)]
            _add(tf, f"s{i:05d}.jpg", _jpeg_bytes(w, h, i))
            if i % 2:
                _add(tf, f"s{i:05d}.txt", f"sample {i}".encode())
            else:
                _add(tf, f"s{i:05d}.json", json.dumps({"caption": f"sample {i}"}).encode())
            caps.append(f"sample {i}")
    return caps


def test_webdataset_shards_split_over_ranks_and_workers(tmp_path):
    expected = []
    for s in range(4):
        expected += _write_shard(tmp_path / f"shard-{s:03d}.tar", 5 * s, 5, sizes=((32, 32), (64, 32)))
    got = []
    for rank in (0, 1):
        dm = WebDatasetDataModule(shards=str(tmp_path / "shard-{000..003}.tar"), batch_size=2, pn="0.06M",
                                  num_workers=2, rank=rank, world_size=2, drop_last=False, seed=2)
        for b in dm.train_dataloader():
            H, W = scales.resolve("0.06M", b["h_div_w_template"]).pixel_size()
            assert b["images"].shape[1:] == (3, H, W)
            got += b["captions"]
    assert sorted(got) == sorted(expected)


def test_webdataset_truncated_shard_and_bad_samples_are_skipped(tmp_path):
    good = _write_shard(tmp_path / "a.tar", 0, 6)
    _write_shard(tmp_path / "full.tar", 100, 6)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "full.tar").unlink()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])  # cut inside a member
    with tarfile.open(tmp_path / "c.tar", "w") as tf:
        _add(tf, "x1.jpg", _jpeg_bytes(32, 32))  # no caption
        _add(tf, "x2.jpg", _jpeg_bytes(32, 32))
        _add(tf, "x2.txt", "caf\xe9".encode("latin-1"))
        _add(tf, "x3.jpg", b"garbage")
        _add(tf, "x3.txt", b"broken image")
        _add(tf, "x4.txt", b"no image")
    dm = WebDatasetDataModule(shards=tmp_path, batch_size=2, image_size=16, drop_last=False, max_skip_fraction=None)
    _, caps = _collect(dm)
    from_b = [c for c in caps if c not in good]
    assert set(good) <= set(caps) and 1 <= len(from_b) < 6  # samples before the cut are kept
    assert dm.skip_summary()["reasons"] == {"truncated_shard": 1, "missing_caption": 1, "bad_encoding": 1,
                                            "not_an_image": 1, "incomplete_sample": 1}


def test_webdataset_batches_per_epoch_fixes_the_length(tmp_path):
    for s in range(2):
        _write_shard(tmp_path / f"{s}.tar", 3 * s, 3)
    dm = WebDatasetDataModule(shards=str(tmp_path / "*.tar"), batch_size=2, image_size=16, batches_per_epoch=5,
                              num_workers=2, rank=1, world_size=2)
    loader = dm.train_dataloader()
    assert len(loader) == 5 and len(list(loader)) == 5  # fewer shards than workers: cycles
    assert expand_braces("d/{0..2}-{a,b}.tar")[:3] == ["d/0-a.tar", "d/0-b.tar", "d/1-a.tar"]


# ------------------------------------------------------------------------------------------------
# text-feature cache
# ------------------------------------------------------------------------------------------------


class _CountingEncoder:
    def __init__(self):
        self.calls = 0
        self.captions = 0

    def __call__(self, captions):
        self.calls += 1
        self.captions += len(captions)
        return [torch.full((len(c.split()), 4), float(len(c))) for c in captions]


def test_text_feature_cache_hits_and_misses(tmp_path):
    data = tmp_path / "data"
    expected = _write_jsonl_data(data, [(32, 32)] * 6)
    enc = _CountingEncoder()
    cache = tmp_path / "cache"
    dm = JsonlDataModule(data_dir=data, batch_size=3, image_size=16, text_encoder=enc, text_cache_dir=cache)
    batches, caps = _collect(dm)
    assert enc.captions == 6 and enc.calls == 2  # one call per batch, every caption a miss
    for b in batches:
        for c, f in zip(b["captions"], b["text_features"]):
            assert f.shape == (len(c.split()), 4) and float(f[0, 0]) == len(c)
    assert len(list(cache.rglob("*.pt"))) == 6
    # A new run (next epoch, new module) hits the cache: the encoder is not called again.
    dm2 = JsonlDataModule(data_dir=data, batch_size=3, image_size=16, text_encoder=enc, text_cache_dir=cache)
    batches2, _ = _collect(dm2)
    assert enc.captions == 6 and all("text_features" in b for b in batches2)
    # Without an encoder the cache alone serves the features; a corrupt entry is recomputed.
    hit = TextFeatureCache(cache).get(expected[:2])
    assert [float(t[0, 0]) for t in hit] == [len(expected[0]), len(expected[1])]
    TextFeatureCache(cache).path(expected[0]).write_bytes(b"garbage")
    c = TextFeatureCache(cache, enc)
    c.get(expected[:2])
    assert (c.hits, c.misses, enc.captions) == (1, 1, 7)
    with pytest.raises(FileNotFoundError, match="no text_encoder"):
        TextFeatureCache(cache).get(["never seen"])


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


def test_prompt_datamodule_splits_ranks_without_duplicates(tmp_path):
    prompts = [f"prompt {i}" for i in range(7)]
    seen = []
    for rank in range(3):
        dm = PromptDataModule(prompts=prompts, batch_size=2, seed=100, rank=rank, world_size=3, num_workers=2)
        for b in dm.predict_dataloader():
            assert all(i % 3 == rank for i in b["indices"])
            assert b["seeds"] == [100 + i for i in b["indices"]]
            assert b["prompts"] == [prompts[i] for i in b["indices"]]
            seen += b["indices"]
    assert sorted(seen) == list(range(7))


def test_prompt_files_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  \na dog\n")
    dm = PromptDataModule(prompts=tmp_path / "p.txt", batch_size=4, h_div_w=0.5)
    (b,) = list(dm.predict_dataloader())
    assert b["prompts"] == ["a cat", "a dog"] and b["h_div_w"] == [0.5, 0.5] and b["seeds"] == [0, 1]
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "x", "seed": 42, "negative_prompt": "blur", "h_div_w": 2.0}) + "\n\n"
        + json.dumps({"prompt": "y"}) + "\n")
    (b,) = list(PromptDataModule(prompts=str(tmp_path / "p.jsonl"), batch_size=2, seed=7).predict_dataloader())
    assert b["seeds"] == [42, 8] and b["negative_prompts"] == ["blur", ""] and b["h_div_w"] == [2.0, 1.0]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "sed": 1}) + "\n")
    with pytest.raises(ValueError, match="unknown keys \\['sed'\\]"):
        PromptDataModule(prompts=tmp_path / "bad.jsonl").setup()


# ------------------------------------------------------------------------------------------------
# registry, Lightning
# ------------------------------------------------------------------------------------------------


def test_registry_names_and_errors():
    assert {"shapes", "jsonl", "webdataset", "folder", "emoji", "prompts"} <= set(DATAMODULES)
    dm = build_datamodule("shapes", batch_size=4, num_samples=8, image_size=32, seed=1)
    assert isinstance(dm, ShapesDataModule) and dm.batch_size == 4
    with pytest.raises(ValueError, match=r"unknown datamodule 'shape'.*'jsonl'"):
        build_datamodule("shape")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['batchsize'\].*'batch_size'"):
        build_datamodule("jsonl", data_dir="x", batchsize=2)


def test_trainer_fit_sets_epochs_and_logs_skips(tmp_path):
    import lightning as L

    from infinity_lightning.datamodules import DataModuleMonitor

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            assert set(batch) == {"images", "captions", "h_div_w_template"}
            self.seen.append((self.current_epoch, tuple(batch["captions"])))
            return (self.w * batch["images"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    _write_jsonl_data(tmp_path, [(32, 32)] * 8)
    (tmp_path / "img" / "0.png").write_bytes(b"")
    dm = JsonlDataModule(data_dir=tmp_path, batch_size=2, image_size=16, max_skip_fraction=0.5)
    module = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[DataModuleMonitor()],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    e0 = [c for e, c in module.seen if e == 0]
    e1 = [c for e, c in module.seen if e == 1]
    assert len(e0) == len(e1) == 4 and e0 != e1
    assert trainer.callback_metrics["data/skipped_empty_file"] == 1.0
