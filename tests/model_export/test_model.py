from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model_export.model import ModelConfig, PredictPrefill, PredictScore, PredictStep, TransformerLM

CFG = ModelConfig(vocab_size=97, max_seq_len=16, d_model=24, n_layers=2, n_heads=3, d_ff=40, dropout=0.0)


@pytest.fixture
def lm() -> TransformerLM:
    torch.manual_seed(0)
    m = TransformerLM(CFG).eval()
    with torch.no_grad():  # make the tied output non-trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_shapes_and_tied_embeddings(lm: TransformerLM) -> None:
    x = torch.randint(0, 97, (3, 10))
    assert lm(x).shape == (3, 10, 97)
    assert lm.lm_head is None


def test_packed_rows_equal_separate_messages(lm: TransformerLM) -> None:
    a, b = torch.randint(4, 97, (5,)), torch.randint(4, 97, (7,))
    packed = torch.cat([a, b]).unsqueeze(0)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    out = lm.packed_logits(packed, positions, segments)[0]
    torch.testing.assert_close(out[:5], lm(a.unsqueeze(0))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[5:], lm(b.unsqueeze(0))[0], atol=1e-5, rtol=1e-5)


def test_kv_cached_steps_equal_full_forward(lm: TransformerLM) -> None:
    s = CFG.max_seq_len
    seq = torch.randint(4, 97, (9,))
    tokens = torch.zeros(1, s, dtype=torch.long)
    tokens[0, :6] = seq[:6]
    logp, k, v = PredictPrefill(lm)(tokens, torch.tensor([6]))
    full = torch.log_softmax(lm(seq.unsqueeze(0))[0], -1)
    torch.testing.assert_close(logp[0], full[5], atol=1e-5, rtol=1e-5)
    step = PredictStep(lm)
    beams = 2
    k, v = k.repeat(1, beams, 1, 1, 1), v.repeat(1, beams, 1, 1, 1)
    for pos in range(6, 9):
        out, kn, vn = step(seq[pos].repeat(beams, 1), torch.tensor([pos]), k, v)
        torch.testing.assert_close(out[0], full[pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], full[pos], atol=1e-5, rtol=1e-5)
        k[:, :, :, pos : pos + 1] = kn
        v[:, :, :, pos : pos + 1] = vn


def test_score_is_log_prob_of_targets(lm: TransformerLM) -> None:
    seq = torch.randint(4, 97, (1, CFG.max_seq_len + 1))
    got = PredictScore(lm)(seq[:, :-1], seq[:, 1:])
    ref = torch.log_softmax(lm(seq[:, :-1]), -1).gather(2, seq[:, 1:, None])[..., 0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_loss_ignores_padding(lm: TransformerLM) -> None:
    x = torch.randint(4, 97, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    seg = torch.zeros(2, 8, dtype=torch.long)
    t = x.roll(-1, 1)
    t_pad = t.clone()
    t_pad[:, 5:] = -100
    full_ce = torch.nn.functional.cross_entropy(lm(x)[:, :5].reshape(-1, 97), t[:, :5].reshape(-1))
    torch.testing.assert_close(lm.loss(x, t_pad, pos, seg), full_ce)


def test_lora_starts_as_identity_and_merges_exactly() -> None:
    torch.manual_seed(1)
    cfg = replace(CFG, lora_rank=4)
    m = TransformerLM(cfg).eval()
    base = TransformerLM(CFG).eval()
    base.load_state_dict({k: v for k, v in m.state_dict().items() if ".lora_" not in k})
    x = torch.randint(4, 97, (2, 9))
    torch.testing.assert_close(m(x), base(x))  # B = 0 at init
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_b" in n:
                p.normal_(std=0.1)
    torch.testing.assert_close(m.merged()(x), m(x), atol=1e-5, rtol=1e-5)
    assert all(".lora_" in n for n in m.trainable_names("lora"))
    m.set_trainable("lora")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(m.trainable_names("lora"))


def test_lora_mode_needs_adapters(lm: TransformerLM) -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        lm.trainable_names("lora")
