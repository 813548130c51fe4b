"""Scale schedules against the tables of the specification (Appendix A)."""
import pytest

from infinity_lightning import scales

# template: (0.06M, 0.25M, 0.60M, 1M) as (H, W, L) from the specification's Appendix A
APPENDIX_A = {
    3.0: [(432, 144, 509), (864, 288, 2588), (1440, 480, 7016), (1776, 592, 11123)],
    2.5: [(400, 160, 555), (800, 320, 2555), (1280, 512, 6805), (1600, 640, 10805)],
    2.0: [(352, 176, 451), (736, 368, 2681), (1184, 592, 7219), (1440, 720, 11269)],
    1.75: [(336, 192, 472), (672, 384, 2628), (1120, 640, 7220), (1344, 768, 11252)],
    1.5: [(336, 224, 533), (624, 416, 2759), (1008, 672, 6941), (1248, 832, 10997)],
    1.333: [(320, 240, 665), (576, 432, 2657), (960, 720, 7085), (1152, 864, 10973)],
    1.25: [(320, 256, 614), (560, 448, 2814), (880, 704, 6854), (1120, 896, 10774)],
    1.0: [(256, 256, 521), (512, 512, 2521), (768, 768, 6425), (1024, 1024, 10521)],
    0.8: [(256, 320, 614), (448, 560, 2814), (704, 880, 6854), (896, 1120, 10774)],
    0.75: [(240, 320, 665), (432, 576, 2657), (720, 960, 7085), (864, 1152, 10973)],
    0.666: [(224, 336, 533), (416, 624, 2759), (672, 1008, 6941), (832, 1248, 10997)],
    0.571: [(192, 336, 472), (384, 672, 2628), (640, 1120, 7220), (768, 1344, 11252)],
    0.5: [(176, 352, 451), (368, 736, 2681), (592, 1184, 7219), (720, 1440, 11269)],
    0.4: [(160, 400, 555), (320, 800, 2555), (512, 1280, 6805), (640, 1600, 10805)],
    0.333: [(144, 432, 509), (288, 864, 2588), (480, 1440, 7016), (592, 1776, 11123)],
}


@pytest.mark.parametrize("template", sorted(APPENDIX_A))
def test_pixel_sizes_and_lengths_match_appendix_a(template):
    for pn, (H, W, L) in zip(["0.06M", "0.25M", "0.60M", "1M"], APPENDIX_A[template]):
        sched = scales.resolve(pn, template)
        assert sched.template == template
        assert sched.pixel_size() == (H, W)
        assert sched.num_tokens == L == sum(sched.sizes)
        assert all(t == 1 for t, _, _ in sched)


def test_template_order_and_1m_square_schedule():
    assert scales.TEMPLATE_RATIOS == [1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4,
                                      3.0, 0.333]
    assert [h for _, h, _ in scales.resolve("1M", 1.0)] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert scales.resolve("1M", 2.0)[-1] == (1, 90, 45)
    assert scales.resolve("1M", 0.5)[-1] == (1, 45, 90)


def test_nearest_template_and_errors():
    assert scales.nearest_template(1.02) == 1.0
    assert scales.nearest_template(0.52) == 0.5
    assert scales.nearest_template(10.0) == 3.0
    assert scales.nearest_template(1.125) == 1.0       # tie between 1.0 and 1.25: the first wins
    assert scales.resolve("0.06M", 1.4).pixel_size() == (320, 240)   # nearest is 1.333
    with pytest.raises(ValueError, match="pixel budget"):
        scales.check_budget("2M")
    with pytest.raises(ValueError, match="expected one of"):
        scales.resolve("2M", 1.0)
    with pytest.raises(ValueError, match="positive"):
        scales.nearest_template(0)
    with pytest.raises(ValueError, match="not a prefix of template"):
        scales.ScaleSchedule([(1, 1), (3, 3)], template=1.0)


def test_tokenizer_schedules_with_and_without_patchify():
    sched = scales.resolve("0.06M", 1.0)
    assert sched.tokenizer_side == sched
    assert sched.with_patchify(True).tokenizer_side[-1] == (1, 32, 32)
    assert scales.resolve("0.06M", 1.0, patchify=True).tokenizer_side[1] == (1, 4, 4)
    assert sched.with_patchify(True).grids == sched.grids            # the token side is unchanged


def test_offsets_and_template_of_schedule():
    sched = scales.resolve("0.06M", 1.0)
    assert sched.offsets == (0, 1, 5, 21, 57, 121, 265, 521)
    assert sched[:5].template == 1.0 and sched[:5] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]
    assert scales.as_schedule([(1, 1, 1), (1, 2, 2), (1, 4, 4)]).template == 1.0
    assert scales.resolve("0.25M", 0.5).template == 0.5
    assert scales.as_schedule([(1, 1, 1), (1, 3, 3)]).template is None         # a custom schedule
    with pytest.raises(ValueError, match="not a prefix"):
        scales.resolve([(1, 1, 1), (1, 3, 3)])


def test_latent_schedules_for_tokenizer_evaluation():
    assert [h for _, h, _ in scales.latent_schedule(16, 16, "dynamic")] == [1, 2, 4, 6, 8, 12, 16]
    assert len(scales.latent_schedule(32, 32, "dynamic")) == 10
    assert len(scales.latent_schedule(64, 64, "dynamic")) == 13
    assert [h for _, h, _ in scales.latent_schedule(16, 16, "dense")] == list(range(1, 17))
    assert [h for _, h, _ in scales.latent_schedule(32, 32, "dense")][-5:] == [16, 20, 24, 28, 32]
    assert scales.latent_schedule(5, 7, "single") == [(1, 5, 7)]
    with pytest.raises(ValueError, match="no dynamic schedule"):
        scales.latent_schedule(17, 17, "dynamic")


def test_full_table():
    for ratio in scales.TEMPLATE_RATIOS:
        for pn, steps in scales.PIXEL_BUDGETS.items():
            assert len(scales.resolve(pn, ratio)) == steps
    assert scales.resolve("1M", 1.0).pixel_size() == (1024, 1024)
    assert len(scales.resolve("0.60M", 3.0)) == 12


def test_resolution_names():
    assert len(scales.resolve("1M", 1.0)) == 13 and scales.resolve(1024, 1.0)[-1] == (1, 64, 64)
    assert scales.resolve("0.25M", 1.0)[-1] == (1, 32, 32) and scales.resolve("512px", 1.0) == \
        scales.resolve("0.25M", 1.0)
    assert scales.resolve("0.06M", 0.5).pixel_size() == (176, 352) and scales.resolve("0.06M", 0.52).template == 0.5
    with pytest.raises(ValueError, match="expected one of"):
        scales.resolve("big", 1.0)


def test_resolution_and_aspect_ratio_outside_the_templates():
    assert scales.resolve("0.06M", 1.0)[-1] == (1, 16, 16)
    assert scales.resolve(256, 2.0)[-1][1] > scales.resolve(256, 2.0)[-1][2]
    with pytest.raises(ValueError, match="outside the templates"):
        scales.resolve("1M", 10.0)
    with pytest.raises(ValueError, match="outside the templates"):
        scales.resolve(256, 0.1)
    with pytest.raises(ValueError, match="larger than the largest schedule"):
        scales.resolve(4096, 1.0)
    assert scales.resolve(64, 1.0, token_stride=8)[-1] == (1, 8, 8)      # a stride-8 tokenizer: 8x8 tokens
    assert scales.resolve(64, 1.0)[-1] == (1, 4, 4)
    with pytest.warns(UserWarning, match="not a schedule size"):
        assert scales.resolve(700, 1.0)[-1] == (1, 40, 40)


def test_template_latent_schedule_and_patchify():
    assert scales.latent_schedule(8, 8, "template") == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]
    assert scales.latent_schedule(8, 8, "template").template == 1.0
    assert scales.latent_schedule(16, 8, "template").template == 2.0     # 2:1 grids are in the 2.0 table
    with pytest.raises(ValueError, match="no aspect-ratio template has the grid 7x7"):
        scales.latent_schedule(7, 7, "template")
    with pytest.raises(ValueError, match="unknown schedule mode"):
        scales.latent_schedule(8, 8, "fancy")
    # a stride-8 patchify tokenizer: a 32x32 latent grid is a 16x16 token grid
    patch = scales.latent_schedule(32, 32, "dynamic", patchify=True)
    assert patch.last_grid == (16, 16) and patch.tokenizer_side[-1] == (1, 32, 32) and len(patch) == 7


def test_schedule_object_is_immutable_hashable_and_round_trips():
    import pickle

    sched = scales.resolve("0.25M", 0.75, patchify=True)
    with pytest.raises(AttributeError, match="immutable"):
        sched.template = 1.0
    assert pickle.loads(pickle.dumps(sched)) == sched
    assert {sched: 1}[scales.resolve("0.25M", 0.75, patchify=True)] == 1
    assert scales.ScaleSchedule.from_dict(sched.to_dict()) == sched
    assert sched != scales.resolve("0.25M", 0.75)                       # patchify is part of the identity
    assert scales.resolve(sched) is not None and scales.resolve(sched, patchify=False).patchify is False
    with pytest.raises(ValueError, match="pipeline.json"):
        scales.ScaleSchedule.from_dict({"grids": [[1, 1], [3, 3]], "template": 1.0}, "pipeline.json")
    with pytest.raises(ValueError, match=r"\(h, w\) or \(1, h, w\)"):
        scales.as_schedule([(1, 2, 3, 4)])
    assert scales.resolve("0.06M", 1.0) is scales.resolve("0.06M", 1.0)   # built once, then cached
