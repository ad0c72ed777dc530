"""What every subcommand shares: a parser whose errors are one line, and loading a saved decoder with its tokenizer."""

import argparse
from pathlib import Path

import utilities
from tokenizer import tokenizer_from_json


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line on stderr (main.py's parsers use it too)."""

    def error(self, message):
        """One line and exit status 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_decoder(checkpoint: Path, purpose: str):
    """(model, tokenizer JSON) of a saved decoder; a classifier's checkpoint raises ValueError naming `purpose`."""
    model, tokenizer_json, _ = utilities.build_and_load(checkpoint)
    if not hasattr(model, "lm_head"):
        raise ValueError(f"{checkpoint}: holds a classifier; {purpose} needs a decoder (--part two --save)")
    return model, tokenizer_json


def checkpoint_tokenizer(checkpoint: Path, model, tokenizer_json: str):
    """The checkpoint's tokenizer; ValueError if it has ids that the model has no embedding for."""
    tokenizer = tokenizer_from_json(tokenizer_json)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{checkpoint}: tokenizer.json has {tokenizer.vocab_size} tokens, the model's vocabulary "
                         f"{model.config.vocab_size}")
    return tokenizer
