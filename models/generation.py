"""Text generation from a trained decoder: greedy, sampling, top-k, top-p and beam search, with a KV cache.

Split from transformer.py (the model components) because decoding is a job of its own; it only calls
the decoder's forward pass with per-layer KV caches.
"""

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from transformer import TransformerLM

# Decoding appends one token at a time. The model sees at most the last `max_context` tokens
# (default: block_size, the length it was trained on). A KV cache makes a step cost one new token
# instead of the whole context, as long as the context fits in the window (see ContextWindow).

STRATEGIES = ("greedy", "sample", "top-k", "top-p", "beam")


@contextmanager
def inference(model: nn.Module):
    """Eval mode (no dropout) and no gradients inside the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class ContextWindow:
    """Next-token logits of growing sequences, seen through a window of the last `max_context` tokens.

    While the sequences fit in the window, each call feeds only the tokens added since the last call;
    the KV cache holds the keys and values of the others. Once they are longer than the window, the
    oldest token drops out: every cached key and value was computed with it in view (and, with learned
    positions, at a position index that has since shifted), so the window is recomputed from scratch,
    renumbered from position 0, each step. That is exactly what `use_cache=False` does, at its cost.
    """

    def __init__(self, model: "TransformerLM", max_context: int, use_cache: bool = True):
        self.model, self.max_context, self.use_cache = model, max_context, use_cache
        self.caches, self.fed = None, 0  # fed: tokens per sequence already in the caches

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) the whole sequences so far. Returns (B, V) logits of the next token."""
        if self.caches is None or tokens.shape[1] > self.max_context:
            tokens = tokens[:, -self.max_context :]  # (B, <= max_context)
            self.caches, self.fed = (self.model.new_caches() if self.use_cache else None), 0
        logits = self.model(tokens[:, self.fed :], caches=self.caches).logits[:, -1]  # (B, V)
        self.fed = tokens.shape[1]
        return logits

    def select(self, rows: torch.Tensor):
        """Keep (and reorder) the cached sequences `rows`, as beam search does when beams branch."""
        for cache in self.caches or []:
            if cache.keys is not None:
                cache.keys, cache.values = cache.keys[rows], cache.values[rows]


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Divide by temperature, then set to -inf all but the top_k largest (ties at the k-th kept) and all
    but the smallest set of most likely tokens whose probability reaches top_p (nucleus, Holtzman et al.)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop = (above >= top_p).scatter(-1, order, above >= top_p)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def suppress(scores: torch.Tensor, ids) -> torch.Tensor:
    """Scores of the tokens `ids` (ones never to generate, such as <pad>) set to -inf."""
    if not ids:
        return scores
    return scores.index_fill(-1, torch.tensor(list(ids), device=scores.device), float("-inf"))


def choose_token(logits, strategy, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids: the argmax for greedy, else a draw from the filtered distribution."""
    if strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    # drawn where the generator lives: a CPU generator with a CUDA model (torch.multinomial refuses the pair)
    # gives the draws it gives on the CPU
    where = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(where), 1, generator=generator).squeeze(-1).to(logits.device)


def decode(window: ContextWindow, prompt: torch.Tensor, max_new_tokens: int, choose, eos_id=None, suppress_ids=()):
    """Yield choose(logits) up to max_new_tokens times, each as soon as it is chosen, stopping after eos_id."""
    tokens = prompt  # (1, T)
    for _ in range(max_new_tokens):
        next_id = choose(suppress(window.logits(tokens), suppress_ids))  # (1,)
        tokens = torch.cat([tokens, next_id[:, None]], dim=1)  # (1, T + 1)
        yield next_id.item()
        if next_id.item() == eos_id:
            break


def beam_search(window: ContextWindow, prompt: torch.Tensor, max_new_tokens: int, beams: int = 4,
                temperature: float = 1.0, eos_id: int | None = None, length_alpha: float = 1.0,
                suppress_ids=()) -> list[int]:
    """Keep the `beams` continuations with the highest summed log-probability; a beam ends at eos_id.
    Return the one, ended or not, with the best score / length**length_alpha (length: new tokens)."""
    start = prompt.shape[1]
    tokens, scores, done = prompt, torch.zeros(1, device=prompt.device), []  # (n, T), (n,)
    for _ in range(max_new_tokens):
        log_probs = suppress(F.log_softmax(window.logits(tokens) / temperature, dim=-1), suppress_ids)  # (n, V)
        V = log_probs.shape[-1]
        scores, index = (scores[:, None] + log_probs).flatten().topk(min(beams, log_probs.numel()))  # (beams,)
        parents, next_ids = index // V, index % V
        tokens = torch.cat([tokens[parents], next_ids[:, None]], dim=1)  # (beams, T + 1)
        ended = next_ids == (-1 if eos_id is None else eos_id)  # no id is -1: nothing ends without eos_id
        done += [(row[start:].tolist(), score.item()) for row, score in zip(tokens[ended], scores[ended])]
        tokens, scores = tokens[~ended], scores[~ended]
        window.select(parents[~ended])
        if not len(tokens):
            break
    done += [(row[start:].tolist(), score.item()) for row, score in zip(tokens, scores)]
    return max(done, key=lambda beam: beam[1] / max(len(beam[0]), 1) ** length_alpha)[0]


def check_generation(model, prompt_ids, max_new_tokens, strategy, temperature, top_k, top_p, beams, max_context):
    """Raise ValueError with a one-line reason for arguments generate() cannot use."""
    config = model.config
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if not all(0 <= i < config.vocab_size for i in prompt_ids):
        raise ValueError(f"prompt ids must be in [0, {config.vocab_size}), got {prompt_ids}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    if strategy != "greedy" and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if strategy == "top-k" and top_k is None:
        raise ValueError("strategy 'top-k' needs top_k")
    if strategy == "top-p" and top_p is None:
        raise ValueError("strategy 'top-p' needs top_p")
    if beams < 1:
        raise ValueError(f"beams must be at least 1, got {beams}")
    if max_context < 1:
        raise ValueError(f"max_context must be positive, got {max_context}")
    if config.position == "learned" and max_context > config.block_size:
        raise ValueError(f"learned positions stop at block_size ({config.block_size}), so max_context "
                         f"{max_context} needs another position scheme")


def stream(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, strategy: str = "greedy",
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, beams: int = 4,
           generator: torch.Generator | None = None, use_cache: bool = True, *, eos_id: int | None = None,
           max_context: int | None = None, length_alpha: float = 1.0, suppress_ids=()):
    """generate()'s new tokens, yielded one by one as they are chosen (beam search's all at once at the end: only
    then is the best beam known). The arguments are checked before the first token is asked for."""
    max_context = model.config.block_size if max_context is None else max_context
    check_generation(model, prompt_ids, max_new_tokens, strategy, temperature, top_k, top_p, beams, max_context)

    def tokens():
        device = next(model.parameters()).device
        prompt = torch.tensor([prompt_ids], device=device)  # (1, T)
        window = ContextWindow(model, max_context, use_cache)
        with inference(model):
            if strategy == "beam":
                yield from beam_search(window, prompt, max_new_tokens, beams, temperature, eos_id, length_alpha,
                                       suppress_ids)
                return
            choose = partial(choose_token, strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)
            yield from decode(window, prompt, max_new_tokens, choose, eos_id, suppress_ids)

    return tokens()


def generate(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, strategy: str = "greedy",
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, beams: int = 4,
             generator: torch.Generator | None = None, use_cache: bool = True, *, eos_id: int | None = None,
             max_context: int | None = None, length_alpha: float = 1.0, suppress_ids=()) -> list[int]:
    """The new tokens (not the prompt) that `model` continues `prompt_ids` with.

    greedy takes the argmax and ignores temperature, top_k and top_p; sample, top-k and top-p draw
    from softmax(filter_logits(...)), each applying whichever of top_k and top_p is given; beam runs
    beam_search with log_softmax(logits / temperature). Generation stops after eos_id (included).
    The model sees the last max_context tokens (default block_size; beyond it only for schemes other
    than learned positions, whose buffers grow). suppress_ids are never generated (e.g. <pad>, <unk>).
    """
    return list(stream(model, prompt_ids, max_new_tokens, strategy, temperature, top_k, top_p, beams, generator,
                       use_cache, eos_id=eos_id, max_context=max_context, length_alpha=length_alpha,
                       suppress_ids=suppress_ids))
