"""The Hugging Face bridge against `transformers` and `tokenizers` as independent references.

Nothing is downloaded: tiny random GPT-2 and Llama models and a small tokenizer are built here. Every
parameter (norm weights and biases included) is drawn at random, so a misplaced tensor cannot hide.
"""

import json
import re

import pytest
import torch

import main
import utilities
from models.generation import generate
from tokenizer import ByteBPETokenizer, RenumberedBPETokenizer
from tools import hf_bridge
from transformer import TransformerConfig, TransformerLM

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB, BLOCK = 97, 24
TOLERANCE = 1e-5
LLAMAS = {  # name: (key/value heads, biases on, RoPE base, RMSNorm epsilon)
    "mha": (4, False, 10000.0, 1e-6),
    "gqa2": (2, True, 500000.0, 1e-5),
    "gqa1": (1, True, 10000.0, 1e-6),
}


def randomise(model: torch.nn.Module, seed: int):
    """Every parameter drawn from N(0, 0.3^2): norms and biases too, which default initialisations leave at 1 and 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def hf_gpt2(tie=True):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4,
                                     activation_function="gelu_new", tie_word_embeddings=tie)
    return randomise(transformers.GPT2LMHeadModel(config), 1)


def hf_llama(name):
    n_kv, bias, base, eps = LLAMAS[name]
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=BLOCK,
                                      attention_bias=bias, mlp_bias=bias, rope_theta=base, rms_norm_eps=eps,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return randomise(transformers.LlamaForCausalLM(config), 2)


HF_MODELS = {"gpt2": hf_gpt2, "gpt2-untied": lambda: hf_gpt2(tie=False),
             **{f"llama-{name}": (lambda name=name: hf_llama(name)) for name in LLAMAS}}
OUR_CONFIGS = {
    "gpt2": dict(feedforward="gelu_tanh", tie_embeddings=True, ff_hidden=128),
    "gpt2-shared-layers": dict(feedforward="gelu_tanh", tie_embeddings=True, ff_hidden=128, share_layers=True),
    "gpt2-relu": dict(feedforward="relu", tie_embeddings=False, ff_hidden=50, norm_eps=1e-6),
    "llama-gqa2": dict(position="rope", norm="rms", feedforward="swiglu", n_kv_heads=2, ff_hidden=60, rope_base=500000.0),
    "llama-tied": dict(position="rope", norm="rms", feedforward="swiglu", tie_embeddings=True, ff_hidden=60),
}


def ids(seed=0, batch=2, length=BLOCK):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_difference(ours: TransformerLM, theirs) -> float:
    with torch.no_grad():
        return (ours(ids()).logits - theirs(ids()).logits).abs().max().item()


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_to_ours_gives_the_same_logits(tmp_path, name):
    theirs = HF_MODELS[name]()
    theirs.save_pretrained(tmp_path / "hf")
    ours = hf_bridge.model_from_folder(tmp_path / "hf")
    assert max_difference(ours, theirs) < TOLERANCE


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The hub's gpt2 file names tensors without `transformer.` and keeps each layer's causal mask (attn.bias)."""
    import safetensors.torch

    theirs = hf_gpt2()
    theirs.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = {name.removeprefix("transformer."): tensor.clone()  # a copy: the file is rewritten below
               for name, tensor in safetensors.torch.load_file(path).items()}
    tensors.update({f"h.{n}.attn.bias": torch.tril(torch.ones(1, 1, BLOCK, BLOCK)) for n in range(2)})
    safetensors.torch.save_file({name: tensor.half() for name, tensor in tensors.items()}, path)  # as float16, too
    with torch.no_grad():
        theirs.load_state_dict({f"transformer.{name}": tensor.half().float() for name, tensor in tensors.items()
                                if not name.endswith(".attn.bias")}, strict=False)
    assert max_difference(hf_bridge.model_from_folder(tmp_path / "hf"), theirs) < TOLERANCE


@pytest.mark.parametrize("name", OUR_CONFIGS)
def test_ours_to_hf_gives_the_same_logits(tmp_path, name):
    config = TransformerConfig(vocab_size=VOCAB, block_size=BLOCK, n_embd=32, n_head=4, n_layer=2, **OUR_CONFIGS[name])
    ours = randomise(TransformerLM(config), 3)
    with torch.no_grad():
        ours.lm_head.bias.zero_()  # neither GPT-2 nor Llama has an output bias
    utilities.save_checkpoint(tmp_path / "ours", ours, {**config.to_dict(), "model": "lm"}, "{\"type\": \"absent\"}", {})
    hf_bridge.export_checkpoint(tmp_path / "ours", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM")
    assert max_difference(ours, theirs) < TOLERANCE
    back = hf_bridge.model_from_folder(tmp_path / "hf")  # and the round trip is exact
    with torch.no_grad():
        assert torch.equal(back(ids()).logits, ours(ids()).logits)


def test_llama_rope_is_not_the_even_odd_layout_without_the_permutation(tmp_path, monkeypatch):
    """The q/k row permutation is what makes the Llama logits agree: without it they do not."""
    theirs = hf_llama("gqa2")
    theirs.save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(hf_bridge, "rope_permutation", lambda heads, size: torch.arange(heads * size))
    assert max_difference(hf_bridge.model_from_folder(tmp_path / "hf"), theirs) > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa2"])
def test_kv_cache_greedy_generation_equals_transformers_generate(tmp_path, name):
    theirs = HF_MODELS[name]()
    theirs.save_pretrained(tmp_path / "hf")
    ours = hf_bridge.model_from_folder(tmp_path / "hf")
    prompt = ids(seed=5, batch=1, length=6)
    expected = theirs.generate(prompt, max_new_tokens=BLOCK - 6, do_sample=False, pad_token_id=0, eos_token_id=None)
    new = generate(ours, prompt[0].tolist(), BLOCK - 6, "greedy")
    assert new == expected[0, 6:].tolist()


# ---------------------------------------------------------------- tokenizers


def training_text(data_dir) -> list[str]:
    return (data_dir / "train_LM.txt").read_text(encoding="utf-8").splitlines()[:300]


SAMPLES = ["We will rebuild.  It's 2024's   budget -- $3.5 trillion!\n\tTabs", "naïve café über straße 😀 日本語",
           "don't you'll I'd 'S 123456789", "   leading and trailing spaces   ", "a\n\nb\r\nc"]


def test_tokenizer_trained_by_tokenizers_gives_the_same_ids_in_ours(data_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    theirs = Tokenizer(models.BPE())
    theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    theirs.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = training_text(data_dir)
    theirs.train_from_iterator(text, trainer)
    theirs.model.save(str(tmp_path))
    ours = hf_bridge.load_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert isinstance(ours, RenumberedBPETokenizer) and ours.vocab_size == theirs.get_vocab_size() == 600
    test_text = (data_dir / "test_LM_obama.txt").read_text(encoding="utf-8").splitlines()[:100]
    for sample in test_text + SAMPLES:
        assert ours.encode(sample) == theirs.encode(sample).ids, sample
        assert ours.decode(ours.encode(sample)) == sample
    assert ours.special_ids == (theirs.token_to_id("<|endoftext|>"),)


def test_our_tokenizer_written_as_vocab_and_merges_gives_the_same_ids_in_tokenizers(data_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    ours = ByteBPETokenizer.from_texts(training_text(data_dir), vocab_size=600)
    hf_bridge.write_bpe(ours, tmp_path)
    theirs = Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    test_text = (data_dir / "test_LM_wbush.txt").read_text(encoding="utf-8").splitlines()[:100]
    for sample in test_text + SAMPLES:
        assert theirs.encode(sample).ids == ours.encode(sample), sample
    back = hf_bridge.load_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert type(back) is ByteBPETokenizer and back.merges == ours.merges and back.specials == ours.specials


# ---------------------------------------------------------------- the command line


def convert(capsys, *argv):
    capsys.readouterr()  # drop what building the folder printed
    status = main.main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def gpt2_folder(tmp_path, data_dir):
    """A tiny GPT-2 folder with a byte-level tokenizer from `tokenizers` whose vocabulary fits the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path / "gpt2"
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=BLOCK, n_embd=16, n_layer=1,
                                                                 n_head=2))
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(training_text(data_dir)[:50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.model.save(str(folder))
    return folder


def test_convert_then_generate_then_back(tmp_path, data_dir, capsys):
    folder = gpt2_folder(tmp_path, data_dir)
    status, out, err = convert(capsys, "--from-hf", folder, "--to", tmp_path / "ours")
    assert status == 0 and "GPT-2" in out and "vocab.json + merges.txt" in out, err
    status = main.main(["generate", "--checkpoint", str(tmp_path / "ours"), "--prompt", "We will", "--max-new-tokens", "5"])
    assert status == 0 and capsys.readouterr().out.startswith("We will")
    status, out, err = convert(capsys, "--from", tmp_path / "ours", "--to-hf", tmp_path / "back")
    assert status == 0, err
    assert json.loads((tmp_path / "back" / "vocab.json").read_text()) == json.loads((folder / "vocab.json").read_text())
    assert (tmp_path / "back" / "merges.txt").read_text().split("\n")[1:] == \
        (folder / "merges.txt").read_text().split("\n")[1:]


def break_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


BREAKAGES = {
    "another architecture": (lambda f: break_config(f, model_type="bert"), r"config\.json: model_type 'bert'"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), r"model\.safetensors: missing"),
    "truncated weights": (lambda f: truncate(f / "model.safetensors"), r"model\.safetensors: unreadable weights"),
    "config wider than the weights": (lambda f: break_config(f, n_embd=32), r"model\.safetensors: .*config\.json implies"),
    "config deeper than the weights": (lambda f: break_config(f, n_layer=2), r"model\.safetensors: lacks the tensor"),
    "config shallower than the weights": (lambda f: break_config(f, n_layer=0),
                                          r"config\.json: n_layer must be positive"),
    "unsupported activation": (lambda f: break_config(f, activation_function="gelu_fast"),
                               r"config\.json: activation_function='gelu_fast' is not supported"),
    "merges that do not parse": (lambda f: (f / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n"),
                                 r"merges\.txt: line 3 is not a merge"),
    "vocab of another size": (lambda f: break_config(f, vocab_size=301), r"model\.safetensors: .*config\.json implies"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_folders_give_one_line_naming_the_file_and_status_2(tmp_path, data_dir, capsys, breakage):
    folder = gpt2_folder(tmp_path, data_dir)
    damage, message = BREAKAGES[breakage]
    damage(folder)
    status, _, err = convert(capsys, "--from-hf", folder, "--to", tmp_path / "ours")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("same", [True, False])
def test_a_tied_matrix_stored_twice_is_accepted_only_if_equal(tmp_path, capsys, same):
    import safetensors.torch

    theirs = hf_gpt2()
    theirs.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = {name: tensor.clone() for name, tensor in safetensors.torch.load_file(path).items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] * (1 if same else 2)
    safetensors.torch.save_file(tensors, path)
    status, _, err = convert(capsys, "--from-hf", tmp_path / "hf", "--to", tmp_path / "ours")
    assert status == (0 if same else 2), err
    assert same or "lm_head.weight differs from the token embedding" in err


def test_llama_with_scaled_rope_is_refused(tmp_path, capsys):
    hf_llama("mha").save_pretrained(tmp_path / "hf")
    break_config(tmp_path / "hf", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})
    status, _, err = convert(capsys, "--from-hf", tmp_path / "hf", "--to", tmp_path / "ours")
    assert status == 2 and "rope_type='llama3' is not supported" in err


@pytest.mark.parametrize(("changes", "message"), [
    ({"position": "alibi"}, "position='alibi' has no GPT-2 (learned) or Llama (rope) form"),
    ({"norm_placement": "post"}, "norm_placement='post' has no GPT-2 form"),
    ({"embedding_dim": 8}, "embedding_dim=8 has no GPT-2 form"),
    ({"position": "rope", "norm": "rms", "feedforward": "relu"}, "feedforward='relu' has no Llama form"),
    ({}, "the output layer has a nonzero bias"),
])
def test_checkpoints_without_a_hf_form_are_refused(tmp_path, capsys, changes, message):
    config = TransformerConfig(vocab_size=VOCAB, block_size=BLOCK, n_embd=16, n_head=2, n_layer=1, **changes)
    model = TransformerLM(config)
    if changes:
        torch.nn.init.zeros_(model.lm_head.bias)
    utilities.save_checkpoint(tmp_path / "ours", model, {**config.to_dict(), "model": "lm"}, "{\"type\": \"absent\"}", {})
    status, _, err = convert(capsys, "--from", tmp_path / "ours", "--to-hf", tmp_path / "hf")
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err
