"""Text encoder wrapper and packed text features, on a tiny random T5 built offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from infinity_lightning.models.text_encoder import PromptTruncatedWarning, TextEncoder, TextFeatures, flan_t5_xl_config
from infinity_lightning.tiny import build_sentencepiece_vocab, make_tiny_t5

PROMPTS = ["a photo of a dog", "cat", "a red apple on a wooden table"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def encoder(tiny_t5):
    return TextEncoder.from_pretrained(tiny_t5)


def test_sentencepiece_vocab_has_t5_special_ids(tmp_path):
    from transformers import T5Tokenizer

    path = build_sentencepiece_vocab(["a red apple", "a dog on grass"] * 5, tmp_path, vocab_size=40)
    assert path.name == "spiece.model" and path.stat().st_size > 0
    tok = T5Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a dog").input_ids
    assert ids[-1] == 1 and 2 not in ids  # EOS appended, every character known


def test_encode_packs_real_rows(encoder):
    feats = encoder.encode(PROMPTS)
    batch = encoder.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    lens = batch.attention_mask.sum(1).tolist()
    assert feats.lens == lens and len(feats) == 3
    assert feats.kv_compact.shape == (sum(lens), 64) and feats.kv_compact.dtype == torch.float32
    assert feats.cu_seqlens.dtype == torch.int32
    assert feats.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert feats.max_seqlen == max(lens) and encoder.width == 64
    with torch.no_grad():
        hidden = encoder.encoder(**batch).last_hidden_state
    for i, rows in enumerate(feats.split()):
        torch.testing.assert_close(rows, hidden[i, : lens[i]], rtol=0, atol=0)


def test_padding_to_max_length_keeps_real_rows(encoder):
    short = encoder.encode(PROMPTS)
    full = encoder.encode(PROMPTS, pad_to_max_length=True)
    assert full.lens == short.lens
    assert (full.kv_compact - short.kv_compact).abs().max().item() < 1e-5


def test_single_prompt_equals_batched(encoder):
    alone = encoder.encode("cat")
    batched = encoder.encode(PROMPTS).select([1])
    assert alone.lens == batched.lens
    assert (alone.kv_compact - batched.kv_compact).abs().max().item() < 1e-5


def test_pack_concat_split_select_round_trip():
    torch.manual_seed(0)
    rows = [torch.randn(n, 4) for n in (3, 1, 2)]
    neg_rows = [torch.randn(n, 4) for n in (2, 5)]
    pos = TextFeatures.pack(rows)
    neg = TextFeatures.pack(neg_rows)
    assert pos.cu_seqlens.tolist() == [0, 3, 4, 6] and pos.max_seqlen == 3
    both = pos.concat(neg)
    assert both.cu_seqlens.tolist() == [0, 3, 4, 6, 8, 13]
    assert both.lens == [3, 1, 2, 2, 5] and both.max_seqlen == 5 and len(both) == 5
    assert both.kv_compact.shape == (13, 4)
    for got, want in zip(both.split(), rows + neg_rows):
        assert torch.equal(got, want)
    picked = both.select([4, 0])
    assert picked.lens == [5, 3] and picked.cu_seqlens.tolist() == [0, 5, 8]
    assert torch.equal(picked.kv_compact, torch.cat([neg_rows[1], rows[0]]))
    half = both.to(torch.bfloat16)
    assert half.kv_compact.dtype == torch.bfloat16 and half.cu_seqlens.dtype == torch.int32
    kv, lens, cu, mx = both.as_tuple()
    assert kv is both.kv_compact and lens == both.lens and mx == 5


def test_inconsistent_features_rejected():
    with pytest.raises(ValueError, match="lens sum to 4"):
        TextFeatures(torch.zeros(5, 2), [1, 3], torch.tensor([0, 1, 4], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="width"):
        TextFeatures.pack([torch.zeros(2, 4)]).concat(TextFeatures.pack([torch.zeros(2, 3)]))


def test_long_prompt_warns_and_is_cut(tiny_t5):
    enc = TextEncoder.from_pretrained(tiny_t5, max_length=6)
    long_prompt = "a red apple on a wooden table near a small house"
    with pytest.warns(PromptTruncatedWarning, match=r"cut to 6 tokens: 'a red apple"):
        feats = enc.encode([long_prompt, "cat"])
    assert feats.lens[0] == 6 and feats.lens[1] < 6
    # T5 truncation keeps the EOS as the last kept token.
    ids = enc.tokenizer([long_prompt], max_length=6, truncation=True).input_ids[0]
    assert len(ids) == 6 and ids[-1] == 1


def test_long_prompt_error_mode(tiny_t5):
    enc = TextEncoder.from_pretrained(tiny_t5, max_length=6, on_too_long="error")
    with pytest.raises(ValueError, match="prompt 0 has .* tokens, more than max_length=6"):
        enc.encode(["a red apple on a wooden table near a small house"])
    assert enc.encode(["cat"]).lens[0] <= 6


def test_encoder_is_frozen(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.encoder.training
    assert encoder.offload() is encoder and encoder.device.type == "cpu"


def test_8bit_close_to_fp32(tiny_t5, encoder):
    import bitsandbytes as bnb

    q8 = TextEncoder.from_pretrained(tiny_t5, quantization="8bit")
    attn = q8.encoder.encoder.block[0].layer[0].SelfAttention
    assert isinstance(attn.q, bnb.nn.Linear8bitLt) and attn.q.weight.dtype == torch.int8
    ref = encoder.encode(PROMPTS)
    got = q8.encode(PROMPTS)
    assert got.lens == ref.lens
    cos = torch.nn.functional.cosine_similarity(got.kv_compact, ref.kv_compact, dim=-1)
    assert cos.min().item() > 0.99


def test_4bit_keeps_t5_ffn_output_unquantized(tiny_t5, encoder):
    import bitsandbytes as bnb

    q4 = TextEncoder.from_pretrained(tiny_t5, quantization="4bit")
    ff = q4.encoder.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(ff.wi_0, bnb.nn.Linear4bit) and type(ff.wo) is torch.nn.Linear
    cos = torch.nn.functional.cosine_similarity(q4.encode(PROMPTS).kv_compact, encoder.encode(PROMPTS).kv_compact, dim=-1)
    assert cos.min().item() > 0.9  # a quantized ``wo`` casts activations to uint8: cosine near 0


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*local folder"):
        TextEncoder.from_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="quantization"):
        TextEncoder.from_pretrained(tmp_path / "empty", quantization="3bit")


def test_flan_t5_xl_config_parameter_count():
    from transformers import T5EncoderModel

    cfg = flan_t5_xl_config()
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size) == (2048, 24, 32, 64, 5120, 32128)
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    d, ff, n = 2048, 5120, 24
    per_layer = 4 * d * d + 3 * d * ff + 2 * d  # q,k,v,o; wi_0, wi_1, wo; two RMSNorm weights
    expected = 32128 * d + n * per_layer + d + 32 * 32  # embeddings, final norm, relative bias
    assert sum(p.numel() for p in model.parameters()) == expected
