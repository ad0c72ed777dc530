"""What every subcommand shares: a parser whose errors are one line, the decoding options, and loading a saved decoder
with its tokenizer."""

import argparse
from pathlib import Path

import utilities
from models.generation import STRATEGIES
from tokenizer import tokenizer_from_json


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line on stderr (main.py's parsers use it too)."""

    def error(self, message):
        """One line and exit status 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_decoding_options(parser: argparse.ArgumentParser):
    """The decoding options `generate` and `chat` share (models/generation.py's five strategies)."""
    parser.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    parser.add_argument("--temperature", type=float, default=1.0, help="> 0; greedy ignores it")
    parser.add_argument("--top-k", type=int, help="top-k (and optionally sample): keep the k likeliest tokens")
    parser.add_argument("--top-p", type=float, help="top-p (and optionally sample): smallest set with mass >= p")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="of the sampling strategies' draws")


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
