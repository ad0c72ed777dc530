"""The subcommands that work on a saved checkpoint: `main.py generate`, `convert` and `gap`.

Split from main.py, which keeps the parts and the sweep; each command here parses its own arguments and turns bad
input (a damaged checkpoint, a wrong data folder) into one line on stderr and exit status 2.
"""

import argparse
import sys
from pathlib import Path

import torch

import corpus
import gap
import hf_bridge
import utilities
from dataset import DataError, load_speeches
from generation import STRATEGIES, generate
from tokenizer import PAD_ID, UNK_ID, WordTokenizer, tokenizer_from_json


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line on stderr (main.py's parsers use it too)."""

    def error(self, message):
        """One line and exit status 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_generate_parser() -> argparse.ArgumentParser:
    """The parser of `main.py generate`."""
    parser = Parser(prog="main.py generate", description="Continue a prompt with a saved decoder (--part two --save DIR).")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    parser.add_argument("--temperature", type=float, default=1.0, help="> 0; greedy ignores it")
    parser.add_argument("--top-k", type=int, help="top-k (and optionally sample): keep the k likeliest tokens")
    parser.add_argument("--top-p", type=float, help="top-p (and optionally sample): smallest set with mass >= p")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-context", type=int, help="tokens the model sees (default block_size)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


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


def generate_command(argv) -> int:
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


def convert_command(argv) -> int:
    """python main.py convert --from-hf DIR --to CHECKPOINT, or --to-hf DIR --from CHECKPOINT (hf_bridge.py)."""
    parser = Parser(prog="main.py convert", description="Convert a Hugging Face GPT-2 or Llama folder to our checkpoint "
                    "(--from-hf DIR --to CHECKPOINT) or our decoder checkpoint to one (--from CHECKPOINT --to-hf DIR).")
    parser.add_argument("--from-hf", type=Path, metavar="DIR", help="a folder with config.json and model.safetensors")
    parser.add_argument("--to", type=Path, metavar="CHECKPOINT")
    parser.add_argument("--from", dest="source", type=Path, metavar="CHECKPOINT", help="one of ours (--part two --save)")
    parser.add_argument("--to-hf", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    if (args.from_hf is None) == (args.source is None) or (args.from_hf and not args.to) or (args.source and not args.to_hf):
        parser.error("give either --from-hf DIR --to CHECKPOINT or --from CHECKPOINT --to-hf DIR")
    try:
        if args.from_hf:
            print(hf_bridge.import_folder(args.from_hf, args.to))
        else:
            print(hf_bridge.export_checkpoint(args.source, args.to_hf))
    except (ValueError, OSError) as error:  # BridgeError and CheckpointError included
        print(f"main.py convert: error: {error}", file=sys.stderr)
        return 2
    return 0


def build_gap_parser() -> argparse.ArgumentParser:
    """The parser of `main.py gap`."""
    parser = Parser(prog="main.py gap", description="The gap to Kneser-Ney by word frequency of a saved decoder.")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="from --part two --save DIR")
    parser.add_argument("--data-dir", type=Path, help="the data the decoder was trained on (default: as main.py --part two)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for the tables, JSON and plot")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def gap_command(argv) -> int:
    """python main.py gap --checkpoint DIR [--data-dir DIR] [--out DIR]: print and write the gap tables."""
    args = build_gap_parser().parse_args(argv)
    try:
        model, tokenizer_json = load_decoder(args.checkpoint, "the gap")
        data = load_speeches(corpus.locate(args.data_dir))
        words = WordTokenizer.from_texts(data.vocabulary_texts(), data.vocabulary_cap)
        if checkpoint_tokenizer(args.checkpoint, model, tokenizer_json).to_json() != words.to_json():
            raise ValueError(f"{args.checkpoint}: its tokenizer is not the word vocabulary of {args.data_dir}")
        result = gap.checkpoint_gap(model, words, data, torch.device("cpu"))
        gap.report(result, args.out, not args.no_plots)
        path = utilities.write_json(args.out / "gap.json", result)
    except (DataError, ValueError, OSError) as error:  # CheckpointError included
        print(f"main.py gap: error: {error}", file=sys.stderr)
        return 2
    print(f"\nwrote {path}")
    return 0
