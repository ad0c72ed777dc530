"""The gap report's bucketing, the novel-word distributions and the Kneser-Ney-with-novel-mass row, against
hand-counted and hand-computed toy cases; the `gap` command end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import main
from models import novel_words as novel
from studies import baselines, gap
from studies.baselines import KneserNeyTrigram, NovelMassKneserNey
from tokenizer import PAD_ID, UNK_ID, WordTokenizer
from transformer import TransformerConfig

# ---------------------------------------------------------------- bucketing


def test_buckets_match_a_hand_counted_toy_corpus():
    words = WordTokenizer(["a", "b", "c", "d", "e"])  # ids: <pad> 0, <unk> 1, a 2, b 3, c 4, d 5, e 6
    train = "a " * 10 + "b b b c c d"  # a 10, b 3, c 2, d 1, e never
    test = "a e b zzz c d a"  # targets (every token after the first): e b zzz c d a
    buckets = gap.target_buckets_of(words, train, {"t": words.encode(test)})["t"]
    never, unk, one_two, three_nine, ten_plus = (gap.BUCKETS.index(name) for name in (
        "never in train_LM.txt", "<unk>", "1-2", "3-9", "10+"))
    assert buckets.tolist() == [never, three_nine, unk, one_two, one_two, ten_plus]


def test_bucket_contributions_add_up_to_the_gap():
    buckets = torch.tensor([0, 1, 1, 4])
    decoder, count = torch.tensor([5.0, 4.0, 2.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 1.0, 1.0, 2.0],
                                                                                          dtype=torch.float64)
    rows = {row["bucket"]: row for row in gap.gap_rows(buckets, decoder, count)}
    assert rows["<unk>"]["share"] == 0.25 and rows["<unk>"]["contribution"] == pytest.approx(0.25 * 2)
    assert rows["never in train_LM.txt"]["decoder_nll"] == 3.0 and rows["never in train_LM.txt"]["count_model_nll"] == 1.0
    assert rows["never in train_LM.txt"]["contribution"] == pytest.approx(0.5 * 2)
    assert rows["1-2"]["targets"] == 0 and rows["1-2"]["contribution"] == 0
    assert rows["10+"]["contribution"] == pytest.approx(0.25 * -1)
    assert rows["all"]["contribution"] == pytest.approx(12 / 4 - 7 / 4)
    with pytest.raises(ValueError, match="different targets"):
        gap.gap_rows(buckets, decoder[:3], count)


# ---------------------------------------------------------------- the decoder's novel-word distributions


def tiny_novel_class(novel_share=1.0):
    torch.manual_seed(0)
    train = torch.tensor([2, 3, 3, 4, 2, 3, 5])  # ids 2, 3 seen often, 4 and 5 once; 1 (<unk>), 6, 7 never
    config = TransformerConfig(vocab_size=8, block_size=8, n_embd=8, n_head=2, n_layer=1, ff_hidden=8)
    return novel.NovelClassLM(config, train, novel_share), train


def test_novel_class_sums_to_one_and_gives_the_never_seen_exactly_p_novel():
    model, _ = tiny_novel_class()
    model.eval()
    idx = torch.tensor([[2, 3, 4, 6, 1]])
    with torch.no_grad():
        probabilities = model(idx).logits.exp()[0]  # (T, V)
        inner = model.model(idx).logits[0]  # (T, V + 1), the last is <novel>
    never_seen = [1, 6, 7]
    assert model.never_seen.nonzero().flatten().tolist() == never_seen  # <pad> is never a target
    for t in range(idx.shape[1]):  # a softmax over the seen words and <novel>, written out
        kept = [i for i in range(8) if i not in never_seen] + [8]
        denominator = sum(math.exp(inner[t, i]) for i in kept)
        p_novel = math.exp(inner[t, 8]) / denominator
        assert probabilities[t].sum().item() == pytest.approx(1.0, abs=1e-6)
        assert probabilities[t, never_seen].sum().item() == pytest.approx(p_novel, rel=1e-5)
        assert probabilities[t, never_seen].tolist() == pytest.approx([p_novel / 3] * 3, rel=1e-5)
        assert probabilities[t, 3].item() == pytest.approx(math.exp(inner[t, 3]) / denominator, rel=1e-5)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_novel_class_training_loss_counts_singletons_as_novel(share):
    model, _ = tiny_novel_class(share)
    model.train()
    torch.manual_seed(1)
    idx, targets = torch.tensor([[2, 3, 4, 2]]), torch.tensor([[3, 4, 2, 5]])  # 4 and 5 occur once in training
    loss = model(idx, targets).loss
    torch.manual_seed(1)  # the same dropout (none here) and the same logits
    logits = model.model(idx).logits.flatten(0, 1)
    as_words = F.cross_entropy(logits, targets.flatten(), reduction="none")
    as_novel = F.cross_entropy(logits, torch.tensor([3, 8, 2, 8]), reduction="none")
    singleton = torch.tensor([0.0, 1.0, 0.0, 1.0])
    expected = ((1 - share * singleton) * as_words + share * singleton * as_novel).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_mixture_moves_exactly_lambda_onto_the_never_seen_words():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 6).log_softmax(-1)
    never_seen = torch.tensor([False, True, False, False, True, False])
    mixed = novel.mixture_log_probs(log_probs, never_seen, 0.2).exp()
    expected = 0.8 * log_probs.exp() + 0.2 * never_seen / 2
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert torch.allclose(mixed.sum(-1), torch.ones(3))


# ---------------------------------------------------------------- Kneser–Ney with novel-word mass

A, B, C, V = 2, 3, 4, 5  # the toy of test_baselines: ids <pad> 0, <unk> 1, a 2, b 3, c 4


def test_kneser_ney_with_novel_mass_matches_hand_computed_values():
    trigram = KneserNeyTrigram([A, B, C, B, A], vocab_size=V, discount=0.75)
    never_seen = baselines.never_seen_ids([A, B, C, B, A], V)
    assert never_seen == {UNK_ID}  # <pad> is never a target; a, b, c are seen
    model = NovelMassKneserNey(trigram, never_seen, 0.1)
    p1_unk = (0.75 * 3 / 5) / 4  # test_baselines' hand-computed P1(<unk>) = 0.1125
    p_unk_ab = 0.75 * (0.75 * 2 * p1_unk) / 2  # P3(<unk> | a b)
    assert model.probability(UNK_ID, [A, B]) == pytest.approx(0.9 * p_unk_ab + 0.1)
    assert model.probability(A, [A, B]) == pytest.approx(0.9 * 0.1921875)
    assert sum(model.probability(w, [A, B]) for w in range(V)) == pytest.approx(1.0)
    expected = (0.9 * trigram.probability(B, [A]) * (0.9 * trigram.probability(UNK_ID, [A, B]) + 0.1)) ** -0.5
    assert model.perplexity([A, B, UNK_ID]) == pytest.approx(expected)


def test_novel_weight_is_tuned_to_the_validation_optimum():
    # one never-seen target the model gives 0 and one seen target it gives 1: NLL = -log(λ) - log(1 - λ), least at 0.5
    weight, perplexities = baselines.tune_novel_weight([0.0, 1.0], [True, False], 1, grid=(0.1, 0.3, 0.5, 0.7))
    assert weight == 0.5 and perplexities[0.5] == pytest.approx(2.0)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def saved_decoder(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gap_decoder")
    assert main.main(["--part", "two", "--data-dir", str(small_data), "--out", str(out), "--max-iters", "10",
                      "--eval-interval", "10", "--save", str(out / "checkpoint"), "--no-plots"]) == 0
    return out


def test_gap_command_scores_the_checkpoints_own_targets(saved_decoder, small_data, tmp_path, capsys):
    status = main.main(["gap", "--checkpoint", str(saved_decoder / "checkpoint"), "--data-dir", str(small_data),
                        "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert status == 0, out
    result = json.loads((tmp_path / "gap.json").read_text())
    saved = json.loads((saved_decoder / "part_two.json").read_text())["final"]["perplexity"]
    assert result["models"]["checkpoint"]["perplexity"] == pytest.approx(saved, rel=1e-6)  # float32 sums, another order
    rows = result["gaps"]["checkpoint vs kneser_ney"]["obama"]
    assert sum(r["share"] for r in rows[:-1]) == pytest.approx(1.0)
    assert sum(r["contribution"] for r in rows[:-1]) == pytest.approx(rows[-1]["contribution"])
    assert math.log(result["models"]["checkpoint"]["perplexity"]["obama"] / result["models"]["kneser_ney"]["perplexity"][
        "obama"]) == pytest.approx(rows[-1]["contribution"])
    assert (tmp_path / "gap_checkpoint_vs_kneser_ney.md").is_file()


@pytest.mark.parametrize("checkpoint", ["missing", "classifier"])
def test_gap_command_bad_input_gives_one_line_and_status_2(small_data, tmp_path, capsys, checkpoint):
    if checkpoint == "classifier":
        assert main.main(["--part", "one", "--data-dir", str(small_data), "--out", str(tmp_path), "--epochs", "1",
                          "--save", str(tmp_path / "classifier"), "--no-plots"]) == 0
        capsys.readouterr()
    status = main.main(["gap", "--checkpoint", str(tmp_path / checkpoint), "--data-dir", str(small_data)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and err.startswith("main.py gap: error:")


def test_pad_is_never_counted_as_never_seen():
    counts = novel.word_counts(torch.tensor([2, 2, 3]), 5)
    assert novel.never_seen_mask(counts).tolist() == [False, True, False, False, True]
    assert PAD_ID == 0


# ---------------------------------------------------------------- weight averaging


@pytest.mark.parametrize("kind", ["decoder", "classifier"])
def test_weight_average_evaluates_the_moving_average_of_the_weights(kind):
    from models import averaging
    from transformer import TransformerClassifier, TransformerLM

    config = TransformerConfig(vocab_size=8, block_size=8, n_embd=8, n_head=2, n_layer=1, ff_hidden=8)
    model_class = {"decoder": TransformerLM, "classifier": TransformerClassifier}[kind]
    torch.manual_seed(0)
    model = averaging.ema_builder(0.9, model_class=model_class)(config)
    idx = torch.tensor([[2, 3, 4]])
    targets = idx if kind == "decoder" else torch.tensor([1])
    snapshots = []
    model.train()
    for _ in range(3):  # each training forward folds in the weights of that moment; change them in between
        model(idx, targets)
        snapshots.append({k: v.clone() for k, v in model.model.state_dict().items()})
        with torch.no_grad():
            for parameter in model.model.parameters():
                parameter.add_(torch.randn_like(parameter))
    first, second, third = snapshots  # the average starts as a copy, then avg <- 0.9 avg + 0.1 weights
    expected = {k: 0.9 * (0.9 * first[k] + 0.1 * second[k]) + 0.1 * third[k] for k in first}
    reference = model_class(config)
    reference.load_state_dict(expected)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(model(idx).logits, reference(idx).logits, atol=1e-5)
        assert not torch.allclose(model(idx).logits, model.model(idx).logits, atol=1e-3)  # not the live weights


def test_part_three_gap_trains_the_rows_and_writes_the_tables(small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gap, "HEADLINE", ("best",))  # one decoder row (two trainings) keeps the test short
    status = main.main(["--part", "three", "--gap", "--data-dir", str(small_data), "--out", str(tmp_path), "--epochs", "1",
                        "--max-iters", "10", "--eval-interval", "5", "--no-plots"])
    out = capsys.readouterr().out
    assert status == 0, out
    result = json.loads((tmp_path / "part_three.json").read_text())["gap"]
    assert set(result["models"]) == {"kneser_ney", "kneser_ney_novel_mass", "best", "best_novel_mass"}
    assert result["models"]["best"]["best_iteration"] in (5, 10)
    assert 0 <= result["models"]["best_novel_mass"]["weight"] <= 0.3
    assert (tmp_path / "gap_best_vs_kneser_ney.md").read_text().count("\n") == 3 * (2 + 6) + 3 * 2 + 2  # 3 tables
