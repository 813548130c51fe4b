"""The benchmark definitions (benchmarks/_common.py): model FLOPs by the usual MFU definition,
the block parameters it counts, the flag on utilisations above 1, and the transformer
benchmark's JSON and exit status on a tiny model (the numbers themselves are never asserted)."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import transformer as T  # noqa: E402

from infinity_lightning.models.infinity import InfinityTransformer  # noqa: E402
from infinity_lightning.presets import transformer_config  # noqa: E402


def test_model_flops_by_hand():
    # 6 N B L = 6 * 1000 * 2 * 5 = 60,000
    # sample 1: 4 L^2 C + 4 L Lt C = 4*25*8 + 4*5*3*8 = 800 + 480 = 1,280
    # sample 2: 800 + 4*5*2*8 = 1,120; 3 * depth * (1,280 + 1,120) = 3 * 2 * 2,400 = 14,400
    assert C.model_flops(1000, depth=2, width=8, tokens=5, text_lens=[3, 2]) == 74_400


def test_block_params_are_the_blocks_without_the_text_side_projection():
    model = InfinityTransformer(transformer_config("small"))
    cfg = model.config
    Cw, F, H = cfg.embed_dim, cfg.ffn_hidden, cfg.num_heads
    assert (Cw, F, H, cfg.depth) == (192, 768, 4, 4)
    # per block: qkv 3C^2, sa.proj C^2 + C, ca.mat_q C^2 + C, ca.proj C^2 + C, fc1 CF + F, fc2 FC + C,
    # ada_gss 6C, q/v biases 2C, ca.v_bias C, ca_norm 2C, temperatures H (ca.mat_kv 2C^2 left out)
    per_block = 6 * Cw * Cw + 2 * Cw * F + F + 15 * Cw + H
    assert per_block == 519_748
    assert C.block_params(model) == 4 * per_block
    assert C.block_params(model, exclude=()) == 4 * (per_block + 2 * Cw * Cw)


def test_utilisation_above_one_is_flagged():
    row = C.check_utilisation({"mfu_model": 1.01, "mfu_useful": 0.9}, ("mfu_model", "mfu_useful"))
    assert row["valid"] is False and "mfu_model=1.010" in row["invalid_reason"]
    ok = C.check_utilisation({"mfu_model": 0.99, "mfu_useful": None}, ("mfu_model", "mfu_useful"))
    assert ok["valid"] is True and "invalid_reason" not in ok


def test_peak_meter_keeps_the_best_of_its_samples():
    meter = C.PeakMeter(torch.float32, torch.device("cpu"), reps=3, start_n=64, max_n=64)
    meter.sample()
    meter.sample(reps=2)
    summary = meter.summary()
    assert summary["n"] == 64 and summary["products"] == 5 and summary["threads"] == torch.get_num_threads()
    assert summary["best_gflop_per_s"] == max(meter.flops) / 1e9 >= summary["median_gflop_per_s"]
    assert summary["spread_best_over_min"] >= 1.0


TINY = ["--cases", "train", "--presets", "tiny", "--repeats", "1", "--warmup", "0", "--no-memory",
        "--peak-n", "64", "--peak-reps", "1", "--dtypes", "fp32", "--checkpointing", "none,self-attn", "--text-len", "8"]


@pytest.mark.parametrize("peak,status", [(1e15, 0), (1.0, C.INVALID_EXIT)])
def test_transformer_benchmark_rows_and_exit_status(monkeypatch, capsys, peak, status):
    monkeypatch.setattr(C.PeakMeter, "best", property(lambda self: peak))
    assert T.main(TINY) == status
    out = json.loads(capsys.readouterr().out)
    assert out["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "mkldnn_bf16_supported" in out["machine"] and "bf16_native" in out["machine"]
    rows = out["train"]
    assert {(r["mode"], r["checkpointing"]) for r in rows} == {(m, c) for m in ("exact", "fast")
                                                               for c in ("none", "self-attn")}
    for r in rows:
        assert r["mfu_model"] == pytest.approx(r["model_gflop"] * 1e9 / r["seconds_per_step"] / peak)
        assert r["valid"] is (status == 0)
        assert r["speedup_vs_exact_same_dtype_and_checkpointing"] > 0
        assert 0 < r["attention_share"]
        if r["checkpointing"] == "self-attn":
            assert r["time_cost_of_checkpointing_vs_none_same_mode"] > 0
    assert out["invalid_rows"] == (0 if status == 0 else len(rows))


def test_transformer_benchmark_refuses_unknown_names():
    for bad in (["--modes", "exact,turbo"], ["--checkpointing", "sometimes"], ["--gen-options", "int4"]):
        with pytest.raises(SystemExit):
            T.parse_args(bad)


def test_tokenizer_benchmark_interleaves_and_probes_each_row_in_its_own_process(capsys):
    import tokenizer as TB

    assert TB.main(["--preset", "tiny", "--sizes", "256", "--dtypes", "fp32", "--repeats", "2", "--warmup", "0",
                    "--peak-n", "64", "--threads", "1"]) in (0, C.INVALID_EXIT)
    out = json.loads(capsys.readouterr().out)
    assert out["interleaved"] is True and "per row" in out["peak_memory"]
    (row,) = out["results"]
    assert len(row["encode_seconds_all"]) == len(row["decode_seconds_all"]) == 2
    assert row["memory_own_process"]["peak_rss_gb"] > 0       # a fresh process answered
    assert row["valid"] is (row["encode_utilisation"] <= 1 and row["decode_utilisation"] <= 1)
