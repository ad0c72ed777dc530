"""Time byte-level BPE training and encoding on the course's training text, and report the compression."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from any folder
from dataset import DataError, load_speeches
from tokenizer import ByteBPETokenizer


def timed(function, *args, **kwargs):
    """`function(*args, **kwargs)` and the seconds it took."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def encode_all(tokenizer: ByteBPETokenizer, texts: list[str]) -> int:
    """Encode every text; the number of tokens produced."""
    return sum(len(tokenizer.encode(text)) for text in texts)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("speechesdataset"))
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args()

    try:
        texts = load_speeches(args.data_dir).vocabulary_texts()  # train_CLS.tsv segments + train_LM.txt, as for the words
        tokenizer, train_seconds = timed(ByteBPETokenizer.from_texts, texts, vocab_size=args.vocab_size)
    except (DataError, ValueError) as error:
        parser.error(str(error))  # one line and exit status 2, as main.py does
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    num_tokens, cold_seconds = timed(encode_all, tokenizer, texts)  # training does not fill the encode cache
    _, warm_seconds = timed(encode_all, tokenizer, texts)

    print(f"training text:     {len(texts):,} texts, {num_bytes:,} UTF-8 bytes")
    print(f"vocabulary:        {tokenizer.vocab_size:,} ids ({len(tokenizer.merges):,} merges)")
    print(f"training:          {train_seconds:.2f} s")
    print(f"encoding:          {cold_seconds:.2f} s (empty cache), {warm_seconds:.2f} s (warm cache)")
    print(f"tokens:            {num_tokens:,}")
    print(f"compression:       {num_bytes / num_tokens:.2f} bytes per token")


if __name__ == "__main__":
    main()
