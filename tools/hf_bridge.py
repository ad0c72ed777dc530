"""The Hugging Face bridge: GPT-2 and Llama folders (config.json, model.safetensors, vocab.json, merges.txt)
to our checkpoints and back.

A module of its own because it is a table of names and layouts between two codebases, not modelling:
transformer.py stays the lecture and never learns Hugging Face's names, utilities.py keeps our own
checkpoint format, and main.py only calls `import_folder` and `export_checkpoint`. It sits above
transformer.py, tokenizer.py and utilities.py and below main.py. Whatever our TransformerConfig cannot
express is refused with one line naming the setting: a converted model is the same function or nothing.
"""

import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch

import utilities
from tokenizer import PAD, ByteBPETokenizer, RenumberedBPETokenizer, WordTokenizer, tokenizer_from_json
from transformer import TransformerConfig, TransformerLM


class BridgeError(ValueError):
    """A folder or checkpoint that cannot be converted faithfully; the message names the file."""


def refuse(path: Path, setting: str, value) -> BridgeError:
    return BridgeError(f"{path}: {setting}={value!r} is not supported: our TransformerConfig has no equivalent")


# ---------------------------------------------------------------- byte-level BPE files (vocab.json, merges.txt)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the rest
    are shifted to 256 and up, so that vocab.json and merges.txt hold no spaces or control characters."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


BYTE_CHARS = bytes_to_unicode()
CHAR_BYTES = {char: byte for byte, char in BYTE_CHARS.items()}


def token_string(token: bytes) -> str:
    return "".join(BYTE_CHARS[b] for b in token)


def read_merges(path: Path) -> list[tuple[bytes, bytes]]:
    """The merges of merges.txt as byte strings, in rank order; BridgeError naming the line otherwise."""
    merges = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts) or not all(char in CHAR_BYTES for char in "".join(parts)):
            raise BridgeError(f"{path}: line {number} is not a merge of two byte-level tokens: {line[:40]!r}")
        merges.append(tuple(bytes(CHAR_BYTES[char] for char in part) for part in parts))
    return merges


def load_bpe(vocab_path: Path, merges_path: Path) -> ByteBPETokenizer:
    """GPT-2-style vocab.json + merges.txt as our tokenizer, keeping their ids; tokens that are neither
    a byte nor a merge (GPT-2's <|endoftext|>) become special tokens."""
    vocab = _read_json(vocab_path)
    if not all(isinstance(key, str) and isinstance(value, int) for key, value in vocab.items()):
        raise BridgeError(f"{vocab_path}: expected a JSON object of token -> integer id")
    ours: dict[bytes, int] = {bytes([b]): b for b in range(256)}  # our id, before the specials are counted
    merges = []
    for number, (left, right) in enumerate(read_merges(merges_path), start=1):
        if left not in ours or right not in ours:
            raise BridgeError(f"{merges_path}: merge {number} uses a token that is neither a byte nor an earlier merge")
        if left + right in ours or token_string(left + right) not in vocab:
            raise BridgeError(f"{merges_path}: merge {number} makes {token_string(left + right)!r}, "
                              f"which repeats an earlier token or is missing from {vocab_path.name}")
        merges.append((ours[left], ours[right]))
        ours[left + right] = 256 + len(merges) - 1
    missing = [token_string(bytes([b])) for b in range(256) if token_string(bytes([b])) not in vocab]
    if missing:
        raise BridgeError(f"{vocab_path}: lacks {len(missing)} of the 256 byte tokens, e.g. {missing[0]!r}")
    strings = {token_string(token) for token in ours}
    specials = sorted((token for token in vocab if token not in strings), key=vocab.get)
    token_ids = [vocab[s] for s in specials] + [vocab[token_string(token)] for token in ours]
    if sorted(token_ids) != list(range(len(vocab))):
        raise BridgeError(f"{vocab_path}: ids must number the {len(vocab)} tokens 0..{len(vocab) - 1}, each once")
    shift = len(specials)
    merges = [(left + shift, right + shift) for left, right in merges]
    if specials[:1] == [PAD] and token_ids == list(range(len(vocab))):
        return ByteBPETokenizer(merges, specials)  # our own layout: a folder we wrote
    return RenumberedBPETokenizer(merges, specials, token_ids)


def write_bpe(tokenizer: ByteBPETokenizer, directory: Path):
    """Our tokenizer as vocab.json + merges.txt (ids kept), readable by GPT-2-style loaders."""
    ids = getattr(tokenizer, "token_ids", range(tokenizer.vocab_size))
    tokens = [special.encode("utf-8") for special in tokenizer.specials] + [bytes([b]) for b in range(256)]
    for left, right in tokenizer.merges:
        tokens.append(tokens[left] + tokens[right])
    strings = list(tokenizer.specials) + [token_string(token) for token in tokens[len(tokenizer.specials):]]
    if len(set(strings)) != len(strings):
        raise BridgeError("the tokenizer has a special token spelled like a byte-level token; vocab.json cannot hold both")
    vocab = {string: ids[n] for n, string in sorted(enumerate(strings), key=lambda pair: ids[pair[0]])}
    merges = [f"{token_string(tokens[left])} {token_string(tokens[right])}" for left, right in tokenizer.merges]
    utilities.write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    utilities.write_text(directory / "merges.txt", "\n".join(["#version: 0.2", *merges]) + "\n")


# ---------------------------------------------------------------- reading a folder


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise BridgeError(f"{path}: missing") from error
    except (OSError, UnicodeDecodeError) as error:
        raise BridgeError(f"{path}: unreadable ({type(error).__name__})") from error


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise BridgeError(f"{path}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise BridgeError(f"{path}: expected a JSON object")
    return data


def read_safetensors(directory: Path) -> tuple[dict, Path]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists, as float32."""
    index = directory / "model.safetensors.index.json"
    files = sorted({directory / name for name in _read_json(index).get("weight_map", {}).values()}) \
        if index.is_file() else [directory / "model.safetensors"]
    tensors = {}
    for path in files:
        if not path.is_file():
            raise BridgeError(f"{path}: missing (only safetensors weights are read, never pickles)")
        try:
            tensors.update(safetensors.torch.load_file(path, device="cpu"))
        except Exception as error:  # a truncated header or body fails in several ways
            raise BridgeError(f"{path}: unreadable weights, truncated or corrupt ({type(error).__name__})") from error
    return {name: tensor.float() for name, tensor in tensors.items()}, files[0]


class Weights:
    """Named tensors of one file that are taken one by one, so that missing and unused names are both reported."""

    def __init__(self, tensors: dict, path: Path, prefix: str = ""):
        self.tensors, self.path, self.prefix = tensors, path, prefix
        self.taken: set[str] = set()

    def __contains__(self, name):
        return self.prefix + name in self.tensors

    def take(self, name: str, shape: tuple, prefixed: bool = True) -> torch.Tensor:
        full = self.prefix + name if prefixed else name
        if full not in self.tensors:
            raise BridgeError(f"{self.path}: lacks the tensor {full}")
        if tuple(self.tensors[full].shape) != tuple(shape):
            raise BridgeError(f"{self.path}: {full} has shape {tuple(self.tensors[full].shape)}, "
                              f"config.json implies {tuple(shape)}")
        self.taken.add(full)
        return self.tensors[full]

    def check_all_used(self, ignored=lambda name: False):
        unused = sorted(name for name in self.tensors if name not in self.taken and not ignored(name))
        if unused:
            raise BridgeError(f"{self.path}: {len(unused)} tensors config.json does not account for, e.g. {unused[0]}")


def rope_permutation(n_heads: int, head_size: int) -> torch.Tensor:
    """Row order turning Hugging Face's half-split RoPE pairs (i, i + hs/2) into our (2i, 2i + 1) pairs."""
    within = torch.stack([torch.arange(head_size // 2), torch.arange(head_size // 2) + head_size // 2], 1).flatten()
    return (torch.arange(n_heads)[:, None] * head_size + within).flatten()  # (n_heads * hs,)


# ---------------------------------------------------------------- GPT-2


GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def gpt2_config(hf: dict, path: Path) -> TransformerConfig:
    """Our config for a GPT-2 config.json; refuses what it cannot express."""
    fixed = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    for setting, value in fixed.items():
        if hf.get(setting, value) != value:
            raise refuse(path, setting, hf[setting])
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise refuse(path, "activation_function", activation)
    n_embd = hf.get("n_embd", 768)
    return TransformerConfig(
        vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024), n_embd=n_embd,
        n_head=hf.get("n_head", 12), n_layer=hf.get("n_layer", 12), ff_hidden=hf.get("n_inner") or 4 * n_embd,
        feedforward=GPT2_ACTIVATIONS[activation], norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        position="learned", tie_embeddings=hf.get("tie_word_embeddings", True), dropout=0.0).validate()


def gpt2_to_ours(weights: Weights, config: TransformerConfig) -> dict:
    """Our state_dict from GPT-2's tensors (Conv1D stores (in, out): transposed to nn.Linear's (out, in))."""
    C, V, F = config.n_embd, config.vocab_size, config.ff_hidden
    state = {"decoder.token_embedding.weight": weights.take("wte.weight", (V, C)),
             "decoder.positions.embedding.weight": weights.take("wpe.weight", (config.block_size, C))}
    pairs = [("norm1", "ln_1", None), ("attention.qkv", "attn.c_attn", 3 * C), ("attention.proj", "attn.c_proj", C),
             ("norm2", "ln_2", None), ("feedforward.net.0", "mlp.c_fc", F), ("feedforward.net.2", "mlp.c_proj", C)]
    for layer in range(config.n_layer):
        for ours, theirs, out in pairs:
            inputs = F if theirs == "mlp.c_proj" else C
            ours, theirs = f"decoder.blocks.{layer}.{ours}", f"h.{layer}.{theirs}"
            if out is None:  # a LayerNorm
                state[f"{ours}.weight"] = weights.take(f"{theirs}.weight", (C,))
            else:
                state[f"{ours}.weight"] = weights.take(f"{theirs}.weight", (inputs, out)).t()
            state[f"{ours}.bias"] = weights.take(f"{theirs}.bias", (out or C,))
    state["decoder.final_norm.weight"] = weights.take("ln_f.weight", (C,))
    state["decoder.final_norm.bias"] = weights.take("ln_f.bias", (C,))
    if not config.tie_embeddings:
        state["lm_head.weight"] = weights.take("lm_head.weight", (V, C), prefixed=False)  # outside `transformer.`
    return state


def ours_to_gpt2(state: dict, config: TransformerConfig) -> tuple[dict, dict]:
    """(config.json, tensors) of GPT-2 for our decoder; the inverse of gpt2_config and gpt2_to_ours."""
    activation = {ours: theirs for theirs, ours in GPT2_ACTIVATIONS.items() if theirs != "gelu_pytorch_tanh"}
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
          "n_positions": config.block_size, "n_embd": config.n_embd, "n_head": config.n_head, "n_layer": config.n_layer,
          "n_inner": config.ff_hidden, "activation_function": activation[config.feedforward],
          "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": None, "eos_token_id": None}
    tensors = {"transformer.wte.weight": state["decoder.token_embedding.weight"],
               "transformer.wpe.weight": state["decoder.positions.embedding.weight"],
               "transformer.ln_f.weight": state["decoder.final_norm.weight"],
               "transformer.ln_f.bias": state["decoder.final_norm.bias"]}
    pairs = [("norm1", "ln_1", False), ("attention.qkv", "attn.c_attn", True), ("attention.proj", "attn.c_proj", True),
             ("norm2", "ln_2", False), ("feedforward.net.0", "mlp.c_fc", True), ("feedforward.net.2", "mlp.c_proj", True)]
    for layer in range(config.n_layer):
        for ours, theirs, linear in pairs:
            weight = state[f"decoder.blocks.{layer}.{ours}.weight"]
            tensors[f"transformer.h.{layer}.{theirs}.weight"] = weight.t() if linear else weight
            tensors[f"transformer.h.{layer}.{theirs}.bias"] = state[f"decoder.blocks.{layer}.{ours}.bias"]
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    return hf, tensors


# ---------------------------------------------------------------- Llama


def llama_rope(hf: dict, path: Path) -> float:
    """RoPE's base from either spelling of the config (rope_theta, or rope_parameters in transformers 5)."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise refuse(path, "rope_type", kind)
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_config(hf: dict, path: Path) -> TransformerConfig:
    """Our config for a Llama config.json; refuses what it cannot express."""
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(path, "hidden_act", hf["hidden_act"])
    if hf.get("pretraining_tp", 1) != 1:
        raise refuse(path, "pretraining_tp", hf["pretraining_tp"])
    n_embd, n_head = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    if hf.get("head_dim") not in (None, n_embd // n_head) or n_embd % n_head:
        raise refuse(path, "head_dim", hf.get("head_dim", n_embd / n_head))
    intermediate = hf.get("intermediate_size", 11008)
    ff_hidden = (3 * intermediate + 1) // 2  # our SwiGLU keeps round(2/3 * ff_hidden) hidden units
    assert round(2 * ff_hidden / 3) == intermediate
    return TransformerConfig(
        vocab_size=hf.get("vocab_size", 32000), block_size=hf.get("max_position_embeddings", 2048), n_embd=n_embd,
        n_head=n_head, n_kv_heads=hf.get("num_key_value_heads") or n_head, n_layer=hf.get("num_hidden_layers", 32),
        ff_hidden=ff_hidden, feedforward="swiglu", norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope",
        rope_base=llama_rope(hf, path), tie_embeddings=hf.get("tie_word_embeddings", False), dropout=0.0).validate()


def llama_to_ours(weights: Weights, config: TransformerConfig, hf: dict) -> dict:
    """Our state_dict from Llama's tensors: q, k, v fused, gate and up fused, RoPE rows permuted, absent biases zero."""
    C, V, H, hs = config.n_embd, config.vocab_size, config.n_head, config.n_embd // config.n_head
    H_kv, F = config.n_kv_heads or H, round(2 * config.ff_hidden / 3)
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)

    def linear(name, out, inputs, has_bias, rows=None):
        weight = weights.take(f"{name}.weight", (out, inputs))
        bias = weights.take(f"{name}.bias", (out,)) if has_bias else torch.zeros(out)
        return (weight, bias) if rows is None else (weight[rows], bias[rows])

    state = {"decoder.token_embedding.weight": weights.take("model.embed_tokens.weight", (V, C))}
    for layer in range(config.n_layer):
        ours, theirs = f"decoder.blocks.{layer}", f"model.layers.{layer}"
        q = linear(f"{theirs}.self_attn.q_proj", H * hs, C, attention_bias, rope_permutation(H, hs))
        k = linear(f"{theirs}.self_attn.k_proj", H_kv * hs, C, attention_bias, rope_permutation(H_kv, hs))
        v = linear(f"{theirs}.self_attn.v_proj", H_kv * hs, C, attention_bias)
        o = linear(f"{theirs}.self_attn.o_proj", C, C, attention_bias)
        gate, up = linear(f"{theirs}.mlp.gate_proj", F, C, mlp_bias), linear(f"{theirs}.mlp.up_proj", F, C, mlp_bias)
        down = linear(f"{theirs}.mlp.down_proj", C, F, mlp_bias)
        state.update({
            f"{ours}.norm1.weight": weights.take(f"{theirs}.input_layernorm.weight", (C,)),
            f"{ours}.attention.qkv.weight": torch.cat([q[0], k[0], v[0]]),
            f"{ours}.attention.qkv.bias": torch.cat([q[1], k[1], v[1]]),
            f"{ours}.attention.proj.weight": o[0], f"{ours}.attention.proj.bias": o[1],
            f"{ours}.norm2.weight": weights.take(f"{theirs}.post_attention_layernorm.weight", (C,)),
            f"{ours}.feedforward.gate_up.weight": torch.cat([gate[0], up[0]]),
            f"{ours}.feedforward.gate_up.bias": torch.cat([gate[1], up[1]]),
            f"{ours}.feedforward.down.weight": down[0], f"{ours}.feedforward.down.bias": down[1],
        })
    state["decoder.final_norm.weight"] = weights.take("model.norm.weight", (C,))
    if not config.tie_embeddings:
        state["lm_head.weight"] = weights.take("lm_head.weight", (V, C))
    return state


def ours_to_llama(state: dict, config: TransformerConfig) -> tuple[dict, dict]:
    """(config.json, tensors) of Llama for our decoder; biases are written only where some are nonzero."""
    C, H, hs = config.n_embd, config.n_head, config.n_embd // config.n_head
    H_kv, F = config.n_kv_heads or H, round(2 * config.ff_hidden / 3)
    layers = range(config.n_layer)
    attention_bias = any(state[f"decoder.blocks.{n}.attention.{m}.bias"].any() for n in layers for m in ("qkv", "proj"))
    mlp_bias = any(state[f"decoder.blocks.{n}.feedforward.{m}.bias"].any() for n in layers for m in ("gate_up", "down"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
          "hidden_size": C, "intermediate_size": F, "num_hidden_layers": config.n_layer, "num_attention_heads": H,
          "num_key_value_heads": H_kv, "head_dim": hs, "hidden_act": "silu", "max_position_embeddings": config.block_size,
          "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_base,
          "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
          "attention_bias": bool(attention_bias), "mlp_bias": bool(mlp_bias),
          "tie_word_embeddings": config.tie_embeddings, "bos_token_id": None, "eos_token_id": None}
    tensors = {"model.embed_tokens.weight": state["decoder.token_embedding.weight"],
               "model.norm.weight": state["decoder.final_norm.weight"]}
    back_q, back_k = rope_permutation(H, hs).argsort(), rope_permutation(H_kv, hs).argsort()
    for layer in layers:
        ours, theirs = f"decoder.blocks.{layer}", f"model.layers.{layer}"
        qkv = [state[f"{ours}.attention.qkv.{kind}"].split([H * hs, H_kv * hs, H_kv * hs]) for kind in ("weight", "bias")]
        gate_up = [state[f"{ours}.feedforward.gate_up.{kind}"].chunk(2) for kind in ("weight", "bias")]
        parts = {"self_attn.q_proj": (qkv[0][0][back_q], qkv[1][0][back_q]),
                 "self_attn.k_proj": (qkv[0][1][back_k], qkv[1][1][back_k]),
                 "self_attn.v_proj": (qkv[0][2], qkv[1][2]),
                 "self_attn.o_proj": (state[f"{ours}.attention.proj.weight"], state[f"{ours}.attention.proj.bias"]),
                 "mlp.gate_proj": (gate_up[0][0], gate_up[1][0]), "mlp.up_proj": (gate_up[0][1], gate_up[1][1]),
                 "mlp.down_proj": (state[f"{ours}.feedforward.down.weight"], state[f"{ours}.feedforward.down.bias"])}
        for name, (weight, bias) in parts.items():
            tensors[f"{theirs}.{name}.weight"] = weight
            if (attention_bias if name.startswith("self_attn") else mlp_bias):
                tensors[f"{theirs}.{name}.bias"] = bias
        tensors[f"{theirs}.input_layernorm.weight"] = state[f"{ours}.norm1.weight"]
        tensors[f"{theirs}.post_attention_layernorm.weight"] = state[f"{ours}.norm2.weight"]
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    return hf, tensors


# ---------------------------------------------------------------- the two directions


FAMILIES = {"gpt2": "GPT-2", "llama": "Llama"}


def model_from_folder(directory: Path) -> TransformerLM:
    """Our decoder with the weights of a Hugging Face GPT-2 or Llama folder; BridgeError naming the file otherwise."""
    directory = Path(directory)
    config_path = directory / "config.json"
    hf = _read_json(config_path)
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise BridgeError(f"{config_path}: model_type {family!r} is not one of {', '.join(FAMILIES)}")
    try:
        config = gpt2_config(hf, config_path) if family == "gpt2" else llama_config(hf, config_path)
    except (TypeError, ValueError) as error:
        raise BridgeError(f"{config_path}: {error}") from error
    tensors, weights_path = read_safetensors(directory)
    if family == "gpt2":
        prefixed = any(name.startswith("transformer.") for name in tensors)
        weights = Weights(tensors, weights_path, "transformer." if prefixed else "")
        state = gpt2_to_ours(weights, config)
    else:
        weights = Weights(tensors, weights_path)
        state = llama_to_ours(weights, config, hf)
    if config.tie_embeddings and "lm_head.weight" in tensors:  # some files store the tied matrix twice
        if not torch.equal(tensors["lm_head.weight"], state["decoder.token_embedding.weight"]):
            raise BridgeError(f"{weights_path}: lm_head.weight differs from the token embedding, "
                              f"but {config_path.name} ties them (tie_word_embeddings)")
        weights.taken.add("lm_head.weight")
    # buffers older transformers saved: GPT-2's causal mask (attn.bias, attn.masked_bias), Llama's RoPE frequencies
    weights.check_all_used(lambda name: name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")))
    model = TransformerLM(config)
    state["lm_head.bias"] = torch.zeros(config.vocab_size)  # neither family has an output bias
    if config.tie_embeddings:
        state["lm_head.weight"] = state["decoder.token_embedding.weight"]
    model.load_state_dict(state)
    return model.eval()


def folder_tokenizer(directory: Path):
    """The folder's vocab.json + merges.txt as our tokenizer, or None if it has neither."""
    vocab, merges = Path(directory) / "vocab.json", Path(directory) / "merges.txt"
    if not vocab.is_file() and not merges.is_file():
        return None
    return load_bpe(vocab, merges)


def import_folder(directory: Path, checkpoint: Path) -> str:
    """Write our checkpoint for a Hugging Face folder; returns a one-line summary."""
    model = model_from_folder(directory)
    tokenizer = folder_tokenizer(directory)
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise BridgeError(f"{Path(directory) / 'vocab.json'}: {tokenizer.vocab_size} tokens, "
                          f"config.json says vocab_size {model.config.vocab_size}")
    # without vocab.json + merges.txt (a Llama's tokenizer.model), generate refuses the checkpoint by its tokenizer type
    tokenizer_json = tokenizer.to_json() if tokenizer else json.dumps({"type": "absent"})
    config = {**model.config.to_dict(), "model": "lm"}
    utilities.save_checkpoint(checkpoint, model, config, tokenizer_json, {"converted_from": str(directory)})
    kind = FAMILIES[_read_json(Path(directory) / "config.json")["model_type"]]
    return f"{kind} from {directory} -> {checkpoint} ({sum(p.numel() for p in model.parameters()):,} parameters, " \
           f"tokenizer: {'vocab.json + merges.txt' if tokenizer else 'none found'})"


def export_checkpoint(checkpoint: Path, directory: Path) -> str:
    """Write a Hugging Face folder (config.json, model.safetensors, vocab.json, merges.txt) for our decoder checkpoint."""
    model, tokenizer_json, _ = utilities.build_and_load(checkpoint)
    config, path = model.config, Path(checkpoint) / "config.json"
    if not isinstance(model, TransformerLM):
        raise BridgeError(f"{path}: holds a classifier; only decoders have a GPT-2 or Llama form")
    state = model.state_dict()
    family = {"learned": "gpt2", "rope": "llama"}.get(config.position)
    if family is None:
        raise BridgeError(f"{path}: position={config.position!r} has no GPT-2 (learned) or Llama (rope) form")
    needs = {"norm_placement": "pre", "attention_pattern": "full", "norm": "layer" if family == "gpt2" else "rms",
             "embedding_dim": None if config.embedding_dim is None else config.n_embd}  # ALBERT's narrow table: no
    if family == "gpt2" and config.n_kv_heads not in (None, config.n_head):
        raise BridgeError(f"{path}: n_kv_heads={config.n_kv_heads} has no GPT-2 form (GPT-2 is multi-head)")
    for setting, value in needs.items():
        if getattr(config, setting) != value:
            raise BridgeError(f"{path}: {setting}={getattr(config, setting)!r} has no {FAMILIES[family]} form "
                              f"(it needs {value!r})")
    allowed = ("relu", "gelu", "gelu_tanh") if family == "gpt2" else ("swiglu",)
    if config.feedforward not in allowed:
        raise BridgeError(f"{path}: feedforward={config.feedforward!r} has no {FAMILIES[family]} form")
    if state["lm_head.bias"].any():
        raise BridgeError(f"{path}: the output layer has a nonzero bias, which neither GPT-2 nor Llama has")
    hf, tensors = (ours_to_gpt2 if family == "gpt2" else ours_to_llama)(state, config)
    tokenizer = tokenizer_from_json(tokenizer_json) if json.loads(tokenizer_json).get("type") != "absent" else None
    if isinstance(tokenizer, ByteBPETokenizer):
        write_bpe(tokenizer, Path(directory))
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}
    utilities.write_json(Path(directory) / "config.json", hf)
    utilities.atomic_write(Path(directory) / "model.safetensors",
                           lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata={"format": "pt"}))
    note = "" if isinstance(tokenizer, ByteBPETokenizer) else (
        ", no vocab.json/merges.txt: a word-level vocabulary has no byte-level BPE form"
        if isinstance(tokenizer, WordTokenizer) else ", no tokenizer")
    return f"{checkpoint} -> {FAMILIES[family]} folder {directory}{note}"
