"""Baselines against hand-computed toy cases, brute-force sums and autograd; one end-to-end check on the course data."""

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dataset import LabelledSegments, audit, format_audit, load_speeches, overlap_flags, stratified_split
from studies import baselines
from studies.baselines import KneserNeyTrigram, NaiveBayes
from tokenizer import WordTokenizer

# ---------------------------------------------------------------- naive Bayes


def test_naive_bayes_posterior_matches_hand_arithmetic():
    documents = [Counter({"a": 2, "b": 1}), Counter({"b": 1, "c": 1}), Counter({"a": 1})]
    model = NaiveBayes.fit(documents, [0, 1, 0], alpha=1.0, num_classes=3)
    # class 0 counts a=3, b=1, c=0 (total 4) -> smoothed (4, 2, 1) / 7;  class 1: a=0, b=1, c=1 -> (1, 2, 2) / 5
    # priors 2/3, 1/3 and 0 (the course has three classes; class 2 has no document here); "z" was never seen, so ignored
    joint_0 = 2 / 3 * (4 / 7) * (1 / 7)  # a once, c once
    joint_1 = 1 / 3 * (1 / 5) * (2 / 5)
    posterior = model.log_posterior([Counter({"a": 1, "c": 1, "z": 1})]).exp()[0]
    assert posterior.tolist() == pytest.approx([joint_0 / (joint_0 + joint_1), joint_1 / (joint_0 + joint_1), 0.0])
    # counts multiply: a twice is (4/7)² against (1/5)²
    joint_0, joint_1 = 2 / 3 * (4 / 7) ** 2, 1 / 3 * (1 / 5) ** 2
    assert model.log_posterior([Counter({"a": 2})]).exp()[0, 0].item() == pytest.approx(joint_0 / (joint_0 + joint_1))


def test_tuning_with_extra_documents_never_hands_them_the_validation_segments():
    documents = [Counter({f"w{i}": 1}) for i in range(30)]
    labels = [i % 3 for i in range(30)]
    calls = []

    def extra(indices):
        calls.append(sorted(indices))
        return [], []

    baselines.tune_and_fit(NaiveBayes, documents, labels, [0.1, 1.0], 0, extra)
    kept, _ = stratified_split(labels, 0.1, seed=0)
    assert calls == [sorted(kept.tolist()), list(range(30))]  # the selection's training set, then the refit's


def test_the_speaker_blocks_lines_teach_naive_bayes_a_word_only_they_hold(tiny_speeches):
    texts = [f"{word} {i}" for word, count in (("alpha", 9), ("beta", 10), ("gamma", 10)) for i in range(count)]
    labels = [label for label, count in enumerate((9, 10, 10)) for _ in range(count)]
    # train_LM.txt: class 0's segments with a line of a new word after each, then class 2's segments
    lines = [line for i in range(9) for line in (f"alpha {i}", "delta delta")] + [f"gamma {i}" for i in range(10)]
    speeches = replace(tiny_speeches, train_cls=LabelledSegments(texts, labels), train_lm="\n".join(lines) + "\n",
                       test_cls=LabelledSegments(["delta delta"], [0]))
    tokenizer = WordTokenizer.from_texts(speeches.vocabulary_texts())
    plain = baselines.classifier_baselines(speeches, tokenizer)["naive_bayes"]
    blocks = baselines.classifier_baselines(speeches, tokenizer, blocks=True)["naive_bayes"]
    # segments alone never show "delta": the prior decides, and class 0 has the fewest segments
    assert (plain["test_accuracy"], blocks["test_accuracy"]) == (0.0, 100.0)
    assert baselines.naive_bayes_test_predictions(speeches, tokenizer, blocks=True)[0] == [0]


def test_em_reads_words_only_the_unlabelled_documents_hold():
    labelled, labels = [Counter({"a": 1}), Counter({"b": 1})], [0, 1]
    # "c" occurs only beside "a", "d" only beside "b", and only in unlabelled documents
    unlabelled = [Counter({"a": 1, "c": 1}), Counter({"a": 1, "c": 1}), Counter({"b": 1, "d": 1}), Counter({"b": 1, "d": 1})]
    queries = [Counter({"c": 1}), Counter({"d": 1})]
    plain = NaiveBayes.fit(labelled, labels, alpha=0.1).log_posterior(queries).exp()
    assert plain.flatten().tolist() == pytest.approx([0.5] * 4)  # unseen words: the prior alone
    em = baselines.naive_bayes_em(labelled, labels, unlabelled, alpha=0.1, weight=1.0, num_classes=2)
    assert em.predict(queries) == [0, 1]
    assert em.log_likelihood.exp().sum(1).tolist() == pytest.approx([1.0, 1.0])  # each class's a distribution
    assert em.log_prior.exp().tolist() == pytest.approx([0.5, 0.5])  # the labelled documents' prior
    # the first M step by hand: "a c" is class 0 with the labelled fit's posterior p (features a, b, c, d, α 0.1)
    first = baselines.naive_bayes_em(labelled, labels, unlabelled, alpha=0.1, weight=1.0, num_classes=2, iterations=1)
    like_a_0, like_a_1 = 1.1 / 1.4, 0.1 / 1.4  # class 0: a=1 (+α), others α; class 1: b=1
    p = like_a_0 * (0.1 / 1.4) / (like_a_0 * (0.1 / 1.4) + like_a_1 * (0.1 / 1.4))  # "a c" under the labelled fit
    counts_c_0 = 2 * p  # two "a c" documents, each p in class 0
    total_0 = 1 + 2 * (2 * p) + 2 * (2 * (1 - p))  # "a", the two "a c" (2 words) at p, the two "b d" at their 1 - p
    assert first.log_likelihood[0, first.columns["c"]].exp().item() == pytest.approx((counts_c_0 + 0.1) / (total_0 + 0.4))


def test_paired_exact_test_against_every_outcome_of_the_disagreements():
    # hand arithmetic: 1 against 4 disagreements, 2 * (C(5,0) + C(5,1)) / 2^5 = 0.375
    assert baselines.paired_exact_test([1, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1]) == {
        "first_only": 1, "second_only": 4, "p_value": 0.375}
    for first_only in range(6):
        for second_only in range(6):
            both, neither = [True] * 3, [False] * 2  # agreements, which the test ignores
            first = [True] * first_only + [False] * second_only + both + neither
            second = [False] * first_only + [True] * second_only + both + neither
            m = first_only + second_only
            # brute force: each disagreement a fair coin; how often is the split at least as lopsided?
            extreme = sum(abs(2 * bin(outcome).count("1") - m) >= abs(first_only - second_only) for outcome in range(2 ** m))
            found = baselines.paired_exact_test(first, second)
            assert (found["first_only"], found["second_only"]) == (first_only, second_only)
            assert found["p_value"] == pytest.approx(extreme / 2 ** m)


def test_ngram_counts_are_unigrams_and_bigrams_with_unk():
    tokenizer = WordTokenizer(["the", "cat", "sat"])
    the, cat, unk = tokenizer.stoi["the"], tokenizer.stoi["cat"], tokenizer.stoi["<unk>"]
    counts = baselines.ngram_counts(tokenizer, "the cat the dog")
    assert counts == Counter({(the,): 2, (cat,): 1, (unk,): 1, (the, cat): 1, (cat, the): 1, (the, unk): 1})


# ---------------------------------------------------------------- logistic regression


def test_softmax_regression_gradient_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(6, 5, generator=generator, dtype=torch.float64) * (torch.rand(6, 5, generator=generator) < 0.5)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    weight = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    loss, grad_weight, grad_bias = baselines.softmax_regression_loss(
        baselines.to_csr(dense), baselines.to_csr(dense.t()), targets, weight.detach(), bias.detach(), l2=0.1)
    reference = F.cross_entropy(dense @ weight + bias, targets) + 0.05 * weight.pow(2).sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item())
    torch.testing.assert_close(grad_weight, weight.grad)
    torch.testing.assert_close(grad_bias, bias.grad)


def test_tfidf_rows_match_hand_formula():
    documents = [Counter({"a": 2, "b": 1}), Counter({"a": 1})]
    model = baselines.TfidfLogisticRegression.fit(documents, [0, 1], l2=1e-3)
    idf_a, idf_b = math.log(3 / 3) + 1, math.log(3 / 2) + 1  # ln((1 + N) / (1 + df)) + 1
    row = baselines.tfidf(baselines.count_matrix(documents[:1], model.columns), model.idf).to_dense()[0]
    norm = math.hypot(2 * idf_a, idf_b)
    assert row.tolist() == pytest.approx([2 * idf_a / norm, idf_b / norm])
    assert model.predict(documents) == [0, 1]


# ---------------------------------------------------------------- Kneser–Ney


A, B, C, UNK, V = 2, 3, 4, 1, 5  # ids; vocab_size 5 counts <pad> and <unk> too


@pytest.fixture
def toy_lm():
    return KneserNeyTrigram([A, B, C, B, A], vocab_size=V, discount=0.75)


def test_kneser_ney_matches_hand_computed_values(toy_lm):
    # trigrams: abc, bcb, cba.  bigram continuation N1+(• v w) from their types: bc 1, cb 1, ba 1
    # unigram continuation N1+(• w) from bigram types ab, bc, cb, ba: a 1, b 2, c 1 (total 4, 3 types)
    p1 = {A: (0.25 + 0.75 * 3 / 5) / 4, B: (1.25 + 0.75 * 3 / 5) / 4, C: (0.25 + 0.75 * 3 / 5) / 4}
    p1_unk = (0.75 * 3 / 5) / 4
    assert [toy_lm.probability(w) for w in (A, B, C, UNK)] == pytest.approx([p1[A], p1[B], p1[C], p1_unk])
    assert [p1[A], p1[B], p1[C], p1_unk] == pytest.approx([0.175, 0.425, 0.175, 0.1125])
    # context b: continuation total 2 (ba, bc), 2 types
    p2_a_b = (0.25 + 0.75 * 2 * p1[A]) / 2
    p2_c_b = (0.25 + 0.75 * 2 * p1[C]) / 2
    # seen trigram a b c: context "a b" seen once, one type
    assert toy_lm.probability(C, [A, B]) == pytest.approx((1 - 0.75 + 0.75 * 1 * p2_c_b) / 1)
    # unseen trigram a b a, seen bigram b a: all of it comes through the discount mass
    assert toy_lm.probability(A, [A, B]) == pytest.approx(0.75 * p2_a_b)
    assert toy_lm.probability(A, [A, B]) == pytest.approx(0.1921875)
    # a word never seen in training: only the uniform base reaches it
    assert toy_lm.probability(UNK, [A, B]) == pytest.approx(0.75 * (0.75 * 2 * p1_unk) / 2)
    # an unseen context falls through to the next level whole: "c c" to P2(a | c) (context c: cb only), "c a" to P1
    assert toy_lm.probability(A, [C, C]) == pytest.approx((0 + 0.75 * 1 * p1[A]) / 1)
    assert toy_lm.probability(A, [C, A]) == pytest.approx(p1[A])


@pytest.mark.parametrize("context", [(), (A,), (B,), (A, B), (C, B), (B, B), (UNK, A)])
def test_kneser_ney_distribution_sums_to_one(toy_lm, context):
    assert sum(toy_lm.probability(w, context) for w in range(V)) == pytest.approx(1.0)


def test_kneser_ney_perplexity_scores_every_token_after_the_first(toy_lm):
    stream = [A, B, C, A]
    expected = toy_lm.probability(B, [A]) * toy_lm.probability(C, [A, B]) * toy_lm.probability(A, [B, C])
    assert toy_lm.perplexity(stream) == pytest.approx(expected ** (-1 / 3))
    assert toy_lm.perplexity(torch.tensor(stream)) == pytest.approx(expected ** (-1 / 3))


# ---------------------------------------------------------------- split and audit


def test_audit_counts_on_a_hand_made_dataset(tiny_speeches):
    report = audit(tiny_speeches)
    # "One two." is in train_CLS and (inside a line) in train_LM; "Three four." in both, as a whole line;
    # "Seven eight." sits inside a train_LM line; "Nine ten." is nowhere
    # "One two." comes twice in test and counts twice; "Three four." has another label in train
    assert report["test_cls"] == {"segments": 5, "in_train_cls": 3, "in_train_lm": 4, "in_neither": 1,
                                  "in_train_lm_as_line": 1, "in_train_cls_same_label": 2, "unseen_in_speaker_blocks": 0}
    assert report["test_lm"] == {"obama": {"lines": 2, "in_train_cls": 1, "in_train_lm": 1},
                                 "wbush": {"lines": 2, "in_train_cls": 2, "in_train_lm": 1},
                                 "hbush": {"lines": 1, "in_train_cls": 0, "in_train_lm": 0}}
    assert report["train"] == {"train_cls_segments": 3, "train_cls_in_train_lm": 2, "train_cls_distinct": 3,
                               "train_lm_lines": 3, "train_lm_lines_in_train_cls": 1,
                               "train_lm_lines_in_speaker_blocks": 1}  # "Three four.", a block of one line
    assert "4 in train_LM.txt (1 as a whole line), 1 in neither" in format_audit(report)


def test_classifier_groups_follow_the_audit(tiny_speeches):
    flags = overlap_flags(tiny_speeches)
    assert flags["in_train_cls"] == [True, True, False, False, True]
    assert flags["in_neither"] == [False, False, False, True, False]


# ---------------------------------------------------------------- the course data


def test_audit_counts_on_the_course_data(course_data):
    """The audit against the same counts done here with plain set and substring operations, no tokenizer."""
    speeches = load_speeches(course_data)
    train_cls, test = set(speeches.train_cls.texts), speeches.test_cls.texts
    in_cls = sum(text in train_cls for text in test)
    in_lm = sum(text in speeches.train_lm for text in test)
    in_neither = len([text for text in test if text not in train_cls and text not in speeches.train_lm])
    report = audit(speeches)["test_cls"]
    assert (report["segments"], report["in_train_cls"], report["in_train_lm"], report["in_neither"]) == (
        len(test), in_cls, in_lm, in_neither)
    assert (len(test), in_cls, in_neither) == (750, 551, 122)  # the figures the README quotes


def test_baselines_on_the_course_data(course_data):
    speeches = load_speeches(course_data)
    tokenizer = WordTokenizer.from_texts(speeches.vocabulary_texts())
    train = [baselines.ngram_counts(tokenizer, text) for text in speeches.train_cls.texts]
    test = [baselines.ngram_counts(tokenizer, text) for text in speeches.test_cls.texts]
    predicted = NaiveBayes.fit(train, speeches.train_cls.labels, alpha=0.1).predict(test)
    assert baselines.accuracy(predicted, speeches.test_cls.labels) > 85
    kneser_ney = baselines.lm_baseline(speeches, tokenizer)["kneser_ney"]
    # an independent implementation (the course handout's) scores the targets that have a full two-word
    # context, from the third token of each file on: 244 / 381 / 267 after rounding
    third = kneser_ney["perplexity_from_third_token"]
    assert {name: round(value) for name, value in third.items()} == {"obama": 244, "wbush": 381, "hbush": 267}


# ---------------------------------------------------------------- modified Kneser–Ney


TOY_STREAM = [2, 3, 4, 2, 3, 5, 2, 3, 4, 6, 4, 2, 3, 4, 5, 5, 2, 6, 3, 4, 2, 3, 4, 2, 5, 3, 4, 6, 2, 3]


def brute_force_modified_kneser_ney(ids: list[int], vocab_size: int, order: int, word: int, context: tuple) -> float:
    """The same estimate, each count found by scanning the stream (no shared tables): raw counts at the top order,
    the number of distinct ids seen before an n-gram below it."""
    def grams(k):
        return [tuple(ids[i:i + k]) for i in range(len(ids) - k + 1)]

    def count(k, gram):
        if k == order:
            return grams(k).count(gram)
        return len({g[0] for g in set(grams(k + 1)) if g[1:] == gram})

    def discounts(k):
        values = [c for gram in set(grams(k)) if (c := count(k, gram))]
        n = [sum(v == j for v in values) for j in range(5)]
        y = n[1] / (n[1] + 2 * n[2]) if n[1] + n[2] else 0.5
        # a discount outside (0, j], or of an order without any n-gram counted j times, falls back to Y, as documented
        formula = [j - (j + 1) * y * n[j + 1] / n[j] if n[j] else 0.0 for j in (1, 2, 3)]
        return [d if 0 < d <= j else y for d, j in zip(formula, (1, 2, 3))]

    probability = 1 / vocab_size
    context = tuple(context)[-(order - 1):] if order > 1 else ()
    for k in range(1, len(context) + 2):
        history = context[len(context) - k + 1:]
        followers = {g[-1] for g in set(grams(k)) if g[:-1] == history}
        if not followers:
            continue
        d = discounts(k)
        # a lower-order n-gram seen only at the stream's start has no id before it: no continuation count
        counts = {w: c for w in followers if (c := count(k, (*history, w)))}
        total = sum(counts.values())
        freed = sum(d[min(c, 3) - 1] for c in counts.values())
        own = counts.get(word, 0)
        probability = (own - (d[min(own, 3) - 1] if own else 0.0) + freed * probability) / total
    return probability


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_modified_kneser_ney_against_a_brute_force_count(order):
    model = baselines.ModifiedKneserNey(TOY_STREAM, vocab_size=8, order=order)
    contexts = [(), (2,), (2, 3), (3, 4), (4, 2, 3), (7, 7, 7), (6, 3, 4)]  # seen, partly seen, never seen
    for context in contexts:
        probabilities = [model.probability(word, context) for word in range(8)]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-12)  # a distribution over the whole vocabulary
        assert min(probabilities) > 0
        for word in range(8):
            assert probabilities[word] == pytest.approx(
                brute_force_modified_kneser_ney(TOY_STREAM, 8, order, word, context), rel=1e-12)


def test_modified_discounts_follow_the_count_of_counts_formula():
    counts = Counter({f"g{i}": c for i, c in enumerate([1] * 10 + [2] * 4 + [3] * 3 + [4] * 2 + [7])})
    y = 10 / (10 + 2 * 4)
    assert baselines.modified_discounts(counts) == pytest.approx((1 - 2 * y * 4 / 10, 2 - 3 * y * 3 / 4, 3 - 4 * y * 2 / 3))
    # many thrice-seen n-grams push D2 below 0: it falls back to Y, so that every context frees some mass
    skewed = Counter({f"g{i}": c for i, c in enumerate([1] * 5 + [2] * 2 + [3] * 20 + [4])})
    y = 5 / (5 + 2 * 2)
    assert 2 - 3 * y * 20 / 2 < 0 and baselines.modified_discounts(skewed)[1] == pytest.approx(y)


def test_every_target_of_a_small_corpus_has_a_probability(small_data):
    """Every order's discounts are positive, so no test word after a seen context gets probability 0."""
    tokenizer = WordTokenizer.from_texts([(small_data / "train_LM.txt").read_text(encoding="utf-8")])
    model = baselines.ModifiedKneserNey(tokenizer.encode((small_data / "train_LM.txt").read_text(encoding="utf-8")),
                                        tokenizer.vocab_size, order=5)
    assert all(d > 0 for discounts in model.discounts.values() for d in discounts)
    test = tokenizer.encode((small_data / "test_LM_obama.txt").read_text(encoding="utf-8"))
    assert min(model.target_probabilities(test)) > 0 and math.isfinite(model.perplexity(test))


def test_modified_kneser_ney_scores_the_trigrams_targets():
    model, trigram = baselines.ModifiedKneserNey(TOY_STREAM, 8, order=3), KneserNeyTrigram(TOY_STREAM, 8)
    assert len(model.target_probabilities(TOY_STREAM[:12])) == len(trigram.target_probabilities(TOY_STREAM[:12])) == 11
    assert model.target_probabilities(TOY_STREAM[:3])[1] == model.probability(TOY_STREAM[2], TOY_STREAM[:2])
