"""Starting a course model from a pretrained one: which weights carry over, and what must match first.

A decoder pretrained by next-token prediction starts either the part-two decoder (every weight) or, GPT-1 style
(Radford et al., 2018), a classifier with a causal trunk (`TransformerConfig.causal`): its trunk takes the decoder's
trunk, and the head is new. An encoder (a classifier checkpoint, such as the MLM-pretrained encoder with a fresh
head) starts a classifier's trunk. Learned positions may be cut: a decoder pretrained on 128-token windows starts a
classifier of the course's 32-token segments with its first 32 position vectors. Anything else that differs, the
vocabulary above all, is an error named in one line before any training: a word id that means another word in the
checkpoint would silently train on nonsense.
"""

from dataclasses import replace

import torch

import utilities
from transformer import POOLINGS, TransformerClassifier, TransformerConfig, TransformerLM

TRUNKS = {"lm": "decoder.", "classifier": "encoder."}  # a checkpoint kind -> its trunk's state_dict prefix
POSITION_TABLE = "positions.embedding.weight"  # LearnedPositions' (max_len, C) table: may be cut to a shorter context
# what may differ between the pretrained model and the one it starts: the head's sizes and training-only options
FREE = {"block_size", "n_classes", "classifier_hidden", "dropout", "label_smoothing", "pooling", "causal", "attention",
        "init_std", "tie_embeddings"}


class Pretrained:
    """A checkpoint read once: its kind (lm | classifier), config, weights and tokenizer JSON."""

    def __init__(self, directory):
        model, self.tokenizer_json, self.metrics = utilities.build_and_load(directory)
        self.directory, self.config = directory, model.config
        self.kind = "lm" if isinstance(model, TransformerLM) else "classifier"
        self.state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def check(self, tokenizer_json: str, task: str):
        """ValueError naming what does not fit: another vocabulary, or a task the checkpoint cannot start."""
        if self.tokenizer_json.strip() != tokenizer_json.strip():
            raise ValueError(f"{self.directory}: its tokenizer.json is not this run's vocabulary (pretrain with the same "
                             "data and --tokenizer, or fine-tune on the data it was built from)")
        if task == "lm" and self.kind != "lm":
            raise ValueError(f"{self.directory}: holds a classifier; --part two and --generative start only from a "
                             "decoder (model 'lm')")

    def config_for(self, task: str, base: TransformerConfig) -> TransformerConfig:
        """`base` (the run's config for `task`) with the checkpoint's sizes and variants: those decide the weights'
        shapes; the head's sizes, the context (cut, never longer) and the training options stay `base`'s."""
        kept = {name: getattr(base, name) for name in FREE if name != "tie_embeddings"}
        config = replace(self.config, **kept, tie_embeddings=self.config.tie_embeddings if task == "lm" else False)
        if task == "classifier":
            config = replace(config, causal=self.kind == "lm" or self.config.causal)
        positions = config.block_size + (POOLINGS[config.pooling].extra_tokens if task == "classifier" else 0)
        if positions > self.config.block_size:  # a [CLS] pooling's extra token needs a position too
            raise ValueError(f"{self.directory}: pretrained on {self.config.block_size}-token windows; "
                             f"a model of {positions} positions cannot start from it")
        return config.validate()

    def trunk(self) -> dict:
        """The trunk's tensors without their prefix."""
        prefix = TRUNKS[self.kind]
        return {name[len(prefix):]: tensor for name, tensor in self.state_dict.items() if name.startswith(prefix)}

    def start(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` (built from config_for) with the pretrained weights loaded: all of a decoder's into a decoder,
        the trunk into a classifier's (its head as initialised)."""
        trunk = model.decoder if isinstance(model, TransformerLM) else model.encoder
        weights = self.trunk()
        table = weights.get(POSITION_TABLE)
        if table is not None:
            weights[POSITION_TABLE] = table[:trunk.state_dict()[POSITION_TABLE].shape[0]]
        trunk.load_state_dict(weights)
        if isinstance(model, TransformerLM):
            model.lm_head.load_state_dict({"weight": self.state_dict["lm_head.weight"], "bias": self.state_dict["lm_head.bias"]})
        return model

    def builder(self, task: str):
        """A build_model for training.train_language_model (task lm) or train_classifier (task classifier)."""
        if task == "lm":
            return lambda config, train_stream=None: self.start(TransformerLM(config))
        return lambda config: self.start(TransformerClassifier(config))
