"""`main.py generate`: continue a prompt with a saved decoder (--part two --save DIR), by any of five strategies."""

import argparse
import sys
from pathlib import Path

import torch

from models.generation import generate
from tokenizer import PAD_ID, UNK_ID, WordTokenizer
from tools.cli import Parser, add_decoding_options, checkpoint_tokenizer, load_decoder


def build_generate_parser() -> argparse.ArgumentParser:
    """The parser of `main.py generate`."""
    parser = Parser(prog="main.py generate", description="Continue a prompt with a saved decoder (--part two --save DIR).")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    add_decoding_options(parser)
    parser.add_argument("--max-context", type=int, help="tokens the model sees (default block_size)")
    return parser


def command(argv) -> int:
    """python main.py generate --checkpoint DIR --prompt "..." [options]: print the continuation."""
    args = build_generate_parser().parse_args(argv)
    try:
        model, tokenizer_json = load_decoder(args.checkpoint, "generation")
        tokenizer = checkpoint_tokenizer(args.checkpoint, model, tokenizer_json)
        prompt = tokenizer.encode(args.prompt)
        word_level = isinstance(tokenizer, WordTokenizer)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if word_level and all(i == UNK_ID for i in prompt):
            raise ValueError(f"every word of the prompt is outside the vocabulary: {args.prompt!r}")
        # never emit padding or specials (the word tokenizer's <unk> is not a word either), nor an id the tokenizer
        # cannot write: a model whose vocabulary is larger than its tokenizer's (a converted one) has such ids
        suppressed = (*((PAD_ID, UNK_ID) if word_level else tokenizer.special_ids),
                      *range(tokenizer.vocab_size, model.config.vocab_size))
        new = generate(model, prompt, args.max_new_tokens, args.strategy, args.temperature, args.top_k, args.top_p,
                       args.beams, torch.Generator().manual_seed(args.seed), max_context=args.max_context,
                       suppress_ids=suppressed)
    except ValueError as error:  # CheckpointError included
        print(f"main.py generate: error: {error}", file=sys.stderr)
        return 2
    print(tokenizer.decode(prompt) + (" " if word_level else "") + tokenizer.decode(new))
    return 0
