"""Transformer building blocks, from normalisation to the two models, in reading order.

norms -> positional schemes -> attention patterns -> attention -> feedforward -> blocks
-> trunk -> encoder classifier / decoder language model (generation: generation.py).
Every variant is a config option resolved once in `__init__` through a small name->class table.
"""

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    """Model options; the defaults are the course's base model (part one and part two)."""

    vocab_size: int = 5755  # the handout's; training.model_config passes the vocabulary the run builds
    block_size: int = 32
    n_embd: int = 64
    n_head: int = 2
    n_kv_heads: int | None = None  # None: one key/value head per query head (multi-head)
    n_layer: int = 4
    share_layers: bool = False  # ALBERT: every layer applies one shared block
    embedding_dim: int | None = None  # ALBERT: token table this wide, projected to n_embd (None: n_embd)
    ff_hidden: int = 100
    feedforward: str = "relu"  # relu | gelu | gelu_tanh | swiglu
    norm: str = "layer"  # layer | rms
    norm_eps: float = 1e-5  # GPT-2's; Llamas use 1e-5 or 1e-6
    norm_placement: str = "pre"  # pre | post
    position: str = "learned"  # learned | sinusoidal | rope | alibi | none | disentangled
    attention_pattern: str = "full"  # full | local | block
    # manual (the course's: scores, mask, softmax written out) | sdpa (torch's fused scaled_dot_product_attention, the
    # same function within float rounding; a call that asks for the weights, the checks and heatmaps, takes manual)
    attention: str = "manual"
    rope_base: float = 10000.0  # the base of RoPE's frequencies (Llama 3 uses 500000)
    window: int = 8  # tokens in a local window, or in one block of the blockwise pattern
    relative_clip: int = 8  # k of the disentangled (DeBERTa) relative positions
    pooling: str = "mean"  # mean | cls (classifier only)
    causal: bool = False  # classifier only: a causal trunk, so a pretrained decoder's weights fit it (GPT-1's fine-tuning)
    classifier_hidden: int = 100
    n_classes: int = 3
    tie_embeddings: bool = False  # decoder only
    dropout: float = 0.0
    label_smoothing: float = 0.0
    # decoder only: full (the course's: the whole (B, T, V) logits, then their cross-entropy) | chunked (in training,
    # the loss and its gradient a few rows at a time, the whole logits never held; the same function within rounding)
    lm_loss: str = "full"
    init_std: float | None = None  # None keeps PyTorch's default initialisation, as the course does
    pad_id: int = 0

    def validate(self) -> "TransformerConfig":
        """Raise ValueError with a one-line reason if the options cannot build a model."""
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer", "ff_hidden", "window",
                     "relative_clip", "classifier_hidden", "n_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_head % self.n_kv_heads):
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_head ({self.n_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size (n_embd / n_head)")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.tie_embeddings and self.embedding_dim not in (None, self.n_embd):
            raise ValueError("tie_embeddings needs the token table n_embd wide (embedding_dim None or n_embd)")
        if self.norm_eps <= 0 or self.rope_base <= 1:
            raise ValueError(f"norm_eps must be positive and rope_base above 1, got {self.norm_eps}, {self.rope_base}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        tables = {"feedforward": FEEDFORWARDS, "norm": NORMS, "norm_placement": BLOCKS,
                  "position": POSITIONS, "attention_pattern": PATTERNS, "attention": ATTENTIONS, "pooling": POOLINGS,
                  "lm_loss": LM_LOSSES}
        for name, table in tables.items():
            if getattr(self, name) not in table:
                raise ValueError(f"{name} must be one of {', '.join(table)}, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        """The options as a plain dict (config.json of a checkpoint)."""
        return asdict(self)


# ---------------------------------------------------------------- normalisation


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (Ba et al., 2016)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        # the biased variance, written out: Tensor.var is several times slower on small CPU tensors
        variance = centred.pow(2).mean(-1, keepdim=True)
        return centred * torch.rsqrt(variance + self.eps) * self.weight + self.bias


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or bias (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


NORMS = {"layer": LayerNorm, "rms": RMSNorm}


# ---------------------------------------------------------------- positional schemes
# A scheme may add to the token embeddings (`embed`), rotate queries and keys (`rotate`),
# or add a bias to the attention scores (`score_bias`); the base class does none of these.
# Positions are absolute indices starting at `start`, so cached decoding sees the right ones.


def grow(module: nn.Module, name: str, length: int, build) -> torch.Tensor:
    """Return buffer `name` with at least `length` rows, rebuilding it longer when needed."""
    table = getattr(module, name)
    if table.shape[0] < length:
        table = build(max(length, 2 * table.shape[0])).to(table.device, table.dtype)
        setattr(module, name, table)
    return table


class NoPositions(nn.Module):
    """No position information: attention alone is order-blind (only the causal mask orders a decoder)."""

    def __init__(self, config: TransformerConfig, max_len: int):
        super().__init__()

    def embed(self, x, start: int):
        return x

    def rotate(self, x, start: int):
        return x

    def score_bias(self, q, k, start: int):
        return None  # no bias: attention skips the addition (a (B, H, T, Tk) add of zeros per layer)


class LearnedPositions(NoPositions):
    """A trained vector per absolute position, added to the token embeddings (GPT, BERT)."""

    def __init__(self, config, max_len):
        super().__init__(config, max_len)
        self.embedding = nn.Embedding(max_len, config.n_embd)

    def embed(self, x, start):
        T = x.shape[1]
        if start + T > self.embedding.num_embeddings:
            raise ValueError(f"learned positions stop at {self.embedding.num_embeddings} tokens, asked for {start + T}")
        return x + self.embedding(torch.arange(start, start + T, device=x.device))


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """sin/cos of position * 10000^(-2i/dim) (Vaswani et al., 2017): (length, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class SinusoidalPositions(NoPositions):
    """Fixed sinusoids added to the token embeddings; defined for any length."""

    def __init__(self, config, max_len):
        super().__init__(config, max_len)
        self.dim = config.n_embd
        self.register_buffer("table", sinusoid_table(max_len, self.dim), persistent=False)

    def embed(self, x, start):
        table = grow(self, "table", start + x.shape[1], lambda n: sinusoid_table(n, self.dim))
        return x + table[start : start + x.shape[1]]


def rope_tables(length: int, head_size: int, base: float = 10000.0):
    """cos and sin of position * base^(-2i/head_size), each (length, head_size / 2)."""
    frequency = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * frequency  # (length, hs/2)
    return torch.stack([angles.cos(), angles.sin()])  # (2, length, hs/2)


class RotaryPositions(NoPositions):
    """RoPE (Su et al., 2021): rotate each (even, odd) pair of q and k by a position-dependent angle,
    so q_i . k_j depends on i - j only."""

    def __init__(self, config, max_len):
        super().__init__(config, max_len)
        self.head_size, self.base = config.n_embd // config.n_head, config.rope_base
        cos_sin = rope_tables(max_len, self.head_size, self.base).transpose(0, 1)  # (length, 2, hs/2)
        self.register_buffer("cos_sin", cos_sin, persistent=False)

    def rotate(self, x, start):  # x: (B, H, T, hs)
        T = x.shape[2]
        table = grow(self, "cos_sin", start + T, lambda n: rope_tables(n, self.head_size, self.base).transpose(0, 1))
        cos, sin = table[start : start + T].unbind(1)  # (T, hs/2) each
        even, odd = x[..., 0::2], x[..., 1::2]  # (B, H, T, hs/2)
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # (B, H, T, hs/2, 2)
        return rotated.flatten(-2)  # (B, H, T, hs)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Head slopes 2^(-8/n), 2^(-16/n), ... (Press et al., 2022); for n not a power of two,
    the slopes of the nearest lower power of two, then every other slope of the next one."""
    def powers(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    lower = 2 ** math.floor(math.log2(n_head))
    slopes = powers(lower) + powers(2 * lower)[0::2][: n_head - lower]
    return torch.tensor(slopes)


def distance_table(length: int) -> torch.Tensor:
    """|i - j| for query i and key j: (length, length)."""
    index = torch.arange(length)
    return (index[:, None] - index[None, :]).abs().float()


class AlibiPositions(NoPositions):
    """ALiBi: no position embeddings; each head adds -slope * |i - j| to its scores.
    In a decoder the causal mask leaves only j <= i, the paper's -slope * (i - j); in the
    encoder the same symmetric distance penalises both directions."""

    def __init__(self, config, max_len):
        super().__init__(config, max_len)
        self.register_buffer("slopes", alibi_slopes(config.n_head)[:, None, None], persistent=False)  # (H, 1, 1)
        self.register_buffer("distance", distance_table(max_len), persistent=False)

    def score_bias(self, q, k, start):
        T_q, T_k = q.shape[2], k.shape[2]
        distance = grow(self, "distance", T_k, distance_table)[start : start + T_q, :T_k]  # (Tq, Tk)
        return -self.slopes * distance  # (H, Tq, Tk)


def relative_index(length: int, clip: int) -> torch.Tensor:
    """clip(i - j, -clip, clip) + clip for query and key positions 0..length-1: (length, length)."""
    index = torch.arange(length)
    return (index[:, None] - index[None, :]).clamp(-clip, clip) + clip


class DisentangledPositions(NoPositions):
    """DeBERTa-style (He et al., 2021) relative positions: content-to-position q_i . P_k[d(i,j)] and
    position-to-content k_j . P_q[d(j,i)] terms, with d clipped at +-k; no absolute embeddings.
    The relative tables are shared by all layers, as in DeBERTa, and live directly in head space."""

    def __init__(self, config, max_len):
        super().__init__(config, max_len)
        self.clip, self.n_head = config.relative_clip, config.n_head
        self.head_size = config.n_embd // config.n_head
        self.key_table = nn.Parameter(torch.randn(2 * self.clip + 1, config.n_embd) * 0.02)
        self.query_table = nn.Parameter(torch.randn(2 * self.clip + 1, config.n_embd) * 0.02)
        self.register_buffer("index", relative_index(max_len, self.clip), persistent=False)

    def _heads(self, table):  # (2k+1, C) -> (H, 2k+1, hs)
        return table.view(-1, self.n_head, self.head_size).transpose(0, 1)

    def score_bias(self, q, k, start):
        B, H, T_q, _ = q.shape
        T_k = k.shape[2]
        index = grow(self, "index", T_k, lambda n: relative_index(n, self.clip))[start : start + T_q, :T_k]  # (Tq, Tk)
        content_to_position = q @ self._heads(self.key_table).transpose(-2, -1)  # (B, H, Tq, 2k+1)
        content_to_position = content_to_position.gather(-1, index.expand(B, H, T_q, T_k))  # (B, H, Tq, Tk)
        position_to_content = k @ self._heads(self.query_table).transpose(-2, -1)  # (B, H, Tk, 2k+1)
        # d(j, i) = 2k - d(i, j): the same clipped offset seen from the key's side
        reverse = (2 * self.clip - index).transpose(0, 1)  # (Tk, Tq)
        position_to_content = position_to_content.gather(-1, reverse.expand(B, H, T_k, T_q)).transpose(-2, -1)
        return (content_to_position + position_to_content) / math.sqrt(self.head_size)  # (B, H, Tq, Tk)


POSITIONS = {
    "learned": LearnedPositions,
    "sinusoidal": SinusoidalPositions,
    "rope": RotaryPositions,
    "alibi": AlibiPositions,
    "none": NoPositions,
    "disentangled": DisentangledPositions,
}


# ---------------------------------------------------------------- attention patterns
# Which key j a query i may see, as a function of positions: full, a local window of w tokens
# (Longformer-style), or fixed blocks of w tokens (a decoder also sees the previous block).


def full_pattern(i, j, w, causal):
    """Every key."""
    return torch.ones_like(i - j, dtype=torch.bool)


def local_pattern(i, j, w, causal):
    """Keys fewer than w positions away."""
    return (i - j).abs() < w


def block_pattern(i, j, w, causal):
    """Keys in the query's block of w tokens (and, for a decoder, the block before)."""
    same_block = i // w == j // w
    return (same_block | (j // w == i // w - 1)) if causal else same_block


PATTERNS = {"full": full_pattern, "local": local_pattern, "block": block_pattern}


class AttentionMask(nn.Module):
    """The pattern (and, for a decoder, causal) mask as a buffer: True where attention is allowed."""

    def __init__(self, pattern: str, window: int, causal: bool, max_len: int):
        super().__init__()
        self.pattern, self.window, self.causal = PATTERNS[pattern], window, causal
        self.register_buffer("allowed", self.build(max_len), persistent=False)

    def build(self, length: int) -> torch.Tensor:
        """The (length, length) table of allowed (query, key) pairs."""
        index = torch.arange(length)
        i, j = index[:, None], index[None, :]
        allowed = self.pattern(i, j, self.window, self.causal)
        return allowed & (j <= i) if self.causal else allowed  # (length, length)

    def forward(self, start: int, T_q: int, T_k: int) -> torch.Tensor:
        return grow(self, "allowed", T_k, self.build)[start : start + T_q, :T_k]  # (Tq, Tk)


# ---------------------------------------------------------------- attention


class KVCache:
    """Keys and values of the tokens seen so far, for one layer of incremental decoding."""

    def __init__(self):
        self.keys = self.values = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys, values):
        """Add this step's (B, H_kv, T, hs) keys and values; return all of them."""
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values


def dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity at p = 0 (the course's): the same output without a call per step."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hkv, T, hs) -> (B, Hkv * group, T, hs): each key/value head serves `group` query heads."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


class Attention(nn.Module):
    """Multi-head self-attention; with n_kv_heads < n_head, grouped-query attention
    (Ainslie et al., 2023), each key/value head shared by n_head / n_kv_heads query heads."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_heads = config.n_kv_heads or config.n_head
        self.head_size = config.n_embd // config.n_head
        # queries, keys and values from one matrix: one matmul instead of three
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_heads) * self.head_size)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = dropout(config.dropout)

    def forward(self, x, mask, positions, start=0, cache=None, return_attention=False):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_heads, self.head_size).transpose(1, 2)  # (B, H+2Hkv, T, hs)
        q, k, v = qkv.split([self.n_head, self.n_kv_heads, self.n_kv_heads], dim=1)  # (B, H, T, hs), (B, Hkv, T, hs) x2
        q, k = positions.rotate(q, start), positions.rotate(k, start)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, Tk, hs)
        k, v = repeat_kv(k, self.n_head // self.n_kv_heads), repeat_kv(v, self.n_head // self.n_kv_heads)  # (B, H, Tk, hs)
        y, attention = self.attend(q, k, v, mask, positions.score_bias(q, k, start), return_attention)  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y), attention

    def attend(self, q, k, v, mask, bias, return_attention: bool):
        """softmax(q k^T / sqrt(hs) + bias, where the mask allows) v, and the weights when asked for."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_size)  # (B, H, T, Tk)
        if bias is not None:
            scores = scores + bias
        # a finite fill keeps a row with no allowed key (a padding query in a local window) from NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attention = scores.softmax(dim=-1)  # (B, H, T, Tk)
        return self.attn_dropout(attention) @ v, (attention if return_attention else None)


class FusedAttention(Attention):
    """The same attention through F.scaled_dot_product_attention (one fused kernel where the device has one, as
    nanoGPT does): for training and cached decoding, where no one reads the weights; a call that asks for them
    takes the manual path."""

    def attend(self, q, k, v, mask, bias, return_attention: bool):
        if return_attention:
            return super().attend(q, k, v, mask, bias, return_attention)
        # an additive float mask with the manual path's finite fill: a row with no allowed key stays finite
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
        if bias is not None:
            additive = additive + bias
        p = self.attn_dropout.p if self.training and isinstance(self.attn_dropout, nn.Dropout) else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=p), None


ATTENTIONS = {"manual": Attention, "sdpa": FusedAttention}


# ---------------------------------------------------------------- feedforward


class MLP(nn.Module):
    """Linear -> activation -> linear, applied to each position."""

    def __init__(self, n_embd: int, hidden: int, activation=nn.ReLU):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, hidden), activation(), nn.Linear(hidden, n_embd))

    def forward(self, x):
        return self.net(x)


class SwiGLU(nn.Module):
    """silu(x W) * (x V) then W2 (Shazeer, 2020). Three matrices instead of two, so the hidden
    size is 2/3 of the ReLU one, which keeps the parameter count within about 1%."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        hidden = round(2 * hidden / 3)
        self.gate_up = nn.Linear(n_embd, 2 * hidden)
        self.down = nn.Linear(hidden, n_embd)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


FEEDFORWARDS = {
    "relu": MLP,
    "gelu": partial(MLP, activation=nn.GELU),
    # GPT-2's GELU: the tanh approximation, within 4.8e-4 of the exact one (enough to break a 1e-5 logit match)
    "gelu_tanh": partial(MLP, activation=partial(nn.GELU, approximate="tanh")),
    "swiglu": SwiGLU,
}


# ---------------------------------------------------------------- blocks


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ff(norm(x)) (GPT-2 and later)."""

    ends_in_norm = False  # a stack of these needs a final norm after the last block

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm1 = NORMS[config.norm](config.n_embd, config.norm_eps)
        self.attention = ATTENTIONS[config.attention](config)
        self.norm2 = NORMS[config.norm](config.n_embd, config.norm_eps)
        self.feedforward = FEEDFORWARDS[config.feedforward](config.n_embd, config.ff_hidden)
        self.dropout = dropout(config.dropout)

    def forward(self, x, mask, positions, start=0, cache=None, return_attention=False):
        y, attention = self.attention(self.norm1(x), mask, positions, start, cache, return_attention)
        x = x + self.dropout(y)
        x = x + self.dropout(self.feedforward(self.norm2(x)))
        return x, attention


class PostNormBlock(Block):
    """Post-norm residual block: norm(x + attn(x)), then norm(x + ff(x)) (the original Transformer)."""

    ends_in_norm = True

    def forward(self, x, mask, positions, start=0, cache=None, return_attention=False):
        y, attention = self.attention(x, mask, positions, start, cache, return_attention)
        x = self.norm1(x + self.dropout(y))
        x = self.norm2(x + self.dropout(self.feedforward(x)))
        return x, attention


BLOCKS = {"pre": Block, "post": PostNormBlock}


# ---------------------------------------------------------------- the shared trunk


class FactorisedEmbedding(nn.Module):
    """ALBERT's factorised embedding (Lan et al., 2020): a (V, E) table, then a linear map E -> C, so the
    vocabulary costs V*E + E*C + C parameters instead of V*C (positions are still added in C space here)."""

    def __init__(self, vocab_size: int, embedding_dim: int, n_embd: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, embedding_dim)
        self.projection = nn.Linear(embedding_dim, n_embd)

    def forward(self, idx):
        return self.projection(self.table(idx))  # (B, T, C)


def token_embedding(config: TransformerConfig) -> nn.Module:
    """nn.Embedding(V, C), or ALBERT's factorised one when embedding_dim is set and differs from n_embd."""
    if config.embedding_dim in (None, config.n_embd):
        return nn.Embedding(config.vocab_size, config.n_embd)
    return FactorisedEmbedding(config.vocab_size, config.embedding_dim, config.n_embd)


class Trunk(nn.Module):
    """Token embedding, positions, the stack of blocks and the final norm, shared by encoder and decoder."""

    def __init__(self, config: TransformerConfig, causal: bool, max_len: int):
        super().__init__()
        self.token_embedding = token_embedding(config)
        self.positions = POSITIONS[config.position](config, max_len)
        self.mask = AttentionMask(config.attention_pattern, config.window, causal, max_len)
        self.dropout = dropout(config.dropout)
        # ALBERT's cross-layer sharing: one block, applied n_layer times (the same module at every index)
        distinct = 1 if config.share_layers else config.n_layer
        blocks = [BLOCKS[config.norm_placement](config) for _ in range(distinct)]
        self.blocks = nn.ModuleList(blocks[layer % distinct] for layer in range(config.n_layer))
        # a post-norm stack already ends in a norm
        ends_in_norm = BLOCKS[config.norm_placement].ends_in_norm
        self.final_norm = nn.Identity() if ends_in_norm else NORMS[config.norm](config.n_embd, config.norm_eps)

    def forward(self, x, key_mask=None, caches=None, return_attention=False):
        """x: (B, T, C) embeddings; key_mask: (B, Tk) True for real tokens. Returns (B, T, C) and maps."""
        T = x.shape[1]
        start = caches[0].length if caches else 0
        mask = self.mask(start, T, start + T)[None, None]  # (1, 1, T, Tk)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]  # (B, 1, T, Tk)
        x = self.dropout(self.positions.embed(x, start))
        attentions = []
        for layer, block in enumerate(self.blocks):
            x, attention = block(x, mask, self.positions, start, caches[layer] if caches else None, return_attention)
            attentions.append(attention)
        return self.final_norm(x), (attentions if return_attention else None)


def initialise(module: nn.Module, std: float):
    """Normal(0, std) weights and zero biases for linear and embedding layers (GPT-2's scheme)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Output(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None
    attentions: list | None  # per layer (B, H, T, Tk) when asked for


# ---------------------------------------------------------------- encoder + classifier


class MeanPooling(nn.Module):
    """Mean of the hidden states of the real (non-padding) tokens."""

    extra_tokens = 0  # positions it puts before the tokens

    def __init__(self, config):
        super().__init__()

    def prepend(self, x, key_mask):
        return x, key_mask

    def forward(self, h, key_mask):
        weights = key_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, C)


class ClsPooling(MeanPooling):
    """A learned [CLS] vector is put before the tokens; its final hidden state is the summary (BERT)."""

    extra_tokens = 1

    def __init__(self, config):
        super().__init__(config)
        self.cls = nn.Parameter(torch.randn(1, 1, config.n_embd) * 0.02)

    def prepend(self, x, key_mask):
        B = x.shape[0]
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, 1 + T, C)
        return x, torch.cat([key_mask.new_ones(B, 1), key_mask], dim=1)  # (B, 1 + T)

    def forward(self, h, key_mask):
        return h[:, 0]  # (B, C)


POOLINGS = {"mean": MeanPooling, "cls": ClsPooling}


class TransformerClassifier(nn.Module):
    """Transformer encoder, pooled, then a one-hidden-layer feedforward classifier (part one)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config.validate()
        self.pooling = POOLINGS[config.pooling](config)
        self.encoder = Trunk(config, causal=config.causal, max_len=config.block_size + self.pooling.extra_tokens)
        self.head = nn.Sequential(
            nn.Linear(config.n_embd, config.classifier_hidden), nn.ReLU(), nn.Linear(config.classifier_hidden, config.n_classes)
        )
        if config.init_std is not None:
            self.apply(partial(initialise, std=config.init_std))

    def forward(self, idx, targets=None, return_attention=False) -> Output:
        """idx: (B, T) token ids, padded with pad_id; targets: (B,) class labels."""
        key_mask = idx != self.config.pad_id  # (B, T)
        tokens = self.encoder.token_embedding(idx)  # (B, T, C)
        x, key_mask = self.pooling.prepend(tokens, key_mask)
        h, attentions = self.encoder(x, key_mask, return_attention=return_attention)
        logits = self.head(self.pooling(h, key_mask))  # (B, n_classes)
        loss = None if targets is None else F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)
        return Output(logits, loss, attentions)


# ---------------------------------------------------------------- decoder language model


class FullSoftmaxLoss(nn.Module):
    """The course's head: the whole (B, T, V) logits, then their mean cross-entropy against the targets."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.label_smoothing = config.label_smoothing

    def forward(self, head: nn.Linear, h, targets=None):
        logits = head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),  # (B*T, V) against (B*T,)
                                   label_smoothing=self.label_smoothing)
        return logits, loss


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of linear(h, weight, bias) against targets, and its gradients, `rows` rows at a time.

    With a 10,000-word vocabulary the (B*T, V) logits dominate a small decoder's training step: torch's log-softmax,
    its backward, the casts to and from bf16, and the page faults of arrays too large for malloc to keep. Here each
    block of rows is projected, normalised with one exp per logit, and turned into its gradient at once (softmax
    minus the smoothed one-hot, over N), so the forward pass already holds the gradients and the backward only scales
    them. The projection runs in `dtype` (bf16 under autocast), the softmax in fp32, as autocast would.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows: int, label_smoothing: float, dtype: torch.dtype):
        N, V = h.shape[0], weight.shape[0]
        h_cast, weight_cast = h.detach().to(dtype), weight.detach().to(dtype)
        bias_cast = None if bias is None else bias.detach().to(dtype)
        # the gradients are formed before any loss scale is applied: fp16's range would flush the small ones to 0
        # (a GradScaler cannot help), so under fp16 their products run in fp32; bf16 has fp32's range
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        h_grad_cast, weight_grad_cast = ((h_cast, weight_cast) if grad_dtype == dtype
                                         else (h.detach().to(grad_dtype), weight.detach().to(grad_dtype)))
        grad_h = torch.empty_like(h)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        grad_bias = None if bias is None else torch.zeros(V, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, N, rows):
            h_rows, target_rows = h_cast[start:start + rows], targets[start:start + rows]
            logits = F.linear(h_rows, weight_cast, bias_cast).float()  # (n, V)
            logits = logits - logits.amax(-1, keepdim=True)  # shifted: exp cannot overflow
            target_logits = logits.gather(1, target_rows[:, None]).squeeze(1)  # (n,)
            mean_logits = logits.mean(-1) if label_smoothing else None
            probs = logits.exp_()  # in place: the shifted logits are not needed again
            sums = probs.sum(-1, keepdim=True)  # (n, 1)
            log_sums = sums.log().squeeze(1)
            losses = log_sums - target_logits  # -log p(target)
            if label_smoothing:  # (1 - e) * nll + e * the mean over the vocabulary of -log p, as F.cross_entropy
                losses = (1 - label_smoothing) * losses + label_smoothing * (log_sums - mean_logits)
            total += losses.sum()
            grad = probs.div_(sums)  # softmax, (n, V)
            grad[torch.arange(len(target_rows), device=h.device), target_rows] -= 1 - label_smoothing
            if label_smoothing:
                grad.sub_(label_smoothing / V)
            grad.div_(N)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            grad = grad.to(grad_dtype)
            grad_h[start:start + rows] = grad @ weight_grad_cast  # (n, C)
            grad_weight += (grad.T @ h_grad_cast[start:start + rows]).float()  # (V, C)
        ctx.save_for_backward(grad_h, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / N

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_h * grad_loss, (grad_weight * grad_loss).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype), None, None, None, None)


class ChunkedSoftmaxLoss(FullSoftmaxLoss):
    """In training, the loss through ChunkedCrossEntropy and no logits (None); otherwise the full head's."""

    rows = 128  # a (128, 10,000) fp32 block is 5 MB: malloc keeps it, and it stays near the cache

    def forward(self, head: nn.Linear, h, targets=None):
        if targets is None or not torch.is_grad_enabled():  # evaluation and generation read the logits
            return super().forward(head, h, targets)
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        loss = ChunkedCrossEntropy.apply(h.flatten(0, 1), head.weight, head.bias, targets.flatten(),  # (B*T, C)
                                         self.rows, self.label_smoothing, dtype)
        return None, loss


LM_LOSSES = {"full": FullSoftmaxLoss, "chunked": ChunkedSoftmaxLoss}


class TransformerLM(nn.Module):
    """GPT-like decoder: causal trunk and a linear head over the vocabulary (part two)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config.validate()
        self.decoder = Trunk(config, causal=True, max_len=config.block_size)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.loss = LM_LOSSES[config.lm_loss](config)
        if config.init_std is not None:
            self.apply(partial(initialise, std=config.init_std))
        if config.tie_embeddings:  # the output matrix is the input embedding (Press & Wolf, 2017)
            self.lm_head.weight = self.decoder.token_embedding.weight

    def forward(self, idx, targets=None, caches=None, return_attention=False) -> Output:
        """idx, targets: (B, T) token ids. Returns (B, T, V) logits (None from a chunked loss in training) and the
        mean cross-entropy."""
        x = self.decoder.token_embedding(idx)  # (B, T, C)
        h, attentions = self.decoder(x, caches=caches, return_attention=return_attention)
        logits, loss = self.loss(self.lm_head, h, targets)
        return Output(logits, loss, attentions)

    def new_caches(self) -> list[KVCache]:
        """One empty KV cache per layer, for incremental decoding."""
        return [KVCache() for _ in self.decoder.blocks]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
