"""A T5-style encoder-decoder (Raffel et al., 2020) from transformer.py's parts, in reading order:
cross-attention -> decoder block -> the model -> a source-conditioned view that generation.py decodes.

Its own module, beside transformer.py (the same layer: torch and transformer.py only), because cross-attention
and a three-sublayer decoder block are a second model family; transformer.py keeps its lecture order and its
speed work, and nothing here changes it. Positions follow the config (learned by default), not T5's relative bias.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from transformer import (
    FEEDFORWARDS,
    NORMS,
    POSITIONS,
    Attention,
    AttentionMask,
    KVCache,
    Output,
    TransformerConfig,
    Trunk,
    dropout,
    repeat_kv,
)


class CrossCache(KVCache):
    """A decoder layer's cache: its self-attention keys and values (growing), and the cross-attention keys and
    values of the source, computed once. The source's are (1, H_kv, S, hs): every beam shares one source."""

    def __init__(self):
        super().__init__()
        self.source_keys = self.source_values = None


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's output; padded source tokens get no weight."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_heads = config.n_kv_heads or config.n_head
        self.head_size = config.n_embd // config.n_head
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key_value = nn.Linear(config.n_embd, 2 * self.n_kv_heads * self.head_size)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def source_keys_values(self, memory):
        """(B, S, C) encoder output -> keys and values, each (B, H_kv, S, hs)."""
        B, S, _ = memory.shape
        kv = self.key_value(memory).view(B, S, 2 * self.n_kv_heads, self.head_size).transpose(1, 2)  # (B, 2Hkv, S, hs)
        return kv.split(self.n_kv_heads, dim=1)

    def forward(self, x, memory, source_mask, cache=None, return_attention=False):
        """x: (B, T, C); memory: (B or 1, S, C); source_mask: (B or 1, S) True for real source tokens."""
        B, T, C = x.shape
        if cache is None:
            k, v = self.source_keys_values(memory)
        else:  # once per source: later steps reuse them
            if cache.source_keys is None:
                cache.source_keys, cache.source_values = self.source_keys_values(memory)
            k, v = cache.source_keys, cache.source_values
        group = self.n_head // self.n_kv_heads
        k, v = repeat_kv(k, group), repeat_kv(v, group)  # (B or 1, H, S, hs)
        q = self.query(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, H, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_size)  # (B, H, T, S)
        scores = scores.masked_fill(~source_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attention = scores.softmax(dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y), (attention if return_attention else None)


class DecoderBlock(nn.Module):
    """Pre-norm: x + causal self-attention, then x + cross-attention to the source, then x + feedforward."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm1 = NORMS[config.norm](config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.norm_cross = NORMS[config.norm](config.n_embd, config.norm_eps)
        self.cross_attention = CrossAttention(config)
        self.norm2 = NORMS[config.norm](config.n_embd, config.norm_eps)
        self.feedforward = FEEDFORWARDS[config.feedforward](config.n_embd, config.ff_hidden)
        self.dropout = dropout(config.dropout)

    def forward(self, x, mask, positions, memory, source_mask, start=0, cache=None, return_attention=False):
        y, self_map = self.attention(self.norm1(x), mask, positions, start, cache, return_attention)
        x = x + self.dropout(y)
        y, cross_map = self.cross_attention(self.norm_cross(x), memory, source_mask, cache, return_attention)
        x = x + self.dropout(y)
        x = x + self.dropout(self.feedforward(self.norm2(x)))
        return x, (self_map, cross_map)


class EncoderDecoder(nn.Module):
    """Encoder (transformer.Trunk, bidirectional) and decoder (causal self-attention + cross-attention), one shared
    token embedding as in T5, and a linear head. block_size bounds both the source and the target length."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config.validate()
        if config.norm_placement != "pre":
            raise ValueError("the encoder-decoder is pre-norm only")
        self.encoder = Trunk(config, causal=False, max_len=config.block_size)  # its token embedding serves both sides
        self.positions = POSITIONS[config.position](config, config.block_size)
        self.mask = AttentionMask(config.attention_pattern, config.window, True, config.block_size)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layer))
        self.final_norm = NORMS[config.norm](config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)

    def encode(self, source):
        """source: (B, S) ids padded with pad_id -> (B, S, C) memory and the (B, S) mask of real tokens."""
        source_mask = source != self.config.pad_id
        memory, _ = self.encoder(self.encoder.token_embedding(source), source_mask)
        return memory, source_mask

    def decode(self, target, memory, source_mask, caches=None, return_attention=False):
        """target: (B, T) decoder input ids -> (B, T, V) logits and, if asked, per layer (self, cross) maps."""
        T = target.shape[1]
        start = caches[0].length if caches else 0
        mask = self.mask(start, T, start + T)[None, None]  # (1, 1, T, Tk)
        x = self.positions.embed(self.encoder.token_embedding(target), start)
        maps = []
        for layer, block in enumerate(self.blocks):
            cache = caches[layer] if caches else None
            x, layer_maps = block(x, mask, self.positions, memory, source_mask, start, cache, return_attention)
            maps.append(layer_maps)
        return self.lm_head(self.final_norm(x)), (maps if return_attention else None)

    def forward(self, pair, targets=None, return_attention=False) -> Output:
        """pair: (source (B, S), decoder input (B, T)); targets: (B, T), pad_id where there is nothing to predict."""
        source, target = pair
        memory, source_mask = self.encode(source)
        logits, maps = self.decode(target, memory, source_mask, return_attention=return_attention)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.config.pad_id,
                                   label_smoothing=self.config.label_smoothing)
        return Output(logits, loss, maps)

    def conditioned_on(self, source_ids: list[int]) -> "SourceConditioned":
        """A decoder-only view of this model given one source, for generation.generate."""
        with torch.no_grad():
            memory, source_mask = self.encode(torch.tensor([source_ids], device=self.lm_head.weight.device))
        return SourceConditioned(self, memory, source_mask)


class SourceConditioned(nn.Module):
    """The decoder with the encoder's output fixed: it has TransformerLM's interface (config, forward(idx, caches),
    new_caches), so generation.py's greedy, sampling and beam search decode it unchanged."""

    def __init__(self, model: EncoderDecoder, memory, source_mask):
        super().__init__()
        self.model, self.config = model, model.config
        self.memory, self.source_mask = memory, source_mask  # (1, S, C), (1, S): broadcast over beams

    def forward(self, idx, targets=None, caches=None, return_attention=False) -> Output:
        logits, maps = self.model.decode(idx, self.memory, self.source_mask, caches, return_attention)
        return Output(logits, None, maps)

    def new_caches(self) -> list[CrossCache]:
        """One empty cache per decoder layer; each computes its source keys and values on first use."""
        return [CrossCache() for _ in self.model.blocks]
