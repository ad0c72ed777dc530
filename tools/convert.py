"""`main.py convert`: a Hugging Face GPT-2 or Llama folder to our checkpoint, or our decoder to one (tools/hf_bridge.py)."""

import sys
from pathlib import Path

from tools import hf_bridge
from tools.cli import Parser


def command(argv) -> int:
    """python main.py convert --from-hf DIR --to CHECKPOINT, or --to-hf DIR --from CHECKPOINT (tools/hf_bridge.py)."""
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
