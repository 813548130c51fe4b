"""SelfCorrectionSchedule, EMA and SampleLogger on a tiny LightningModule, CPU, a few steps each."""
from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from infinity_lightning.callbacks import EMA, SampleLogger, SelfCorrectionSchedule, make_grid


def _data(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


class Tiny(LightningModule):
    """A linear "transformer" next to a frozen layer; records what the steps see."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.transformer = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)
        self.seen_train = []  # (global_step, bsc_strength, bsc_layers)
        self.seen_val = []  # transformer weight seen by validation_step
        self.image_calls = []

    def training_step(self, batch, batch_idx):
        self.seen_train.append((self.trainer.global_step, getattr(self, "bsc_strength", None),
                                getattr(self, "bsc_layers", None)))
        x, y = batch
        return ((self.frozen(self.transformer(x)) - y) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen_val.append(self.transformer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.2)

    def log_images(self, prompts, seeds, scale=1.0):
        self.image_calls.append((self.trainer.global_step, list(prompts), list(seeds), self.training))
        images = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) * scale for s in seeds]
        return {"samples": torch.stack(images)}


def _trainer(tmp_path: Path, max_steps: int, callbacks, **kw) -> Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw)


class WeightRecorder(Callback):
    """Weights after every optimizer step (the same values EMA sees at batch end)."""

    def __init__(self):
        self.weights = {}

    def on_fit_start(self, trainer, pl_module):
        self.weights.setdefault(trainer.global_step, pl_module.transformer.weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = pl_module.transformer.weight.detach().clone()


# -- SelfCorrectionSchedule ---------------------------------------------------------------------
def test_schedule_values_each_mode():
    const = SelfCorrectionSchedule(strength=0.3, layers=13)
    assert const.values_at(0) == (0.3, 13) and const.values_at(10**6) == (0.3, 13)
    lin = SelfCorrectionSchedule(strength=0.3, layers=13, mode="linear", start_step=10, end_step=20)
    assert lin.values_at(0) == (0.0, 0) and lin.values_at(10) == (0.0, 0)
    s, n = lin.values_at(15)
    assert s == pytest.approx(0.15) and n == 7  # 6.5 rounds half up
    assert lin.values_at(20) == pytest.approx((0.3, 13)) and lin.values_at(99) == pytest.approx((0.3, 13))
    cos = SelfCorrectionSchedule(strength=0.3, layers=13, mode="cosine", start_strength=0.1, start_layers=3,
                                 start_step=10, end_step=20)
    t = 0.5 * (1 - math.cos(math.pi * 0.2))  # step 12
    s, n = cos.values_at(12)
    assert s == pytest.approx(0.1 + 0.2 * t) and n == round(3 + 10 * t)
    assert cos.values_at(15)[0] == pytest.approx(0.2)
    assert cos.values_at(0) == (0.1, 3) and cos.values_at(20) == pytest.approx((0.3, 13))
    with pytest.raises(ValueError, match="end_step"):
        SelfCorrectionSchedule(mode="linear")
    with pytest.raises(ValueError, match="mode"):
        SelfCorrectionSchedule(mode="step")


def test_schedule_sets_module_and_resumes(tmp_path):
    sched = SelfCorrectionSchedule(strength=0.3, layers=12, mode="linear", end_step=4)
    model = Tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = _trainer(tmp_path, 5, [sched, ckpt], enable_checkpointing=True, logger=TensorBoardLogger(tmp_path))
    trainer.fit(model, _data())
    assert [s for s, _, _ in model.seen_train] == [0, 1, 2, 3, 4]
    assert [v for _, v, _ in model.seen_train] == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])
    assert [n for _, _, n in model.seen_train] == [0, 3, 6, 9, 12]
    assert trainer.callback_metrics["bsc/strength"].item() == pytest.approx(0.3)
    # Resume from step 2: the ramp continues from the restored global_step, nothing stored.
    resumed = Tiny()
    trainer = _trainer(tmp_path, 4, [SelfCorrectionSchedule(strength=0.3, layers=12, mode="linear", end_step=4)])
    trainer.fit(resumed, _data(), ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=2.ckpt"))
    assert resumed.seen_train == [(2, pytest.approx(0.15), 6), (3, pytest.approx(0.225), 9)]


# -- EMA ----------------------------------------------------------------------------------------
def _hand_ema(weights, steps, decay, warmup):
    ema = weights[0].clone()
    for n, step in enumerate(steps):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = d * ema + (1 - d) * weights[step]
    return ema


@pytest.mark.parametrize("decay,warmup", [(0.5, False), (0.9, True)])
def test_ema_matches_hand_computation(tmp_path, decay, warmup):
    rec, ema = WeightRecorder(), EMA(decay=decay, warmup=warmup)
    model = Tiny()
    _trainer(tmp_path, 5, [rec, ema]).fit(model, _data())
    want = _hand_ema(rec.weights, [1, 2, 3, 4, 5], decay, warmup)
    got = ema.ema_state_dict()
    assert set(got) == {"weight", "bias"}  # the frozen layer and other modules are not averaged
    torch.testing.assert_close(got["weight"], want, rtol=0, atol=1e-6)
    assert ema.num_updates == 5 and not torch.allclose(want, rec.weights[5])


def test_ema_every_n_steps_with_accumulation(tmp_path):
    rec, ema = WeightRecorder(), EMA(decay=0.5, every_n_steps=2)
    model = Tiny()
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 2)), batch_size=2, shuffle=False)
    _trainer(tmp_path, 6, [rec, ema], accumulate_grad_batches=2).fit(model, loader)
    # 4 batches per epoch, an optimizer step every 2 batches: 6 steps = 12 batches, updates at 2, 4, 6.
    assert ema.num_updates == 3
    torch.testing.assert_close(ema.ema_state_dict()["weight"], _hand_ema(rec.weights, [2, 4, 6], 0.5, False),
                               rtol=0, atol=1e-6)


def test_ema_swapped_for_validation_and_back(tmp_path):
    class EmaAtValidation(Callback):
        def __init__(self, ema):
            self.ema, self.seen = ema, []

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.seen.append((self.ema.ema_state_dict()["weight"].clone(), self.ema._backup["weight"].clone()))

    ema = EMA(decay=0.5)
    probe = EmaAtValidation(ema)
    model = Tiny()
    _trainer(tmp_path, 4, [ema, probe], limit_val_batches=1).fit(model, _data(), _data())
    assert len(model.seen_val) == 4  # one validation per one-step epoch
    for seen, (avg, train_w) in zip(model.seen_val, probe.seen):
        torch.testing.assert_close(seen, avg, rtol=0, atol=0)
        assert not torch.allclose(seen, train_w)
    # Training is not disturbed by the swaps: same final weights as a run without validation.
    plain = Tiny()
    _trainer(tmp_path, 4, [EMA(decay=0.5)]).fit(plain, _data())
    torch.testing.assert_close(model.transformer.weight, plain.transformer.weight, rtol=0, atol=0)
    # trainer.validate swaps too and restores the training weights afterwards.
    before = model.transformer.weight.detach().clone()
    model.seen_val.clear()
    _trainer(tmp_path, 4, [ema]).validate(model, _data(), verbose=False)
    torch.testing.assert_close(model.seen_val[0], ema.ema_state_dict()["weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.transformer.weight.detach(), before, rtol=0, atol=0)
    with ema.average_weights(model) as averaged:
        assert averaged is model.transformer
        torch.testing.assert_close(averaged.weight.detach(), ema.ema_state_dict()["weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.transformer.weight.detach(), before, rtol=0, atol=0)


def test_ema_checkpoint_resume_equals_uninterrupted(tmp_path):
    ema_a = EMA(decay=0.7, warmup=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    model_a = Tiny()
    rec = WeightRecorder()
    _trainer(tmp_path, 6, [ema_a, ckpt, rec], enable_checkpointing=True).fit(model_a, _data())
    path = tmp_path / "ckpt" / "epoch=2-step=3.ckpt"
    saved = torch.load(path, weights_only=True)["ema_state"]
    assert saved["num_updates"] == 3 and saved["last_step"] == 3
    torch.testing.assert_close(saved["weights"]["weight"], _hand_ema(rec.weights, [1, 2, 3], 0.7, True),
                               rtol=0, atol=1e-6)

    ema_b = EMA(decay=0.7, warmup=True)
    model_b = Tiny(seed=123)  # different init: everything must come from the checkpoint
    _trainer(tmp_path, 6, [ema_b]).fit(model_b, _data(), ckpt_path=str(path))
    assert ema_b.num_updates == 6
    for name, tensor in ema_a.ema_state_dict().items():
        torch.testing.assert_close(ema_b.ema_state_dict()[name], tensor, rtol=0, atol=1e-7)


def test_ema_attribute_errors():
    ema = EMA(attribute="missing")
    with pytest.raises(AttributeError, match="'missing'"):
        ema.on_fit_start(None, Tiny())
    with pytest.raises(RuntimeError, match="no averages"):
        EMA().ema_state_dict()
    whole = EMA(attribute=None)
    whole.on_fit_start(None, Tiny())
    assert set(whole.ema_state_dict()) == {"transformer.weight", "transformer.bias"}


# -- SampleLogger -------------------------------------------------------------------------------
def test_make_grid_layout():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 3, 2, 2) / 10
    grid = make_grid(images, nrow=2, padding=1, pad_value=1.0)
    assert grid.shape == (3, 7, 7)
    assert grid[0, 1, 1] == 0.0 and grid[0, 1, 4] == pytest.approx(0.1) and grid[0, 4, 1] == pytest.approx(0.2)
    assert grid[0, 0, 0] == 1.0 and grid[0, 4, 4] == 1.0  # padding, and the empty fourth tile
    assert make_grid(torch.zeros(4, 1, 2, 2)).shape == (3, 10, 10)  # grey to RGB, 2 per row by default


def test_sample_logger_steps_tensorboard_and_png(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    sampler = SampleLogger(["a dog", "a cat", "an apple"], seeds=[7, 8, 9], every_n_steps=2, folder=tmp_path / "png",
                           log_kwargs={"scale": 0.5}, labels=False)  # the bare grid's pixels are checked
    model = Tiny()
    _trainer(tmp_path, 5, [sampler], logger=logger).fit(model, _data())
    assert [c[0] for c in model.image_calls] == [2, 4, 5]  # every 2 steps, then at fit end
    assert all(c[1] == ["a dog", "a cat", "an apple"] and c[2] == [7, 8, 9] and c[3] is False
               for c in model.image_calls)
    assert model.training  # train mode restored
    pngs = sorted(p.name for p in (tmp_path / "png" / "samples").iterdir())
    assert pngs == ["step_00000002.png", "step_00000004.png", "step_00000005.png"]
    png = Image.open(tmp_path / "png" / "samples" / "step_00000002.png")
    assert png.size == (22, 22)  # 3 tiles of 8 px, 2 per row, 2 px padding
    first = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(7)) * 0.5
    pixels = torch.tensor(list(png.getdata()), dtype=torch.float32).view(22, 22, 3).permute(2, 0, 1)
    torch.testing.assert_close(pixels[:, 2:10, 2:10], (first * 255).round(), rtol=0, atol=0)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "samples/samples" in events.Tags()["images"]
    assert [e.step for e in events.Images("samples/samples")] == [2, 4, 5]


def test_sample_logger_only_on_rank_zero(tmp_path):
    model = Tiny()
    fake = types.SimpleNamespace(global_step=2, is_global_zero=False, loggers=[])
    calls = []
    model.log_images = lambda prompts, seeds: calls.append(seeds) or {"x": torch.zeros(1, 3, 2, 2)}
    sampler = SampleLogger(["p"], every_n_steps=2, folder=tmp_path / "png")
    sampler.on_train_batch_end(fake, model, None, None, 0)
    assert calls == [] and not (tmp_path / "png").exists()
    # With sharded models every rank must run generation; only rank zero writes.
    everyone = SampleLogger(["p"], every_n_steps=2, folder=tmp_path / "png", all_ranks=True, labels=False)
    assert everyone.log_samples(fake, model) == {}
    assert calls == [[0]] and not (tmp_path / "png").exists()
    fake.is_global_zero = True
    grids = everyone.log_samples(fake, model)
    assert grids["x"].shape == (3, 6, 6) and (tmp_path / "png" / "x" / "step_00000002.png").exists()



@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group, torn down afterwards so later tests see no distributed state."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ema_with_fsdp2_dtensor_parameters(tmp_path, one_rank_group):
    """Averages stay DTensors; update, swap and both checkpoint layouts work (one-rank FSDP2)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    torch.manual_seed(0)
    model = nn.Module()
    model.transformer = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    fully_shard(model.transformer, mesh=init_device_mesh("cpu", (1,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ema = EMA(decay=0.5)
    ema.on_fit_start(None, model)
    assert all(isinstance(t, DTensor) for t in ema.ema_state_dict().values())
    hand = {n: full(p).detach().clone() for n, p in model.transformer.named_parameters()}
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    for _ in range(3):
        opt.zero_grad()
        ((model.transformer(x) - y) ** 2).mean().backward()
        opt.step()
        ema.update(model)
        for n, p in model.transformer.named_parameters():
            hand[n] = 0.5 * hand[n] + 0.5 * full(p).detach()
    for n, t in ema.ema_state_dict().items():
        torch.testing.assert_close(full(t), hand[n], rtol=0, atol=1e-6)

    # Swap around a validation-style forward, which can leave FSDP2 parameters unsharded.
    train_w = {n: full(p).detach().clone() for n, p in model.transformer.named_parameters()}
    with torch.no_grad():
        model.transformer(x)
    ema.swap_in(model)
    with torch.no_grad():
        out = model.transformer(x)
    ema.swap_out(model)
    ref = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    ref.load_state_dict(hand)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)
    for n, p in model.transformer.named_parameters():
        torch.testing.assert_close(full(p).detach(), train_w[n], rtol=0, atol=0)

    # Full checkpoint: gathered plain tensors.  Distributed checkpoint: DTensors in state_dict.
    full_ckpt = {"state_dict": {}}
    ema.on_save_checkpoint(types.SimpleNamespace(strategy=types.SimpleNamespace()), model, full_ckpt)
    assert not any(isinstance(t, DTensor) for t in full_ckpt["ema_state"]["weights"].values())
    sharded_ckpt = {"state_dict": {}}
    stub = types.SimpleNamespace(strategy=types.SimpleNamespace(_save_distributed_checkpoint=True),
                                 ckpt_path=str(tmp_path / "dcp"))
    ema.on_save_checkpoint(stub, model, sharded_ckpt)
    assert sorted(sharded_ckpt["state_dict"]) == ["__ema__.0.bias", "__ema__.0.weight", "__ema__.1.bias",
                                                  "__ema__.1.weight"]
    assert sharded_ckpt["ema_state"]["weights"] is None
    dcp.save({"state_dict": sharded_ckpt["state_dict"]}, checkpoint_id=str(tmp_path / "dcp"))
    for ckpt in (full_ckpt, {"ema_state": sharded_ckpt["ema_state"]}):
        other = EMA(decay=0.5)
        other.on_fit_start(None, model)
        other.on_load_checkpoint(stub, model, ckpt)
        assert other.num_updates == 3
        for n, t in other.ema_state_dict().items():
            assert isinstance(t, DTensor)
            torch.testing.assert_close(full(t), hand[n], rtol=0, atol=1e-6)
