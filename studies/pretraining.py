"""BERT-style masked-language-model pretraining of the classifier's encoder (its gap to naive Bayes: docs/classifier_gap.md).

Why a module of its own: the classifier learns from 2,085 labelled segments only, while the rules also allow the
unlabelled training text (train_LM.txt and the text of train_CLS.tsv, about twice as much); pretraining the encoder
on it as a masked language model (Devlin et al., 2019) is the standard way to use that text. It needs its own
model (the encoder with an MLM head), its own batches (masking drawn on the fly) and a reserved [MASK] id, none of
which the course model should carry: so it sits above training.py and hands train_classifier a `build_model` that
starts from the pretrained encoder; the MLM head is thrown away.

The [MASK] id is the tokenizer's vocabulary size: one id past the last word (<pad> 0, <unk> 1, words 2..V-1), so
it never collides with a word. Only a pretrained classifier is built one row larger (vocab_size V + 1); the course
model and the presets are untouched.
"""

import time
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import training
from dataset import EpochBatches, encode_segments, stratified_split
from tokenizer import FIRST_WORD_ID, PAD_ID
from transformer import LayerNorm, Output, TransformerClassifier, TransformerConfig, Trunk, count_parameters, initialise

IGNORE = -100  # F.cross_entropy's ignore_index: positions that were not chosen carry no loss


@dataclass(frozen=True)
class MaskingConfig:
    """The pretraining: BERT's masking proportions and the optimisation (AdamW, warm-up, cosine decay)."""

    rate: float = 0.15  # share of the real (non-padding) positions chosen for prediction
    to_mask: float = 0.8  # of the chosen: replaced by [MASK]
    to_random: float = 0.1  # of the chosen: replaced by a random word; the rest stay unchanged
    steps: int = 2000
    learning_rate: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 100
    weight_decay: float = 0.01  # BERT's
    eval_every: int = 500
    precision: str = "fp32"  # the training forward pass's autocast (training.PRECISIONS)

    def validate(self) -> "MaskingConfig":
        if not (0 < self.rate < 1 and min(self.to_mask, self.to_random) >= 0 and self.to_mask + self.to_random <= 1):
            raise ValueError(f"masking shares out of range: rate {self.rate}, mask {self.to_mask}, random {self.to_random}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        return self

    def training(self) -> training.TrainingConfig:
        """The same optimiser and schedule as the fine-tuning's, with the pretraining's numbers."""
        return training.TrainingConfig(batch_size=self.batch_size, learning_rate=self.learning_rate,
                                       weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                                       cosine_decay=True, max_iters=self.steps, precision=self.precision).validate()


def mask_tokens(ids: torch.Tensor, mask_id: int, masking: MaskingConfig, generator: torch.Generator,
                pad_id: int = PAD_ID, first: int = FIRST_WORD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for (B, T) ids: each real position is chosen with probability masking.rate; a chosen one
    becomes [MASK] (to_mask), a random word (to_random: an id from `first` up to [MASK]) or stays, and is the only
    kind of position with a target."""
    chosen = (torch.rand(ids.shape, generator=generator) < masking.rate) & (ids != pad_id)  # (B, T)
    action = torch.rand(ids.shape, generator=generator)  # which of the three a chosen position gets
    random_words = torch.randint(first, mask_id, ids.shape, generator=generator)
    inputs = torch.where(chosen & (action < masking.to_mask), mask_id, ids)
    to_random = chosen & (action >= masking.to_mask) & (action < masking.to_mask + masking.to_random)
    inputs = torch.where(to_random, random_words, inputs)
    return inputs, ids.masked_fill(~chosen, IGNORE)


class MaskedLM(nn.Module):
    """The classifier's encoder (same Trunk, same names) with BERT's MLM head: dense, GELU, norm, then the
    token embedding transposed (tied) plus a bias. Logits only at the positions that have a target."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config.validate()
        if config.embedding_dim not in (None, config.n_embd) or config.pooling != "mean":
            raise ValueError("MLM pretraining needs a plain token table and mean pooling (the encoder's shapes)")
        self.encoder = Trunk(config, causal=False, max_len=config.block_size)
        self.transform = nn.Sequential(nn.Linear(config.n_embd, config.n_embd), nn.GELU(),
                                       LayerNorm(config.n_embd, config.norm_eps))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        if config.init_std is not None:
            self.apply(partial(initialise, std=config.init_std))

    def forward(self, idx, targets=None) -> Output:
        """idx: (B, T) masked ids; targets: (B, T) original ids at the chosen positions, IGNORE elsewhere.
        Returns (N, V) logits for the N chosen positions (all positions without targets) and their mean loss."""
        key_mask = idx != self.config.pad_id  # (B, T)
        h, _ = self.encoder(self.encoder.token_embedding(idx), key_mask)  # (B, T, C)
        where = targets != IGNORE if targets is not None else key_mask  # (B, T)
        logits = self.transform(h[where]) @ self.encoder.token_embedding.weight.T + self.bias  # (N, V)
        loss = None if targets is None else F.cross_entropy(logits, targets[where])
        return Output(logits, loss, None)


class MaskedBatches:
    """Endless shuffled epochs of rows, each batch masked afresh (dynamic masking, as RoBERTa)."""

    def __init__(self, rows: torch.Tensor, mask_id: int, masking: MaskingConfig, generator: torch.Generator,
                 first: int = FIRST_WORD_ID):
        self.epochs = EpochBatches(rows, torch.zeros(len(rows), dtype=torch.long), masking.batch_size, generator)
        self.mask_id, self.masking, self.generator, self.first = mask_id, masking, generator, first

    def __iter__(self):
        return self

    def __next__(self):
        ids, _ = next(self.epochs)
        return mask_tokens(ids, self.mask_id, self.masking, self.generator, first=self.first)


def unlabelled_texts(data, held_out: set[str]) -> list[str]:
    """The lines of train_LM.txt and the segments of train_CLS.tsv, each distinct text once, without any text
    that is or holds a held-out (validation) segment: validation then measures segments the encoder never read."""
    texts = dict.fromkeys(line.strip() for line in data.train_lm.splitlines())
    texts.update(dict.fromkeys(data.train_cls.texts))
    return [text for text in texts if text and not any(segment in text for segment in held_out)]


def pretraining_rows(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Each text's token ids cut into pieces of block_size (a long train_LM line gives several), right-padded;
    pieces of one token are dropped (nothing to predict it from): (N, block_size)."""
    pieces = [piece for ids in map(tokenizer.encode, texts)
              for piece in (ids[start:start + block_size] for start in range(0, len(ids), block_size)) if len(piece) > 1]
    rows = torch.full((len(pieces), block_size), PAD_ID, dtype=torch.long)
    for row, piece in enumerate(pieces):
        rows[row, :len(piece)] = torch.tensor(piece)
    return rows


def with_mask_row(config: TransformerConfig, tokenizer) -> TransformerConfig:
    """The model config one id larger than the tokenizer's vocabulary: the last id is [MASK]."""
    return replace(config, vocab_size=tokenizer.vocab_size + 1).validate()


def validation_segments(run, training_config: training.TrainingConfig) -> list[str]:
    """The texts of the classifier's validation segments: train_classifier's split (it depends on the data only)."""
    if training_config.validation_fraction <= 0:
        return []
    _, held_out = stratified_split(run.data.train_cls.labels, training_config.validation_fraction, seed=0)
    return [run.data.train_cls.texts[index] for index in held_out.tolist()]


@torch.no_grad()
def masked_loss(model: MaskedLM, rows: torch.Tensor, mask_id: int, masking: MaskingConfig, device,
                first: int = FIRST_WORD_ID) -> float:
    """Mean MLM loss over the chosen positions of `rows`, masked once with a fixed generator (comparable across steps)."""
    model.eval()
    inputs, targets = mask_tokens(rows, mask_id, masking, torch.Generator().manual_seed(0), first=first)
    return model(inputs.to(device), targets.to(device)).loss.item()


def pretrain(run, config: TransformerConfig, masking: MaskingConfig, seed: int, held_out: list[str], log=print,
             texts: list[str] | None = None):
    """Pretrain an encoder as a masked language model on `texts` (default: the unlabelled training text) without
    `held_out`; return the MaskedLM (config one id larger than the vocabulary, see with_mask_row) and its report."""
    masking = masking.validate()
    config = with_mask_row(config, run.tokenizer)
    mask_id = config.vocab_size - 1
    torch.manual_seed(seed)
    model = MaskedLM(config).to(run.device)
    if texts is None:
        texts = unlabelled_texts(run.data, set(held_out))
    rows = pretraining_rows(run.tokenizer, texts, config.block_size)
    validation = encode_segments(run.tokenizer, held_out, config.block_size) if held_out else None
    first = run.tokenizer.first_ordinary_id  # a random replacement is never a special token
    batches = MaskedBatches(rows, mask_id, masking, torch.Generator().manual_seed(seed), first)

    def evaluate(step, recent):
        row = {"step": step, "train_loss": sum(loss for loss, _, _ in recent) / len(recent)}
        if validation is not None:  # reported, not used to stop: the fine-tuning's validation accuracy chooses
            row["validation_loss"] = masked_loss(model, validation, mask_id, masking, run.device, first)
        log(f"  MLM step {step:>5} | train loss {row['train_loss']:.3f}"
            + (f" | validation loss {row['validation_loss']:.3f}" if validation is not None else ""))
        return row

    started = time.perf_counter()
    history = training.fit(model, batches, masking.steps, masking.eval_every, evaluate, masking.training(), run.device,
                           count_correct=False)
    return model, {"rows": len(rows), "num_parameters": count_parameters(model), "history": history,
                   "seconds": time.perf_counter() - started}


def from_encoder(encoder: Trunk):
    """A build_model for training.train_classifier: a fresh classifier (head initialised as usual) whose encoder
    starts as a copy of `encoder`."""
    def build(config: TransformerConfig) -> TransformerClassifier:
        model = TransformerClassifier(config)
        model.encoder.load_state_dict(encoder.state_dict())
        return model
    return build


def train_pretrained_classifier(run, config: TransformerConfig, settings: training.TrainingConfig,
                                masking: MaskingConfig, seed: int, log=print, pretrained: tuple | None = None,
                                wrap_builder=None, wrap_batches=None):
    """Pretrain on the unlabelled text without the validation segments, then fine-tune with `settings` (selection
    and refit both start from that encoder); return the fine-tuned TrainResult (its seconds include the pretraining)
    and the pretraining's report.
    pretrained: a (MaskedLM, report) that pretrain() returned for the same arguments, to fine-tune it again;
    wrap_builder: turns the classifier factory into another (averaging.ema_builder's `inner`); wrap_batches: as for
    training.train_classifier."""
    mlm, pretraining = pretrained or pretrain(run, config, masking, seed, validation_segments(run, settings), log)
    build = from_encoder(mlm.encoder.cpu())
    result = training.train_classifier(run, with_mask_row(config, run.tokenizer), settings, seed, log,
                                       build_model=wrap_builder(build) if wrap_builder else build, wrap_batches=wrap_batches)
    return replace(result, train_seconds=result.train_seconds + pretraining["seconds"]), pretraining
