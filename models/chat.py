"""The chat format: how an instruction-tuned decoder reads a conversation, what it learns from, what it is shown.

A conversation is a list of turns (role, text), role system | user | assistant. Each turn is its role's marker
token, the text's tokens and an end-of-turn token:

    <system> Answer questions about ... <end> <user> Who said this ... <end> <assistant> Barack Obama <end>

The four markers are tokens of their own, appended after the pretrained vocabulary's last id
(`WordTokenizer.with_added`) and to the embedding table (`with_vocabulary`), so no existing id moves. Text never
produces them: the word tokenizer splits "<user>" into "<", "user", ">", so typing a marker cannot forge a turn.
Supervised fine-tuning learns from the assistant's tokens alone, each answer with the <end> that closes it
(`ChatFormat.encode`'s mask), every conversation weighing the same however long its answers (`AnswerLoss`); a
prompt ends with <assistant> and the model writes until it writes <end>.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer import PAD_ID, UNK_ID
from transformer import Output, TransformerLM

ROLES = {"system": "<system>", "user": "<user>", "assistant": "<assistant>"}
END = "<end>"
CHAT_TOKENS = (*ROLES.values(), END)
IGNORE = -100  # F.cross_entropy's ignore_index: a target that carries no loss
SYSTEM_PROMPT = "Answer questions about the State of the Union addresses."
# the tensors whose rows are the vocabulary's: grown with it
VOCABULARY_ROWS = ("decoder.token_embedding.weight", "decoder.token_embedding.table.weight", "lm_head.weight",
                   "lm_head.bias")


class NotInstructionTuned(ValueError):
    """A tokenizer (or checkpoint) without the chat tokens."""


@dataclass
class Prompt:
    """A conversation's ids as the model is shown them, and what had to go to fit its context."""

    ids: list[int]
    dropped_turns: int  # the oldest turns left out
    cut_tokens: int  # tokens cut from the left of the latest turn, when even it alone is too long


class ChatFormat:
    """Encodes conversations with a tokenizer that holds CHAT_TOKENS, and decodes them back to turns."""

    def __init__(self, tokenizer):
        missing = [token for token in CHAT_TOKENS if token not in tokenizer.stoi]
        if missing:
            raise NotInstructionTuned(f"its tokenizer lacks the chat tokens {' '.join(missing)}: it is not "
                                      "instruction-tuned (python main.py --part three --instruct saves one in OUT/chat_model)")
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.stoi[token] for role, token in ROLES.items()}
        self.end_id = tokenizer.stoi[END]
        self.roles = {index: role for role, index in self.role_ids.items()}

    @property
    def never_written(self) -> set[int]:
        """Ids an answer never holds: padding, <unk>, and a marker that would open a turn (<end> closes it)."""
        return {PAD_ID, UNK_ID, *self.role_ids.values()}

    def encode_turn(self, role: str, text: str) -> list[int]:
        """<role> text <end>."""
        return [self.role_ids[role], *self.tokenizer.encode(text), self.end_id]

    def encode(self, turns) -> tuple[list[int], list[bool]]:
        """The conversation's ids, and per id whether the model learns to write it (an assistant's text and <end>)."""
        ids, learned = [], []
        for role, text in turns:
            turn = self.encode_turn(role, text)
            ids += turn
            learned += [False] + [role == "assistant"] * (len(turn) - 1)  # the marker itself is given, not learned
        return ids, learned

    def decode(self, ids) -> list[tuple[str, str]]:
        """Turns (role, text) back from ids: a marker opens a turn, <end> closes it."""
        turns, content = [], None
        for index in ids:
            if index in self.roles:
                content = []
                turns.append((self.roles[index], content))
            elif index != self.end_id and content is not None:
                content.append(index)
        return [(role, self.tokenizer.decode(content)) for role, content in turns]

    def training_pair(self, turns, max_len: int) -> tuple[list[int], list[int]]:
        """(inputs, targets) of one conversation cut to max_len inputs: targets are the next ids, IGNORE where the
        next id is not the assistant's to write."""
        ids, learned = self.encode(turns)
        ids, learned = ids[: max_len + 1], learned[: max_len + 1]
        return ids[:-1], [index if learn else IGNORE for index, learn in zip(ids[1:], learned[1:])]

    def prompt(self, turns, max_context: int, reserve: int = 0) -> Prompt:
        """The conversation followed by <assistant>, in at most max_context - reserve ids: a system turn first is
        kept, then the latest turns that fit, oldest dropped first; a latest turn longer than all of it keeps its
        last ids (its marker kept)."""
        budget = max_context - reserve - 1  # the closing <assistant>
        system = [self.encode_turn(*turns[0])] if turns and turns[0][0] == "system" else []
        rest = [self.encode_turn(*turn) for turn in turns[len(system):]]
        budget -= sum(map(len, system))
        if budget < 2:
            raise ValueError(f"a context of {max_context} tokens leaves no room for the conversation")
        kept = []
        for turn in reversed(rest):
            if sum(map(len, kept)) + len(turn) > budget:
                break
            kept.insert(0, turn)
        cut = 0
        if rest and not kept:  # the latest turn alone is too long: its marker and its last ids
            latest = rest[-1]
            cut = len(latest) - budget
            kept = [[latest[0], *latest[1 + cut:]]]
        ids = [index for turn in (*system, *kept) for index in turn] + [self.role_ids["assistant"]]
        return Prompt(ids, len(rest) - len(kept), cut)


def with_vocabulary(model: TransformerLM, vocab_size: int, **changes) -> TransformerLM:
    """A copy of `model` whose vocabulary is vocab_size ids: the old rows unchanged, each new row of the embedding
    (and output bias) the mean of the old ones, so a new token starts as an average word rather than noise (Hewitt,
    2021, "Initializing new word embeddings for pretrained language models"). `changes`: other config fields that
    leave the weights' shapes alone (the attention's path, dropout)."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"a vocabulary of {vocab_size} would drop ids of the model's {old}")
    grown = TransformerLM(replace(model.config, vocab_size=vocab_size, **changes))
    state = model.state_dict()
    for name in VOCABULARY_ROWS:
        if name in state:
            rows = state[name]  # (V, ...)
            state[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(vocab_size - old, *rows.shape[1:])])
    grown.load_state_dict(state)
    return grown.to(next(model.parameters()).device)


class AnswerLoss(nn.Module):
    """The fine-tuning objective of a decoder on conversations: the cross-entropy of the assistant's tokens (targets
    other than IGNORE), averaged within each conversation, then over the batch. A token-level mean would let the
    long answers (a 25-word sentence) drown the short ones (a name, a decade); and only the answer positions go
    through the output layer, which over a 5,000-word vocabulary costs about what the whole trunk does."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def summed(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets: (B, T). Returns (B,) each row's loss summed over its answer tokens (-log P of its answers)."""
        h, _ = self.model.decoder(self.model.decoder.token_embedding(idx))  # (B, T, C)
        answer = targets != IGNORE  # (B, T)
        logits = self.model.lm_head(h[answer])  # (N, V): the answer positions only
        losses = F.cross_entropy(logits.float(), targets[answer], reduction="none")  # (N,)
        rows = answer.nonzero()[:, 0]  # (N,) the conversation of each answer token
        return torch.zeros(len(idx), device=idx.device).index_add(0, rows, losses)  # (B,)

    def per_conversation(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets: (B, T). Returns (B,) each row's mean loss over its answer tokens."""
        return self.summed(idx, targets) / (targets != IGNORE).sum(1).clamp(min=1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> Output:
        return Output(None, self.per_conversation(idx, targets).mean(), None)
