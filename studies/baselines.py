"""Non-neural baselines for the course data: naive Bayes, TF-IDF logistic regression, a Kneser–Ney trigram LM.
`--part three --improve` runs them beside the transformers (studies/improvement.py).

Everything uses the course vocabulary (`WordTokenizer.from_texts(speeches.vocabulary_texts())`) with `<unk>` for
words outside it, so the numbers sit beside the transformer's.

The trigram perplexity has exactly `main.perplexity`'s targets: every token of a test file after the first. The
context is cut at the file start only, so token 1 is scored given token 0 alone (bigram and unigram levels); the
transformer also restarts its context at each window, which a two-word history barely feels. `<unk>` is an
ordinary target for both; it never occurs in train_LM.txt (all of it is in the vocabulary), so the trigram model
reaches it through the uniform floor only. Scoring just the targets with a full two-word context (from the third
token) gives 243.9 / 380.6 / 267.0, which round to the course handout's 244 / 381 / 267; ours are 244.1 / 380.3 / 267.0.

A second row, Kneser–Ney with novel-word mass (`NovelMassKneserNey`), moves a fraction λ of every distribution
evenly onto the vocabulary words never seen in train_LM.txt, λ tuned on the decoder's validation split: the same
move the decoder gets (models/novel_words.py), so the comparison stays like with like.

Why our own implementations rather than NLTK's (both were tried on this data):
- `nltk.NaiveBayesClassifier` is fast (about 1 s) and scores 91.2%, but it is a different model: each feature is
  a categorical variable P(feature = value | class) scored only where present in the document (absent features
  count for nothing), with fixed add-0.5 smoothing. It is neither multinomial nor Bernoulli, so the multinomial
  model over unigram + bigram counts with a tuned α is written here in a few lines of torch.
- `nltk.lm.KneserNeyInterpolated` (3.10) rescans every trigram context on each query (about 10 ms a token, minutes
  a test file), and its lowest level is the bare continuation unigram with no uniform floor, so `<unk>` and every
  vocabulary word never seen in train_LM.txt get probability 0: 2 of the first 40 Obama targets, infinite perplexity.
"""

import math
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from dataset import Speeches, lines_of, overlap_flags, speaker_blocks, split_lines, stratified_split
from tokenizer import PAD_ID, UNK_ID, WordTokenizer

VALIDATION_FRACTION = 0.1  # the decoder's held-out tail (training.PRESETS["best"]), so both tune on the same text
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)
L2_STRENGTHS = (1e-6, 1e-5, 1e-4, 1e-3)  # l2 = 1 / (C · N) in scikit-learn terms


# ---------------------------------------------------------------- features and splits


def ngram_counts(tokenizer: WordTokenizer, text: str) -> Counter:
    """Counts of the word unigrams (id,) and bigrams (id, id) of `text`, out-of-vocabulary words as `<unk>`."""
    ids = tokenizer.encode(text)
    return Counter([(i,) for i in ids] + list(pairwise(ids)))


def segment_counts(tokenizer: WordTokenizer, texts: Sequence[str]) -> list[Counter]:
    """ngram_counts of each text."""
    return [ngram_counts(tokenizer, text) for text in texts]


def count_matrix(documents: list[Counter], columns: dict) -> torch.Tensor:
    """Sparse (N, F) float64 counts; features without a column (unseen when fitting) are dropped."""
    entries = [(row, columns[feature], count) for row, document in enumerate(documents)
               for feature, count in document.items() if feature in columns]
    rows, cols, values = zip(*entries) if entries else ((), (), ())
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).view(2, -1),
                                   torch.tensor(values, dtype=torch.float64), (len(documents), len(columns)),
                                   check_invariants=True).coalesce()


def feature_columns(documents: list[Counter]) -> dict:
    """Feature -> column, for every feature of the documents a model is fitted on."""
    return {feature: column for column, feature in enumerate(dict.fromkeys(f for d in documents for f in d))}


def to_csr(matrix: torch.Tensor) -> torch.Tensor:
    """A CSR copy: its products are ~15x faster than COO's here; torch's "beta" notice is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


def accuracy(predicted: Sequence[int], labels: Sequence[int]) -> float | None:
    """Percent of equal entries (None when empty, as training.accuracy)."""
    return 100.0 * sum(p == y for p, y in zip(predicted, labels)) / len(labels) if len(labels) else None


def paired_exact_test(first_right: Sequence[bool], second_right: Sequence[bool]) -> dict:
    """McNemar's exact test of two classifiers on the same items: the items only the first gets right, those only
    the second gets right, and the two-sided p-value of so lopsided a split if each is equally likely (a sign test
    over the disagreements: 2 · P(Binomial(m, 1/2) <= min), at most 1)."""
    first_only = sum(a and not b for a, b in zip(first_right, second_right, strict=True))
    second_only = sum(b and not a for a, b in zip(first_right, second_right, strict=True))
    disagreements = first_only + second_only
    tail = sum(math.comb(disagreements, k) for k in range(min(first_only, second_only) + 1)) / 2 ** disagreements
    return {"first_only": first_only, "second_only": second_only, "p_value": min(1.0, 2 * tail)}


# ---------------------------------------------------------------- classifiers


@dataclass
class NaiveBayes:
    """Multinomial naive Bayes: class priors from the training frequencies, add-α smoothed feature likelihoods."""

    columns: dict
    log_prior: torch.Tensor  # (C,)
    log_likelihood: torch.Tensor  # (C, F)

    @classmethod
    def fit(cls, documents: list[Counter], labels: Sequence[int], alpha: float, num_classes: int | None = None) -> "NaiveBayes":
        """Fit on feature counts; the feature set is every feature of `documents`; classes 0 .. num_classes - 1
        (default: up to the largest label)."""
        onehot = F.one_hot(torch.as_tensor(labels), num_classes or -1).double()  # (N, C)
        columns = feature_columns(documents)
        return cls.fit_counts(count_matrix(documents, columns), onehot, alpha, columns)

    @classmethod
    def fit_counts(cls, counts: torch.Tensor, weights: torch.Tensor, alpha: float, columns: dict,
                   prior: torch.Tensor | None = None) -> "NaiveBayes":
        """Fit on a count_matrix where document n counts weights[n, c] times in class c ((N, C): one-hot labels, or
        soft ones); the prior is the weights' class shares unless given."""
        smoothed = torch.sparse.mm(counts.t(), weights).t() + alpha  # (C, F)
        log_likelihood = smoothed.log() - smoothed.sum(1, keepdim=True).log()
        return cls(columns, (weights.sum(0) / weights.sum() if prior is None else prior).log(), log_likelihood)

    def log_posterior(self, documents: list[Counter]) -> torch.Tensor:
        """log P(class | document): (N, C)."""
        return self.log_posterior_of_counts(count_matrix(documents, self.columns))

    def log_posterior_of_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """log P(class | document) of a count_matrix over this model's columns: (N, C)."""
        joint = torch.sparse.mm(counts, self.log_likelihood.t()) + self.log_prior
        return joint - joint.logsumexp(1, keepdim=True)

    def predict(self, documents: list[Counter]) -> list[int]:
        """The most probable class of each document."""
        return self.log_posterior(documents).argmax(1).tolist()


def tfidf(counts: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """Rows of counts * idf scaled to unit L2 norm (sparse in, sparse out)."""
    rows, cols = counts.indices()
    values = counts.values() * idf[cols]
    norms = torch.zeros(counts.shape[0], dtype=values.dtype).index_add_(0, rows, values**2).sqrt()
    return torch.sparse_coo_tensor(counts.indices(), values / norms[rows].clamp_min(1e-12), counts.shape,
                                   check_invariants=False)  # indices copied from a checked tensor


def softmax_regression_loss(inputs, inputs_t, targets, weight, bias, l2: float):
    """Mean cross-entropy + l2/2 * |weight|², and its gradients, written out: sparse autograd is ~10x slower here."""
    logits = inputs @ weight + bias  # (N, C)
    error = (logits.softmax(1) - F.one_hot(targets, logits.shape[1])) / len(targets)  # d(mean loss)/d(logits)
    loss = F.cross_entropy(logits, targets) + 0.5 * l2 * weight.pow(2).sum()
    return loss, inputs_t @ error + l2 * weight, error.sum(0)


@dataclass
class TfidfLogisticRegression:
    """Softmax regression on L2-normalised TF-IDF rows; idf = ln((1 + N) / (1 + df)) + 1, as scikit-learn smooths it."""

    columns: dict
    idf: torch.Tensor  # (F,)
    weight: torch.Tensor  # (F, C)
    bias: torch.Tensor  # (C,)

    @classmethod
    def fit(cls, documents: list[Counter], labels: Sequence[int], l2: float, max_iter: int = 500):
        """Full-batch L-BFGS from zero weights: the loss is convex, so the result is deterministic; the bias is not penalised."""
        columns = feature_columns(documents)
        counts = count_matrix(documents, columns)
        document_frequency = torch.bincount(counts.indices()[1], minlength=len(columns))
        idf = ((1 + len(documents)) / (1 + document_frequency.double())).log() + 1
        inputs = tfidf(counts, idf)
        inputs, inputs_t, targets = to_csr(inputs), to_csr(inputs.t().coalesce()), torch.as_tensor(labels)
        num_classes = int(targets.max()) + 1
        weight = torch.zeros(len(columns), num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

        @torch.no_grad()
        def closure():
            loss, weight.grad, bias.grad = softmax_regression_loss(inputs, inputs_t, targets, weight, bias, l2)
            return loss

        optimizer.step(closure)
        return cls(columns, idf, weight.detach(), bias.detach())

    def predict(self, documents: list[Counter]) -> list[int]:
        """The highest-scoring class of each document."""
        logits = torch.sparse.mm(tfidf(count_matrix(documents, self.columns), self.idf), self.weight) + self.bias
        return logits.argmax(1).tolist()


@contextmanager
def one_thread():
    """Run torch on one thread inside the block: on a busy 2-core machine, thread hand-offs for these small
    vector ops made the classifiers 3-6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tune_and_fit(model_class, documents: list[Counter], labels: list[int], grid: Sequence[float], seed: int,
                 extra=None):
    """Pick the grid value with the best accuracy on a stratified 10% of train, then refit on all of it. `extra`,
    given the indices a fit trains on, returns more (documents, labels) to train on beside them."""
    train, validation = (part.tolist() for part in stratified_split(labels, 0.1, seed=seed))

    def training_set(indices):  # built once per set of indices, not once per grid value
        more_documents, more_labels = extra(indices) if extra else ([], [])
        return [documents[i] for i in indices] + more_documents, [labels[i] for i in indices] + more_labels

    scores, selection = {}, training_set(train)
    with one_thread():
        for value in grid:
            model = model_class.fit(*selection, value)
            scores[value] = accuracy(model.predict([documents[i] for i in validation]), [labels[i] for i in validation])
        best = max(grid, key=scores.get)  # the first of equal scores, in grid order
        model = model_class.fit(*training_set(list(range(len(documents)))), best)
    return model, best, {str(value): score for value, score in scores.items()}


def grouped_accuracy(predicted: list[int], labels: list[int], groups: dict[str, list[bool]]) -> dict:
    """test_accuracy<suffix> and num_test<suffix> over the rows each group keeps."""
    result = {}
    for suffix, where in groups.items():
        kept = [i for i, keep in enumerate(where) if keep]
        result[f"test_accuracy{suffix}"] = accuracy([predicted[i] for i in kept], [labels[i] for i in kept])
        result[f"num_test{suffix}"] = len(kept)
    return result


def test_groups(speeches: Speeches) -> dict[str, list[bool]]:
    """grouped_accuracy's groups of test_CLS: every segment, and those seen, unseen, in neither training file."""
    overlap = overlap_flags(speeches)
    return {"": [True] * len(speeches.test_cls.texts), "_seen": overlap["in_train_cls"],
            "_unseen": [not seen for seen in overlap["in_train_cls"]], "_unseen_both": overlap["in_neither"]}


def block_documents(speeches: Speeches, tokenizer: WordTokenizer):
    """tune_and_fit's `extra`: train_LM.txt's lines labelled by their speaker block (dataset.speaker_blocks) from the
    segments a fit trains on, as counts and labels."""
    def extra(indices):
        found = speaker_blocks(speeches, indices)
        return segment_counts(tokenizer, [line for line, _ in found]), [label for _, label in found]
    return extra


def naive_bayes_test_predictions(speeches: Speeches, tokenizer: WordTokenizer, seed: int = 0,
                                 blocks: bool = False) -> tuple[list[int], float]:
    """Naive Bayes fitted as classifier_baselines fits it (α on validation, then all of train_CLS; with `blocks`,
    the speaker blocks' lines too): its class for each test_CLS segment, and the α chosen."""
    train = segment_counts(tokenizer, speeches.train_cls.texts)
    model, alpha, _ = tune_and_fit(NaiveBayes, train, speeches.train_cls.labels, ALPHAS, seed,
                                   block_documents(speeches, tokenizer) if blocks else None)
    return model.predict(segment_counts(tokenizer, speeches.test_cls.texts)), alpha


def classifier_baselines(speeches: Speeches, tokenizer: WordTokenizer, seed: int = 0, blocks: bool = False) -> dict:
    """Naive Bayes and TF-IDF logistic regression, tuned on validation, scored on test_CLS (overall and by overlap);
    with `blocks`, each fit also trains on train_LM.txt's lines labelled by their speaker block (dataset.speaker_blocks,
    from the segments it trains on)."""
    started = time.perf_counter()
    train = segment_counts(tokenizer, speeches.train_cls.texts)
    test = segment_counts(tokenizer, speeches.test_cls.texts)
    results = {"feature_seconds": time.perf_counter() - started}
    labels = speeches.train_cls.labels
    groups = test_groups(speeches)
    extra = block_documents(speeches, tokenizer) if blocks else None
    for name, model_class, grid, knob in (("naive_bayes", NaiveBayes, ALPHAS, "alpha"),
                                          ("tfidf_logreg", TfidfLogisticRegression, L2_STRENGTHS, "l2")):
        started = time.perf_counter()
        model, best, validation = tune_and_fit(model_class, train, labels, grid, seed, extra)
        predicted = model.predict(test)
        results[name] = {knob: best, "validation_accuracy": validation}
        results[name].update(grouped_accuracy(predicted, speeches.test_cls.labels, groups))
        results[name]["seconds"] = time.perf_counter() - started
    return results


EM_WEIGHTS = (0.1, 0.3, 1.0)  # an unlabelled document's weight against a labelled one's (Nigam et al.'s λ)
EM_ITERATIONS = 10


def naive_bayes_em(documents: list[Counter], labels: Sequence[int], unlabelled: list[Counter], alpha: float,
                   weight: float, num_classes: int, iterations: int = EM_ITERATIONS) -> NaiveBayes:
    """Semi-supervised naive Bayes by EM (Nigam et al., 2000, their EM-λ): fitted on the labelled documents, then
    `iterations` times every unlabelled document takes its posterior as soft labels (E) and the model is refitted on
    both, the unlabelled ones weighted by `weight` (M). Its features are both sets'; its prior stays the labelled
    documents' (the unlabelled text's balance of classes is unknown)."""
    onehot = F.one_hot(torch.as_tensor(labels), num_classes).double()  # (N, C)
    columns, prior = feature_columns(documents + unlabelled), onehot.mean(0)
    labelled_counts, unlabelled_counts = count_matrix(documents, columns), count_matrix(unlabelled, columns)
    both = torch.cat([labelled_counts, unlabelled_counts])  # (N + U, F), each document counted once
    model = NaiveBayes.fit_counts(labelled_counts, onehot, alpha, columns, prior)
    for _ in range(iterations):
        soft = model.log_posterior_of_counts(unlabelled_counts).exp()  # (U, C)
        model = NaiveBayes.fit_counts(both, torch.cat([onehot, weight * soft]), alpha, columns, prior)
    return model


def semi_supervised_naive_bayes(speeches: Speeches, tokenizer: WordTokenizer, seed: int = 0) -> dict:
    """Naive Bayes by EM with train_LM.txt's lines as the unlabelled documents, α and the weight chosen on the
    validation split classifier_baselines uses; scored on test_CLS as it scores."""
    started = time.perf_counter()
    train = segment_counts(tokenizer, speeches.train_cls.texts)
    unlabelled = segment_counts(tokenizer, lines_of(speeches.train_lm))
    classes = len(speeches.class_names)

    class EM:  # tune_and_fit's model class: its grid value is (alpha, weight)
        @staticmethod
        def fit(documents, labels, value):
            return naive_bayes_em(documents, labels, unlabelled, *value, num_classes=classes)

    grid = [(alpha, weight) for alpha in ALPHAS for weight in EM_WEIGHTS]
    model, (alpha, weight), validation = tune_and_fit(EM, train, speeches.train_cls.labels, grid, seed)
    predicted = model.predict(segment_counts(tokenizer, speeches.test_cls.texts))
    return {"alpha": alpha, "weight": weight, "unlabelled_lines": len(unlabelled), "validation_accuracy": validation,
            **grouped_accuracy(predicted, speeches.test_cls.labels, test_groups(speeches)),
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- Kneser–Ney trigram language model


def context_totals(counts: Counter) -> dict:
    """For n-gram counts keyed (*context, word): context -> (sum of counts, number of distinct words)."""
    totals = defaultdict(lambda: [0, 0])
    for ngram, count in counts.items():
        totals[ngram[:-1]][0] += count
        totals[ngram[:-1]][1] += 1
    return dict(totals)


class KneserNeyTrigram:
    """Interpolated Kneser–Ney trigram model over token ids (Chen & Goodman 1998; Jurafsky & Martin ch. 3).

    P3(w | u v) = (max(c(u v w) - D, 0) + D · N1+(u v •) · P2(w | v)) / c(u v •)
    P2(w | v)   = (max(N1+(• v w) - D, 0) + D · N1+(v •) · P1(w)) / N1+(• v •)    continuation counts from trigram types
    P1(w)       = (max(N1+(• w) - D, 0) + D · N1+(•) / V) / N1+(• •)             continuation counts from bigram types
    A context never seen in training hands all its mass to the next level down; the last level is uniform over all
    V = vocab_size ids (`<pad>` included), the transformer's output space, so every vocabulary word has P > 0.
    """

    def __init__(self, stream: Sequence[int], vocab_size: int, discount: float = 0.75):
        ids = [int(i) for i in stream]
        self.vocab_size, self.discount = vocab_size, discount
        self.trigrams = Counter(zip(ids, ids[1:], ids[2:]))
        self.bigrams = Counter((v, w) for _, v, w in self.trigrams)  # N1+(• v w): distinct words before v w
        self.unigrams = Counter(w for _, w in set(pairwise(ids)))  # N1+(• w): distinct words before w
        self.trigram_totals = context_totals(self.trigrams)
        self.bigram_totals = context_totals(self.bigrams)
        self.unigram_total, self.unigram_types = sum(self.unigrams.values()), len(self.unigrams)

    def interpolate(self, count: float, totals: tuple[int, int], lower: float) -> float:
        """One level: discounted count plus the discounted mass spread by `lower`; all of `lower` for an unseen context."""
        total, types = totals
        return (max(count - self.discount, 0) + self.discount * types * lower) / total if total else lower

    def probability(self, word: int, context: Sequence[int] = ()) -> float:
        """P(word | the last two ids of context), with fewer levels when the context is shorter."""
        context = tuple(int(i) for i in context)[-2:]
        uniform = 1 / self.vocab_size
        probability = self.interpolate(self.unigrams[word], (self.unigram_total, self.unigram_types), uniform)
        if context:
            probability = self.interpolate(self.bigrams[(context[-1], word)],
                                           self.bigram_totals.get(context[-1:], (0, 0)), probability)
        if len(context) == 2:
            probability = self.interpolate(self.trigrams[(*context, word)], self.trigram_totals.get(context, (0, 0)),
                                           probability)
        return probability

    def target_probabilities(self, stream: Sequence[int], first_target: int = 1) -> list[float]:
        """P(token t | the two before it) for every t from `first_target` on; 1 gives training.perplexity's targets."""
        ids = [int(i) for i in stream]
        if len(ids) <= first_target:
            raise ValueError(f"perplexity needs more than {first_target} tokens")
        # the context is cut at the file start: token 1 is scored given token 0 alone (levels P2 and P1)
        return [self.probability(ids[t], ids[max(0, t - 2):t]) for t in range(first_target, len(ids))]

    def perplexity(self, stream: Sequence[int], first_target: int = 1) -> float:
        """exp(mean -log P) over the tokens from `first_target` on; the default 1 scores main.perplexity's targets."""
        probabilities = self.target_probabilities(stream, first_target)
        return math.exp(-sum(map(math.log, probabilities)) / len(probabilities))


def modified_discounts(counts: Counter) -> tuple[float, float, float]:
    """Chen & Goodman's three discounts (D1, D2, D3+) from the count-of-counts n1..n4 of one order's counts:
    Y = n1 / (n1 + 2 n2), D_j = j - (j + 1) Y n_{j+1} / n_j. Where the formula leaves (0, j], or a small corpus has
    no n-gram counted j times, D_j is Y (Ney's single discount; 0.5 without n1 and n2): a discount of 0 would free no
    mass for the orders below, and a word unseen after a seen context would get probability 0."""
    n = Counter(count for count in counts.values() if count <= 4)
    y = n[1] / (n[1] + 2 * n[2]) if n[1] + n[2] else 0.5
    found = []
    for j in (1, 2, 3):
        discount = j - (j + 1) * y * n[j + 1] / n[j] if n[j] else 0.0
        found.append(discount if 0 < discount <= j else y)
    return tuple(found)


class ModifiedKneserNey:
    """Interpolated modified Kneser–Ney of any order over token ids (Chen & Goodman 1998, as KenLM estimates it).

    Order k's counts a(h w) are the raw counts at the highest order and continuation counts N1+(• h w) below it;
    P_k(w | h) = (a(h w) - D_k(a(h w))) / a(h •) + γ(h) P_{k-1}(w | h minus its first id), with
    γ(h) = (D_k1 N1(h •) + D_k2 N2(h •) + D_k3+ N3+(h •)) / a(h •) and the three discounts of each order from its
    count-of-counts (modified_discounts). Under the unigrams is the uniform distribution over all V ids, so every
    vocabulary word has P > 0; a context never seen hands all its mass to the order below. The scored targets are
    KneserNeyTrigram's: every token after the first, its context cut at the file start.
    """

    def __init__(self, stream: Sequence[int], vocab_size: int, order: int = 5):
        if order < 1:
            raise ValueError(f"the order must be at least 1, got {order}")
        ids = [int(i) for i in stream]
        self.vocab_size, self.order = vocab_size, order
        # counts[k]: (h, w) -> a(h w) for the k-grams (h has k - 1 ids); raw at the top, continuation counts below
        self.counts = {order: Counter(tuple(ids[i:i + order]) for i in range(len(ids) - order + 1))}
        for k in range(order - 1, 0, -1):
            self.counts[k] = Counter(gram[1:] for gram in self.counts[k + 1])
        self.discounts = {k: modified_discounts(counts) for k, counts in self.counts.items()}
        self.contexts = {k: self.context_statistics(k) for k in self.counts}

    def context_statistics(self, k: int) -> dict:
        """Per context h of order k: (a(h •), the mass γ(h) a(h •) its discounts free)."""
        d1, d2, d3 = self.discounts[k]
        statistics = defaultdict(lambda: [0, 0.0])
        for gram, count in self.counts[k].items():
            entry = statistics[gram[:-1]]
            entry[0] += count
            entry[1] += d1 if count == 1 else d2 if count == 2 else d3
        return dict(statistics)

    def discount(self, k: int, count: int) -> float:
        """D_k(count): 0 for an unseen n-gram."""
        d1, d2, d3 = self.discounts[k]
        return 0.0 if count == 0 else d1 if count == 1 else d2 if count == 2 else d3

    def probability(self, word: int, context: Sequence[int] = ()) -> float:
        """P(word | the last order - 1 ids of context), with fewer levels when the context is shorter."""
        context = tuple(int(i) for i in context)[-(self.order - 1):] if self.order > 1 else ()
        probability = 1.0 / self.vocab_size
        for k in range(1, len(context) + 2):
            history = context[len(context) - k + 1:]
            total, freed = self.contexts[k].get(history, (0, 0.0))
            if total:  # an unseen context keeps the order below as it is
                count = self.counts[k].get((*history, word), 0)
                probability = (count - self.discount(k, count) + freed * probability) / total
        return probability

    def target_probabilities(self, stream: Sequence[int], first_target: int = 1) -> list[float]:
        """P(token t | the order - 1 before it) for every t from `first_target` on (KneserNeyTrigram's targets)."""
        ids = [int(i) for i in stream]
        if len(ids) <= first_target:
            raise ValueError(f"perplexity needs more than {first_target} tokens")
        return [self.probability(ids[t], ids[max(0, t - self.order + 1):t]) for t in range(first_target, len(ids))]

    def perplexity(self, stream: Sequence[int], first_target: int = 1) -> float:
        """exp(mean -log P) over the tokens from `first_target` on."""
        probabilities = self.target_probabilities(stream, first_target)
        return math.exp(-sum(map(math.log, probabilities)) / len(probabilities))


# ---------------------------------------------------------------- novel-word mass: the same move for any model


NOVEL_WEIGHTS = tuple(i / 200 for i in range(61))  # 0 to 0.3 in steps of 0.005


def never_seen_ids(train_ids: Sequence[int], vocab_size: int) -> set[int]:
    """Vocabulary ids that never occur in the training stream (`<unk>` included), `<pad>` excepted: never a target."""
    return set(range(vocab_size)) - set(int(i) for i in train_ids) - {PAD_ID}


def with_novel_mass(probabilities: Sequence[float], is_never_seen: Sequence[bool], weight: float,
                    num_never_seen: int) -> list[float]:
    """(1 - weight) P(w) + weight / |never seen| where w is never seen: the target probabilities after moving
    `weight` of every distribution evenly onto the never-seen words (each distribution still sums to 1)."""
    return [(1 - weight) * p + (weight / num_never_seen if novel else 0.0) for p, novel in zip(probabilities, is_never_seen)]


def mean_nll(probabilities: Sequence[float]) -> float:
    """Mean -log P: the log of the perplexity."""
    return -sum(map(math.log, probabilities)) / len(probabilities)


def tune_novel_weight(probabilities: Sequence[float], is_never_seen: Sequence[bool], num_never_seen: int,
                      grid: Sequence[float] = NOVEL_WEIGHTS) -> tuple[float, dict[float, float]]:
    """The weight of `grid` with the lowest mean NLL on these (validation) targets, and every weight's perplexity."""
    perplexities = {w: math.exp(mean_nll(with_novel_mass(probabilities, is_never_seen, w, num_never_seen))) for w in grid}
    return min(grid, key=perplexities.get), perplexities


class NovelMassKneserNey:
    """A Kneser–Ney model with a fraction `weight` of every distribution moved evenly onto the never-seen ids."""

    def __init__(self, model: KneserNeyTrigram, never_seen: set[int], weight: float):
        self.model, self.never_seen, self.weight = model, never_seen, weight

    def probability(self, word: int, context: Sequence[int] = ()) -> float:
        """(1 - weight) P_KN(word | context), plus weight / |never seen| if the word is never seen."""
        return with_novel_mass([self.model.probability(word, context)], [word in self.never_seen], self.weight,
                               len(self.never_seen))[0]

    target_probabilities = KneserNeyTrigram.target_probabilities
    perplexity = KneserNeyTrigram.perplexity


def novel_mass_kneser_ney(train_ids: Sequence[int], validation_ids: Sequence[int], all_train_ids: Sequence[int],
                          vocab_size: int) -> tuple[NovelMassKneserNey, dict]:
    """Tune the novel-word weight on validation (a trigram fitted on the rest, never-seen words of the rest),
    then apply it to the trigram fitted on all the training text, with its own never-seen words."""
    selection = KneserNeyTrigram(train_ids, vocab_size)
    never_seen = never_seen_ids(train_ids, vocab_size)
    probabilities = selection.target_probabilities(validation_ids)
    weight, perplexities = tune_novel_weight(probabilities, [int(i) in never_seen for i in validation_ids[1:]],
                                             len(never_seen))
    model = NovelMassKneserNey(KneserNeyTrigram(all_train_ids, vocab_size), never_seen_ids(all_train_ids, vocab_size), weight)
    return model, {"weight": weight, "validation_perplexity": perplexities[weight],
                   "validation_perplexity_without": perplexities[0.0], "num_never_seen": len(model.never_seen)}


def lm_baseline(speeches: Speeches, tokenizer: WordTokenizer, extra: dict[str, str] | None = None) -> dict:
    """Kneser–Ney trigram (D = 0.75) fitted on train_LM.txt, as the course defines it and with novel-word mass;
    perplexity on each test_LM file and each `extra` text."""
    started = time.perf_counter()
    train = tokenizer.encode(speeches.train_lm)
    model = KneserNeyTrigram(train, tokenizer.vocab_size)
    texts = {**speeches.test_lm, **(extra or {})}
    streams = {name: tokenizer.encode(text) for name, text in texts.items()}
    return {"kneser_ney": {"discount": model.discount, "train_tokens": len(train),
                           "perplexity": {name: model.perplexity(ids) for name, ids in streams.items()},
                           # targets with a full two-word context only: this rounds to the course handout's figures
                           "perplexity_from_third_token": {name: model.perplexity(ids, 2) for name, ids in streams.items()},
                           "num_targets": {name: len(ids) - 1 for name, ids in streams.items()},
                           "num_unk_targets": {name: ids[1:].count(UNK_ID) for name, ids in streams.items()},
                           "seconds": time.perf_counter() - started},
            "kneser_ney_novel_mass": novel_mass_row(speeches, tokenizer, streams)}


def novel_mass_row(speeches: Speeches, tokenizer: WordTokenizer, streams: dict[str, list[int]]) -> dict:
    """Kneser–Ney with the novel-word weight tuned on the decoder's validation split (the last 10% of the lines)."""
    started = time.perf_counter()
    train_text, validation_text = split_lines(speeches.train_lm, VALIDATION_FRACTION)
    model, tuning = novel_mass_kneser_ney(tokenizer.encode(train_text), tokenizer.encode(validation_text),
                                          tokenizer.encode(speeches.train_lm), tokenizer.vocab_size)
    return {**tuning, "perplexity": {name: model.perplexity(ids) for name, ids in streams.items()},
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- two count models mixed: the course text and more text


INTERPOLATION_WEIGHTS = tuple(i / 20 for i in range(1, 20))  # the in-domain model's weight: 0.05 to 0.95


class InterpolatedModel:
    """P(w | h) = weight · P_first(w | h) + (1 - weight) · P_second(w | h): a mixture of two count models over the same
    ids, each with its own context length (both distributions sum to 1, so the mixture does)."""

    def __init__(self, first, second, weight: float):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"an interpolation weight must be in [0, 1], got {weight}")
        self.first, self.second, self.weight = first, second, weight

    def probability(self, word: int, context: Sequence[int] = ()) -> float:
        """The mixture's P(word | context); each model reads as much of the context as its order allows."""
        return self.weight * self.first.probability(word, context) + (1 - self.weight) * self.second.probability(word, context)

    def target_probabilities(self, stream: Sequence[int], first_target: int = 1) -> list[float]:
        """Each model's target probabilities (its own context length), mixed."""
        return [self.weight * p + (1 - self.weight) * q for p, q in zip(self.first.target_probabilities(stream, first_target),
                                                                        self.second.target_probabilities(stream, first_target))]

    def perplexity(self, stream: Sequence[int], first_target: int = 1) -> float:
        """exp(mean -log P) over the tokens from `first_target` on."""
        return math.exp(mean_nll(self.target_probabilities(stream, first_target)))


def interpolate_on_validation(make_model, train_ids: Sequence[int], validation_ids: Sequence[int],
                              all_train_ids: Sequence[int], other, grid: Sequence[float] = INTERPOLATION_WEIGHTS):
    """The in-domain model's weight chosen on validation (make_model fitted on `train_ids`, mixed with `other`), then
    the mixture of make_model fitted on all the training text with `other`; and every weight's validation perplexity."""
    own, theirs = make_model(train_ids).target_probabilities(validation_ids), other.target_probabilities(validation_ids)
    perplexities = {w: math.exp(mean_nll([w * p + (1 - w) * q for p, q in zip(own, theirs)])) for w in grid}
    weight = min(grid, key=perplexities.get)
    return InterpolatedModel(make_model(all_train_ids), other, weight), {"weight": weight,
                                                                       "validation_perplexity": perplexities[weight],
                                                                       "validation_perplexities": perplexities}
