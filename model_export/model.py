"""A small decoder-only transformer for next-word prediction, in one readable file.

Written by hand (no ``nn.TransformerEncoder``) so that it exports with
``torch.export(strict=True)`` both as a joint forward+backward training program and as a
KV-cached inference program for ExecuTorch. Shapes are noted as ``# [B, T, D]``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_client.batching import IGNORE_INDEX  # targets equal to this do not count in the loss

__all__ = [
    "LoRALinear",
    "ModelConfig",
    "PredictPrefill",
    "PredictScore",
    "PredictStep",
    "TrainStep",
    "TransformerLM",
]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Every field has the default of the ``demo`` student."""

    vocab_size: int = 4096  # SentencePiece vocabulary (id 0 = <pad>, 1 = <unk>, 2 = <s>, 3 = </s>)
    max_seq_len: int = 48  # longest context in tokens (training windows and the KV cache)
    d_model: int = 192  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads; head_dim = d_model // n_heads
    d_ff: int = 768  # hidden width of the MLP
    dropout: float = 0.1  # dropout in training (0 in exported programs)
    tie_embeddings: bool = True  # output projection shares the token embedding matrix
    lora_rank: int = 0  # > 0 adds rank-r adapters to attention and MLP projections
    lora_alpha: float = 16.0  # adapter scale is lora_alpha / lora_rank

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, int | float | bool]:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias); decomposes into core ops only."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        # The mean runs over an [N, 1, 1, D] view: XNNPACK delegates mean.dim only over the two
        # innermost dims of a 4D tensor, and an undelegated op splits the inference graph.
        ms = (x * x).reshape(-1, 1, 1, x.shape[-1]).mean(dim=(2, 3), keepdim=True)
        ms = ms.reshape(*x.shape[:-1], 1)
        return x * torch.rsqrt(ms + self.eps) * self.weight


class LoRALinear(nn.Module):
    """``y = x W^T + (x A^T B^T) * alpha / r`` with ``W`` frozen when adapters are trained.

    ``B`` starts at zero, so a fresh adapter leaves the model unchanged (Hu et al. 2021).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        nn.init.normal_(self.weight, std=0.02)
        self.rank = rank
        self.scale = alpha / rank if rank else 0.0
        if rank:
            self.lora_a = nn.Parameter(torch.empty(rank, d_in))
            self.lora_b = nn.Parameter(torch.zeros(d_out, rank))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_out]
        y = F.linear(x, self.weight)
        if self.rank:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return y

    def merged_weight(self) -> Tensor:
        """The plain weight with the adapter folded in (used for the inference program)."""
        if not self.rank:
            return self.weight.detach().clone()
        return (self.weight + (self.lora_b @ self.lora_a) * self.scale).detach()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP (GELU)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        r, a = cfg.lora_rank, cfg.lora_alpha
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model)
        self.qkv = LoRALinear(cfg.d_model, 3 * cfg.d_model, r, a)
        self.proj = LoRALinear(cfg.d_model, cfg.d_model, r, a)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.up = LoRALinear(cfg.d_model, cfg.d_ff, r, a)
        self.down = LoRALinear(cfg.d_ff, cfg.d_model, r, a)
        self.dropout = nn.Dropout(cfg.dropout)

    def _split(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, Dh]
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q [B,H,Tq,Dh], k/v [B,H,Tk,Dh], additive mask broadcastable to [B,H,Tq,Tk]."""
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + mask
        att = self.dropout(torch.softmax(att, dim=-1))
        y = att @ v  # [B, H, Tq, Dh]
        b, _, tq, _ = y.shape
        out: Tensor = y.transpose(1, 2).reshape(b, tq, self.n_heads * self.head_dim)
        return out

    def mlp(self, x: Tensor) -> Tensor:
        out: Tensor = self.dropout(self.down(F.gelu(self.up(self.mlp_norm(x)), approximate="tanh")))
        return out

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Full-sequence pass; returns the new residual and this layer's keys and values."""
        q, k, v = self.qkv(self.attn_norm(x)).split(x.shape[-1], dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)  # [B, H, T, Dh]
        x = x + self.dropout(self.proj(self.attend(q, k, v, mask)))
        return x + self.mlp(x), k, v

    def step(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One new token per row. x [B,1,D]; caches [B,H,S,Dh]; mask [1,1,1,S+1] covers the
        cache slots then the new token (appended last, so no in-place cache write is needed)."""
        q, k, v = self.qkv(self.attn_norm(x)).split(x.shape[-1], dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)  # [B, H, 1, Dh]
        k_all = torch.cat([k_cache, k], dim=2)  # [B, H, S+1, Dh]
        v_all = torch.cat([v_cache, v], dim=2)
        x = x + self.proj(self.attend(q, k_all, v_all, mask))
        return x + self.mlp(x), k, v


class TransformerLM(nn.Module):
    """Token embedding + learned positions -> blocks -> RMSNorm -> (tied) vocabulary logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head: nn.Linear | None = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @property
    def layers(self) -> list[Block]:
        return [cast(Block, b) for b in self.blocks]

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def logits_from_hidden(self, h: Tensor) -> Tensor:  # [..., D] -> [..., V]
        h = self.norm(h)
        return F.linear(h, self.tok_emb.weight if self.lm_head is None else self.lm_head.weight)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] (one message per row, from position 0) -> logits [B, T, V]."""
        b, t = tokens.shape
        positions = torch.arange(t).expand(b, t)
        h, _, _ = self.hidden(tokens, positions, torch.zeros_like(tokens))
        return self.logits_from_hidden(h)

    def hidden(
        self, tokens: Tensor, positions: Tensor, segments: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """tokens/positions/segments [B, T] -> final residual [B, T, D], per-layer K and V.

        Several messages can be packed into one row: ``segments`` numbers them and attention
        never crosses a segment (block-diagonal causal mask); ``positions`` restart at 0 in each.
        """
        t = tokens.shape[1]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))  # [B, T, D]
        idx = torch.arange(t)
        causal = idx.view(1, -1) <= idx.view(-1, 1)  # [T, T]
        same = segments.unsqueeze(2) == segments.unsqueeze(1)  # [B, T, T]
        mask = torch.where(causal & same, 0.0, float("-inf")).unsqueeze(1)  # [B, 1, T, T]
        ks, vs = [], []
        for block in self.blocks:
            x, k, v = block(x, mask)
            ks.append(k)
            vs.append(v)
        return x, ks, vs

    def packed_logits(self, tokens: Tensor, positions: Tensor, segments: Tensor) -> Tensor:
        h, _, _ = self.hidden(tokens, positions, segments)
        return self.logits_from_hidden(h)  # [B, T, V]

    def loss(self, tokens: Tensor, targets: Tensor, positions: Tensor, segments: Tensor) -> Tensor:
        """Mean next-token cross-entropy over targets != IGNORE_INDEX (all inputs [B, T])."""
        logits = self.packed_logits(tokens, positions, segments)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )

    def trainable_names(self, mode: Literal["full", "lora"]) -> list[str]:
        """Names of parameters trained on devices: everything, or only the LoRA adapters."""
        names = [n for n, _ in self.named_parameters()]
        if mode == "lora":
            if not self.cfg.lora_rank:
                raise ValueError("trainable set 'lora' needs a model with lora_rank > 0")
            return [n for n in names if ".lora_" in n]
        return names

    def set_trainable(self, mode: Literal["full", "lora"]) -> None:
        keep = set(self.trainable_names(mode))
        for n, p in self.named_parameters():
            p.requires_grad_(n in keep)

    def merged(self) -> TransformerLM:
        """A copy without adapters (LoRA folded into the base weights) for inference export."""
        cfg = replace(self.cfg, lora_rank=0, dropout=0.0)
        out = TransformerLM(cfg)
        state = {}
        for name, module in self.named_modules():
            if isinstance(module, LoRALinear):
                state[f"{name}.weight"] = module.merged_weight()
        for name, p in self.state_dict().items():
            if ".lora_" not in name:
                state.setdefault(name, p.detach().clone())
        out.load_state_dict(state)
        return out.eval()


class TrainStep(nn.Module):
    """Exported as the training program: (tokens, targets, positions, segments) -> loss."""

    def __init__(self, lm: TransformerLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, targets: Tensor, positions: Tensor, segments: Tensor) -> Tensor:
        return self.lm.loss(tokens, targets, positions, segments)


class PredictPrefill(nn.Module):
    """Inference method 1: a right-padded context -> next-token log-probs and the KV cache.

    tokens [1, S] (S = max_seq_len, padded), length [1] (number of real tokens) ->
    log-probs [1, V] at position length-1, keys and values [L, 1, H, S, Dh].
    """

    def __init__(self, lm: TransformerLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)  # [1, S]
        h, ks, vs = self.lm.hidden(tokens, positions, torch.zeros_like(tokens))  # h [1, S, D]
        last = torch.index_select(h, 1, length - 1)  # [1, 1, D]
        logp = torch.log_softmax(self.lm.logits_from_hidden(last[:, 0]), dim=-1)  # [1, V]
        return logp, torch.stack(ks), torch.stack(vs)


class PredictStep(nn.Module):
    """Inference method 2: one token for each of B beams at position ``pos``.

    tokens [B, 1], pos [1], caches [L, B, H, S, Dh] holding positions < pos ->
    log-probs [B, V] and the new keys/values [L, B, H, 1, Dh] for slot ``pos``.
    """

    def __init__(self, lm: TransformerLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, tokens: Tensor, pos: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        s = k_cache.shape[3]
        x = self.lm.tok_emb(tokens) + self.lm.pos_emb(pos).view(1, 1, -1)  # [B, 1, D]
        valid = torch.cat([torch.arange(s) < pos, torch.ones(1, dtype=torch.bool)])  # [S+1]
        mask = torch.where(valid, 0.0, float("-inf")).view(1, 1, 1, s + 1)
        ks, vs = [], []
        for i, block in enumerate(self.lm.layers):
            x, k, v = block.step(x, k_cache[i], v_cache[i], mask)
            ks.append(k)
            vs.append(v)
        logp = torch.log_softmax(self.lm.logits_from_hidden(x[:, 0]), dim=-1)  # [B, V]
        return logp, torch.stack(ks), torch.stack(vs)


class PredictScore(nn.Module):
    """Inference method 3: log-prob of each given next token (evaluation and loss on devices).

    tokens [1, S], targets [1, S] -> log P(targets[t] | tokens[..t]) [1, S].
    """

    def __init__(self, lm: TransformerLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        h, _, _ = self.lm.hidden(tokens, positions, torch.zeros_like(tokens))
        logp = torch.log_softmax(self.lm.logits_from_hidden(h), dim=-1)  # [1, S, V]
        return torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)
