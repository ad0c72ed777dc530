"""`main.py chat`: a conversation in the terminal with an instruction-tuned decoder (--part three --instruct's).

Each answer is streamed as it is written. The model sees the conversation so far within its context: a system turn
first, then the latest turns that fit; older ones are dropped, and the chat says so. `/reset` starts again, `/quit`,
end of input or Ctrl-C leave. `--prompt TEXT` answers one question and exits; questions may also come from a pipe,
one a line.
"""

import argparse
import sys
from pathlib import Path

import torch

from models.chat import SYSTEM_PROMPT, ChatFormat, NotInstructionTuned
from models.generation import check_generation, stream
from tools.cli import Parser, add_decoding_options, checkpoint_tokenizer, load_decoder

PROMPT = "you> "
ANSWER_SHARE = 4  # at most a quarter of the context is kept free for the answer: the rest holds the conversation
HELP = "type a question; /reset forgets the conversation, /quit (or Ctrl-D, Ctrl-C) leaves"


def build_chat_parser() -> argparse.ArgumentParser:
    """The parser of `main.py chat`."""
    parser = Parser(prog="main.py chat", description="Talk with an instruction-tuned decoder "
                                                     "(python main.py --part three --instruct writes OUT/chat_model).")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR")
    parser.add_argument("--prompt", help="answer this one question and exit")
    parser.add_argument("--system", default=SYSTEM_PROMPT, help="the system turn every conversation starts with")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    add_decoding_options(parser)
    return parser


class Conversation:
    """The turns so far with one model, and its answers streamed to `out`."""

    def __init__(self, model, chat: ChatFormat, args, out=None, notes=None):
        self.model, self.chat, self.args = model, chat, args
        self.out, self.notes = out or sys.stdout, notes or sys.stderr
        self.system = [("system", args.system)] if args.system else []
        self.turns: list[tuple[str, str]] = []
        self.generator = torch.Generator().manual_seed(args.seed)

    def reset(self):
        self.turns = []

    def ask(self, question: str) -> str:
        """Stream the answer to `question` (and keep both in the history); ValueError for an empty question."""
        if not question.strip():
            raise ValueError("the question is empty")
        turns = [*self.system, *self.turns, ("user", question)]
        # room for the start of the answer; a longer one slides the context window on (models/generation.py)
        reserve = min(self.args.max_new_tokens, self.model.config.block_size // ANSWER_SHARE)
        prompt = self.chat.prompt(turns, self.model.config.block_size, reserve=reserve)
        if prompt.cut_tokens:
            self.note(f"(the question is longer than the model's {self.model.config.block_size}-token context: "
                      f"its first {prompt.cut_tokens} tokens were cut)")
        elif prompt.dropped_turns:
            self.note(f"(the {prompt.dropped_turns} oldest turns no longer fit the model's "
                      f"{self.model.config.block_size}-token context and are left out)")
        words = []
        for index in stream(self.model, prompt.ids, self.args.max_new_tokens, self.args.strategy, self.args.temperature,
                            self.args.top_k, self.args.top_p, self.args.beams, self.generator, eos_id=self.chat.end_id,
                            suppress_ids=self.chat.never_written):
            if index == self.chat.end_id:
                break
            words.append(self.chat.tokenizer.itos[index])
            self.out.write(("" if len(words) == 1 else " ") + words[-1])
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        answer = " ".join(words)
        self.turns += [("user", question), ("assistant", answer)]
        return answer

    def note(self, text: str):
        print(text, file=self.notes, flush=True)


def repl(conversation: Conversation, interactive: bool) -> int:
    """Questions from standard input until /quit or its end; exit status 0."""
    if interactive:
        conversation.note(HELP)
    while True:
        try:
            line = input(PROMPT if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        command = line.strip()
        if command == "/quit":
            return 0
        if command == "/reset":
            conversation.reset()
            conversation.note("(conversation forgotten)")
            continue
        try:
            conversation.ask(line)
        except ValueError as error:
            conversation.note(f"({error}: {HELP})")


def command(argv) -> int:
    """python main.py chat --checkpoint DIR [--prompt TEXT] [options]."""
    args = build_chat_parser().parse_args(argv)
    try:
        model, tokenizer_json = load_decoder(args.checkpoint, "chat")
        try:
            chat = ChatFormat(checkpoint_tokenizer(args.checkpoint, model, tokenizer_json))
        except NotInstructionTuned as error:
            raise ValueError(f"{args.checkpoint}: {error}") from None
        conversation = Conversation(model, chat, args)
        # a bad option fails here, before any question
        check_generation(model, [chat.role_ids["assistant"]], args.max_new_tokens, args.strategy, args.temperature,
                         args.top_k, args.top_p, args.beams, model.config.block_size)
        if args.prompt is not None:
            conversation.ask(args.prompt)
            return 0
        return repl(conversation, sys.stdin.isatty())
    except ValueError as error:  # CheckpointError and NotInstructionTuned included
        print(f"main.py chat: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0
