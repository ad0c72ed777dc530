"""`main.py gap`: the gap to Kneser–Ney by word frequency of a saved decoder (studies/gap.py's tables)."""

import argparse
import sys
from pathlib import Path

import torch

import utilities
from dataset import DataError, load_speeches
from runtime import corpus
from studies import gap
from tokenizer import WordTokenizer
from tools.cli import Parser, checkpoint_tokenizer, load_decoder


def build_gap_parser() -> argparse.ArgumentParser:
    """The parser of `main.py gap`."""
    parser = Parser(prog="main.py gap", description="The gap to Kneser-Ney by word frequency of a saved decoder.")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="from --part two --save DIR")
    parser.add_argument("--data-dir", type=Path, help="the data the decoder was trained on (default: as main.py --part two)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for the tables, JSON and plot")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def command(argv) -> int:
    """python main.py gap --checkpoint DIR [--data-dir DIR] [--out DIR]: print and write the gap tables."""
    args = build_gap_parser().parse_args(argv)
    try:
        model, tokenizer_json = load_decoder(args.checkpoint, "the gap")
        data = load_speeches(corpus.locate(args.data_dir))
        words = WordTokenizer.from_texts(data.vocabulary_texts(), data.vocabulary_cap)
        if checkpoint_tokenizer(args.checkpoint, model, tokenizer_json).to_json() != words.to_json():
            raise ValueError(f"{args.checkpoint}: its tokenizer is not the word vocabulary of {args.data_dir}")
        result = gap.checkpoint_gap(model, words, data, torch.device("cpu"))
        utilities.write_tables(gap.tables(result), args.out)
        if not args.no_plots:
            gap.plot(result, args.out)
        path = utilities.write_json(args.out / "gap.json", result)
    except (DataError, ValueError, OSError) as error:  # CheckpointError included
        print(f"main.py gap: error: {error}", file=sys.stderr)
        return 2
    print(f"\nwrote {path}")
    return 0
