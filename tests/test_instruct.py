"""Instruction tuning and the chat (models/chat.py, runtime/instructions.py, studies/instruct.py, tools/chat.py): the
loss on the assistant's tokens only, the chat format's round trip and truncation, the vocabulary grown without moving
an id, the split by address, a tiny trained chat model answering through `main.py chat` (also in a pseudo-terminal),
its refusals, and a tiny --instruct end to end."""

import io
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main
import training
import utilities
from models.chat import CHAT_TOKENS, IGNORE, SYSTEM_PROMPT, AnswerLoss, ChatFormat, NotInstructionTuned, with_vocabulary
from runtime import corpus, instructions
from studies import instruct, transfer
from studies.study import Context
from tokenizer import WordTokenizer
from transformer import TransformerConfig, TransformerLM

ROOT = Path(__file__).resolve().parent.parent
QUIET = lambda *a, **k: None  # noqa: E731
TINY_DECODER = {"n_embd": 32, "n_head": 2, "n_layer": 1, "block_size": 64, "ff_hidden": 64, "dropout": 0.0}


@pytest.fixture(scope="module")
def tiny_run(small_data):
    return training.make_run(data_dir=small_data, device="cpu", training_flags={"epochs": 1})


@pytest.fixture(scope="module")
def chat(tiny_run) -> ChatFormat:
    return ChatFormat(tiny_run.tokenizer.with_added(CHAT_TOKENS))


def turns_of(words: list[str]) -> list[tuple[str, str]]:
    """A conversation of words the vocabulary knows, in the tokenizer's own spacing (so decode gives them back)."""
    return [("system", " ".join(words[:3])), ("user", " ".join(words[3:8])), ("assistant", " ".join(words[8:10])),
            ("user", " ".join(words[10:14])), ("assistant", words[14])]


# ---------------------------------------------------------------- the format


def test_the_added_tokens_move_no_id_and_no_text_produces_them(tiny_run):
    tokenizer = tiny_run.tokenizer
    grown = tokenizer.with_added([*CHAT_TOKENS, tokenizer.itos[5], "1790s"])  # a word it has is not added again
    assert grown.itos[: tokenizer.vocab_size] == tokenizer.itos
    assert grown.itos[tokenizer.vocab_size:] == [*CHAT_TOKENS, "1790s"]
    assert WordTokenizer.from_json(grown.to_json()).itos == grown.itos
    assert not set(grown.encode("<user> <end> <assistant> hello")) & {grown.stoi[t] for t in CHAT_TOKENS}
    assert grown.encode("the 1790s") == [grown.stoi["the"], grown.stoi["1790s"]]


def test_the_chat_format_round_trips(chat):
    turns = turns_of(chat.tokenizer.itos[10:25])
    ids, _ = chat.encode(turns)
    assert chat.decode(ids) == turns
    assert ids.count(chat.end_id) == len(turns) and ids[0] == chat.role_ids["system"]


def test_only_the_assistants_tokens_carry_the_loss(chat):
    turns = turns_of(chat.tokenizer.itos[10:25])
    inputs, targets = chat.training_pair(turns, max_len=100)
    ids, _ = chat.encode(turns)
    # by hand: a target is kept exactly where it is an assistant's word or the <end> closing an assistant turn
    expected, role = [], None
    for index in ids[1:]:
        if index in chat.roles:
            role = chat.roles[index]
            expected.append(IGNORE)
        else:
            expected.append(index if role == "assistant" else IGNORE)
    assert targets == expected and inputs == ids[:-1]
    kept = [t for t in targets if t != IGNORE]
    assert kept == [*chat.tokenizer.encode(turns[2][1]), chat.end_id, *chat.tokenizer.encode(turns[4][1]), chat.end_id]
    # the model's loss is the mean over those positions alone: a brute-force loop over the positions
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=chat.tokenizer.vocab_size, block_size=len(inputs)))
    x, y = torch.tensor([inputs]), torch.tensor([targets])
    output = model(x, y)
    logits = output.logits[0]
    losses = [F.cross_entropy(logits[t], y[0, t]) for t in range(len(targets)) if targets[t] != IGNORE]
    assert output.loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    # the fine-tuning's objective: each conversation's mean over its answer tokens, then the mean over conversations
    shorter = [*turns[:3]]  # one answer of 2 words and <end>, against two answers in the first conversation
    pairs = [(inputs, targets), chat.training_pair(shorter, max_len=100)]
    width = max(len(x) for x, _ in pairs)
    x = torch.tensor([a + [0] * (width - len(a)) for a, _ in pairs])
    y = torch.tensor([b + [IGNORE] * (width - len(b)) for _, b in pairs])
    logits = model(x).logits
    by_hand = [torch.stack([F.cross_entropy(logits[row, t], y[row, t]) for t in range(width) if y[row, t] != IGNORE]).mean()
               for row in range(2)]
    assert AnswerLoss(model)(x, y).loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)
    # what the user or the system says is never a target: other words there leave the learned targets as they were
    other = [("system", chat.tokenizer.itos[40]), ("user", " ".join(chat.tokenizer.itos[41:50])), *turns[2:]]
    assert [t for t in chat.training_pair(other, max_len=100)[1] if t != IGNORE] == kept


def test_the_prompt_keeps_the_system_turn_and_the_latest_turns(chat):
    words = chat.tokenizer.itos[10:60]
    turns = [("system", words[0]), *((("user" if k % 2 == 0 else "assistant"), " ".join(words[1 + 3 * k: 4 + 3 * k]))
                                     for k in range(8))]  # every turn: marker, 3 words, <end> = 5 ids
    full = chat.prompt(turns, max_context=200)
    assert full.dropped_turns == 0 and full.ids == chat.encode(turns)[0] + [chat.role_ids["assistant"]]
    short = chat.prompt(turns, max_context=3 + 5 * 3 + 1 + 4, reserve=4)  # room for the system turn and 3 turns
    assert short.dropped_turns == 5
    assert chat.decode(short.ids[:-1]) == [turns[0], *turns[-3:]] and short.ids[-1] == chat.role_ids["assistant"]
    long_question = [*turns[:1], ("user", " ".join(words[:30]))]
    cut = chat.prompt(long_question, max_context=20)
    assert len(cut.ids) == 20 and cut.cut_tokens == 32 - (20 - 3 - 1)
    assert chat.decode(cut.ids[:-1])[-1] == ("user", " ".join(words[30 - (20 - 3 - 1 - 2):30]))


def test_a_grown_vocabulary_keeps_every_old_logit(tiny_run):
    torch.manual_seed(0)
    config = training.model_config(tiny_run, "lm", preset="best", **TINY_DECODER)
    model = TransformerLM(config).eval()
    grown = with_vocabulary(model, config.vocab_size + 5).eval()
    ids = torch.randint(2, config.vocab_size, (2, 12))
    with torch.no_grad():
        old, new = model(ids).logits, grown(ids).logits
    assert torch.equal(new[..., : config.vocab_size], old)
    table = grown.decoder.token_embedding.weight
    assert torch.allclose(table[-1], model.decoder.token_embedding.weight.mean(0))
    assert grown.lm_head.weight is table  # still tied
    other = {"sdpa": "manual", "manual": "sdpa"}[config.attention]  # the other attention path, the same weights
    switched = with_vocabulary(model, config.vocab_size + 5, attention=other).eval()
    with torch.no_grad():
        assert torch.allclose(switched(ids).logits, new, atol=1e-5)
    with pytest.raises(ValueError, match="would drop ids"):
        with_vocabulary(model, config.vocab_size - 1)


# ---------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def few_addresses():
    """Two addresses of each course president: the last held out, the other trains (and the 17-president task then
    has these three, at MIN_ADDRESSES 2)."""
    kept = []
    for pid, _, _ in corpus.COURSE_PRESIDENTS:
        kept += [a for a in corpus.read_addresses() if a.president_id == pid][-2:]
    return sorted(kept, key=lambda a: a.date)


@pytest.fixture
def small_world(monkeypatch, few_addresses):
    monkeypatch.setattr(corpus, "MIN_ADDRESSES", 2)
    monkeypatch.setattr(corpus, "read_addresses", lambda: few_addresses)
    monkeypatch.setattr(instructions, "VALIDATION_EVERY", 3)
    monkeypatch.setattr(instructions, "TEST_PER_TASK", 8)
    return few_addresses


def test_the_split_is_by_address_and_no_test_text_is_trained_on(small_world, tiny_run):
    data = instructions.build()
    held_out = set(data.held_out_addresses)
    assert held_out == {a.fileid for a in small_world[1::2]}  # each president's last address
    for task in instructions.TASKS:
        assert data.test[task] and {c.address for c in data.test[task]} <= held_out
        assert not {c.address for c in (*data.train[task], *data.validation[task])} & held_out
    assert {c.address for items in data.validation.values() for c in items} == set(data.validation_addresses)
    trained = " ".join(p for a in small_world if a.fileid not in held_out for p in a.paragraphs)
    for task, tests in data.test.items():
        assert not any((c.answer if task == "continue" else c.passage) in trained for c in tests)
    for conversation in data.test["continue"]:
        assert conversation.candidates[0] == conversation.answer and len(set(conversation.candidates)) == 4
    # the chat decoder's pretraining text leaves every held-out address out
    text = corpus.pretraining_text(tiny_run.data, held_out=data.held_out_addresses)
    assert set(text.held_out_addresses) == held_out
    assert not {p for a in small_world if a.fileid in held_out for p in a.paragraphs} & set(text.paragraphs)


# ---------------------------------------------------------------- a tiny chat model and the chat command


def toy_data(tokenizer) -> instructions.InstructionData:
    """who questions whose answer a keyword decides: a toy that a tiny model learns in a few hundred steps."""
    keywords = tokenizer.itos[20:23]
    make = lambda i, k: instructions.Conversation(  # noqa: E731
        "who", (("system", SYSTEM_PROMPT), ("user", f"{instructions.QUESTIONS['who']} {keywords[k]} {keywords[k]}"),
                ("assistant", instructions.COURSE_NAMES[k])), f"a{i}", keywords[k], instructions.COURSE_NAMES[k])
    conversations = [make(i, i % 3) for i in range(30)]
    empty = {task: [] for task in instructions.TASKS if task != "who"}
    return instructions.InstructionData({"who": conversations, **empty}, {"who": conversations[:6], **empty},
                                        {"who": conversations[:6], **empty}, [], [], 0, {"who": instructions.COURSE_NAMES})


@pytest.fixture(scope="module")
def chat_model(tiny_run, tmp_path_factory):
    torch.manual_seed(0)
    config = training.model_config(tiny_run, "lm", preset="best", **TINY_DECODER)
    folder = tmp_path_factory.mktemp("chat")
    utilities.save_checkpoint(folder / "pretrained", TransformerLM(config), {**config.to_dict(), "model": "lm"},
                              tiny_run.tokenizer.to_json(), {})
    data = toy_data(tiny_run.tokenizer)
    with pytest.MonkeyPatch.context() as patch:  # a random tiny model learns the toy faster at a higher rate
        patch.setitem(instruct.SFT_TRAINING, "learning_rate", 1e-2)
        # 300 steps: at 150, seeds 0 and 1 had not learnt the toy on the stand-in's slice (33% and 67%); at 300, seeds 0-2 had
        model, chat, history = instruct.fine_tune(tiny_run, folder / "pretrained", data, seed=0, steps=300, log=QUIET)
    utilities.save_checkpoint(folder / "chat", model, {**model.config.to_dict(), "model": "lm"}, chat.tokenizer.to_json(), {})
    return folder, data, model, chat, history


def chat_command(monkeypatch, capsys, *args, stdin: str = "") -> tuple[int, str, str]:
    """main.py chat in this process: (exit status, stdout, stderr), reading `stdin` as a pipe."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main.main(["chat", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_fine_tuning_learns_the_answers_and_keeps_the_best_validation_weights(chat_model):
    _, data, model, chat, history = chat_model
    assert history[-1]["validation_loss"] < history[0]["validation_loss"]
    scores = instruct.score(model, chat, data.test)
    assert scores["who"]["accuracy"] == 100.0 and scores["who"]["n"] == 6


def test_chat_prompt_answers_with_a_valid_label(chat_model, monkeypatch, capsys):
    folder, data, _, _, _ = chat_model
    question = data.test["who"][1].turns[1][1]
    status, out, err = chat_command(monkeypatch, capsys, "--checkpoint", str(folder / "chat"), "--prompt", question)
    assert status == 0, err
    words = WordTokenizer().split
    assert words(out.strip()) in [words(name) for name in instructions.COURSE_NAMES]


def test_chat_reads_questions_from_a_pipe_and_refuses_bad_input_in_one_line(chat_model, monkeypatch, capsys):
    folder, data, _, _, _ = chat_model
    questions = "\n".join(c.turns[1][1] for c in data.test["who"][:2]) + "\n\n/reset\n"
    status, out, err = chat_command(monkeypatch, capsys, "--checkpoint", str(folder / "chat"), stdin=questions)
    assert status == 0 and len(out.splitlines()) == 2  # two answers, then the end of input: exit 0
    assert "the question is empty" in err and "conversation forgotten" in err
    for args, message in ((("--checkpoint", str(folder / "pretrained"), "--prompt", "hi"), "not instruction-tuned"),
                          (("--checkpoint", str(folder / "chat"), "--prompt", "  "), "the question is empty"),
                          (("--checkpoint", str(folder / "nothing"), "--prompt", "hi"), "nothing"),
                          (("--checkpoint", str(folder / "chat"), "--top-p", "2", "--strategy", "top-p"), "top_p")):
        status, out, err = chat_command(monkeypatch, capsys, *args)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    status, _, err = chat_command(monkeypatch, capsys, "--checkpoint", str(folder / "chat"), "--prompt", "the " * 100,
                                  "--max-new-tokens", "3")
    assert status == 0 and "tokens were cut" in err


def read_until(fd: int, text: str, timeout: float = 60) -> str:
    """What a pseudo-terminal shows until `text` appears."""
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {text!r} within {timeout} s; the terminal showed {seen!r}")
        seen += os.read(fd, 4096).decode(errors="replace")
    return seen


def in_a_terminal(folder: Path) -> tuple[subprocess.Popen, int]:
    """`main.py chat` with a pseudo-terminal for its input and output, and the terminal's controlling side."""
    controller, terminal = os.openpty()
    process = subprocess.Popen([sys.executable, "main.py", "chat", "--checkpoint", str(folder / "chat")], cwd=ROOT,
                               stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    return process, controller


def test_the_chat_in_a_terminal_answers_and_quits(chat_model):
    folder, data, _, _, _ = chat_model
    process, controller = in_a_terminal(folder)
    try:
        assert "/quit" in read_until(controller, "you> ")  # the help line, then the prompt
        os.write(controller, (data.test["who"][2].turns[1][1] + "\n").encode())
        shown = read_until(controller, "you> ")
        assert instructions.COURSE_NAMES[2].split()[-1] in shown
        os.write(controller, b"/quit\n")
        assert process.wait(timeout=90) == 0  # generous: a loaded machine starts and stops torch slowly
    finally:
        process.kill()
        os.close(controller)


def test_ctrl_c_ends_the_chat_cleanly(chat_model):
    process, controller = in_a_terminal(chat_model[0])
    try:
        read_until(controller, "you> ")
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(timeout=90) == 0  # generous: a loaded machine starts and stops torch slowly
        ready, _, _ = select.select([controller], [], [], 1)
        assert "Traceback" not in (os.read(controller, 4096).decode(errors="replace") if ready else "")
    finally:
        process.kill()
        os.close(controller)


# ---------------------------------------------------------------- the study


def test_a_tiny_instruct_study_end_to_end(small_world, tiny_run, monkeypatch, tmp_path):
    monkeypatch.setattr(transfer, "PRETRAIN_MODEL", TINY_DECODER)
    monkeypatch.setattr(transfer, "PRETRAIN_TRAINING", {**transfer.PRETRAIN_TRAINING, "batch_size": 4, "warmup_steps": 2,
                                                        "precision": "fp32"})
    run = replace(tiny_run, settings=replace(tiny_run.settings, cache_dir=tmp_path / "cache", out=tmp_path / "out"))
    options = {"instruct_pretrain_steps": 3, "instruct_steps": 4}
    results, failures = instruct.study(run, Context(seed=0, seeds=2, workers=1, options=options), log=QUIET)
    assert failures == [] and set(instructions.TASKS) <= set(results)
    for task in instructions.TASKS:
        found = results[task]
        assert len(found["accuracy"]["values"]) == 2 and found["n"] == 8 and found["baselines"]
        assert 0 <= found["chance"] <= found["test_majority"] <= 100  # the test's commonest answer is the best blind one
    assert "course encoder (part one's, trained on the same passages)" in results["who"]["baselines"]
    assert results["pretraining"]["held_out_addresses"] == results["data"]["held_out_addresses"]
    saved = Path(results["chat_model"])
    assert ChatFormat(WordTokenizer.from_json((saved / "tokenizer.json").read_text())).end_id
    assert len(instruct.tables(results)["instruct"].splitlines()) > 2 + 2 * len(instructions.TASKS)


def test_the_validation_sample_spreads_over_the_whole_list():
    assert instruct.spread_sample(list(range(10)), 3) == [0, 3, 6]  # by hand: every third, not the first three
    assert instruct.spread_sample(list(range(4)), 8) == [0, 1, 2, 3]


def test_instruct_options_are_checked_before_any_training(small_data, capsys):
    status = main.main(["--part", "three", "--instruct", "--instruct-steps", "0", "--data-dir", str(small_data)])
    assert status == 2 and "--instruct-steps must be positive" in capsys.readouterr().err
    status = main.main(["--part", "three", "--instruct", "--tokenizer", "bpe", "--data-dir", str(small_data)])
    assert status == 2 and "--instruct pretrains in the course's word vocabulary" in capsys.readouterr().err


def test_not_instruction_tuned_is_a_value_error(tiny_run):
    with pytest.raises(NotInstructionTuned, match="not instruction-tuned"):
        ChatFormat(tiny_run.tokenizer)
