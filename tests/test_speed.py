"""Speed work (docs/training.md): mixed precision in the training loop, and the overhead removals in the model,
which must leave the base model's outputs exactly as the formulation they replaced."""

import importlib.util
import itertools
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import main
from models.generation import choose_token
from training import TrainingConfig, fit, negative_log_likelihood
from transformer import TransformerClassifier, TransformerConfig, TransformerLM

TINY = {"vocab_size": 30, "block_size": 8, "n_embd": 16, "n_head": 2, "n_layer": 2, "ff_hidden": 24}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


# ---------------------------------------------------------------- mixed precision


def train_losses(precision: str, device="cpu", steps: int = 12, compile: bool = False,
                 rows=(8,)) -> tuple[list[float], list[torch.dtype]]:
    """The per-step losses of a tiny decoder trained with `precision` on batches of `rows` rows in turn, and the
    dtypes its head produced."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**TINY)).to(device)
    head_dtypes = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: head_dtypes.append(output.dtype))
    generator, sizes = torch.Generator().manual_seed(0), itertools.cycle(rows)
    batches = iter(lambda: (torch.randint(0, 30, (next(sizes), 8), generator=generator),) * 2, None)
    losses = []
    fit(model, batches, steps, steps, lambda step, recent: losses.extend(loss for loss, _, _ in recent) or {},
        TrainingConfig(learning_rate=3e-3, precision=precision, compile=compile), torch.device(device),
        count_correct=False)
    return losses, head_dtypes


def test_bf16_on_the_cpu_trains_close_to_fp32():
    fp32, fp32_dtypes = train_losses("fp32")
    bf16, bf16_dtypes = train_losses("bf16")
    assert set(fp32_dtypes) == {torch.float32} and set(bf16_dtypes) == {torch.bfloat16}  # autocast did run
    assert fp32[-1] < fp32[0] - 0.3  # it learns (the tiny copy task: inputs are the targets)
    # bf16 keeps 8 bits of mantissa: a relative error near 2^-8 per product, not a different trajectory
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05 * fp32[0]


def test_fp16_on_the_cpu_is_refused_with_one_line_and_status_2(small_data, tmp_path, capsys):
    status = main.main(["--part", "one", "--data-dir", str(small_data), "--out", str(tmp_path), "--device", "cpu",
                        "--precision", "fp16"])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "fp16 needs a CUDA device" in err and "Traceback" not in err


def test_unknown_precision_is_refused_by_the_config():
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainingConfig(precision="fp8").validate()


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_trains_close_to_fp32(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    fp32, _ = train_losses("fp32", "cuda")
    mixed, dtypes = train_losses(precision, "cuda")
    assert set(dtypes) == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])}
    assert all(math.isfinite(loss) for loss in mixed)
    assert max(abs(a - b) for a, b in zip(fp32, mixed)) < 0.05 * fp32[0]


@needs_cuda
def test_compile_on_cuda_records_cuda_graphs_and_trains_like_eager():
    """--compile on one GPU is "reduce-overhead" (CUDA graphs), here with two batch shapes (a short last batch)."""
    eager, _ = train_losses("fp32", "cuda", rows=(8, 5))
    torch._dynamo.reset()
    compiled, _ = train_losses("fp32", "cuda", compile=True, rows=(8, 5))
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4 * eager[0]  # fusion moves the last bits only


@needs_cuda
def test_sampling_a_cuda_model_with_a_cpu_generator_draws_as_on_the_cpu():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(1))
    draws = {device: choose_token(logits.to(device), "sample", top_k=10, generator=torch.Generator().manual_seed(2))
             for device in ("cpu", "cuda")}
    assert draws["cuda"].device.type == "cuda" and torch.equal(draws["cuda"].cpu(), draws["cpu"])


# ---------------------------------------------------------------- overhead removals keep the outputs


def reference_trunk(trunk, x, key_mask, causal):
    """The trunk as it was written before the overhead removals: dropout(p=0) calls and a zero position bias added
    to every layer's scores. Built from torch ops and the model's own parameters."""
    B, T, C = x.shape
    allowed = torch.ones(T, T, dtype=torch.bool)
    allowed = allowed.tril() if causal else allowed
    allowed = allowed[None, None] if key_mask is None else allowed & key_mask[:, None, None, :]  # (B, 1, T, T)
    x = F.dropout(trunk.positions.embed(x, 0), 0.0, training=True)
    for block in trunk.blocks:
        attention = block.attention
        H, hs = attention.n_head, attention.head_size
        qkv = attention.qkv(block.norm1(x)).view(B, T, 3 * H, hs).transpose(1, 2)  # (B, 3H, T, hs)
        q, k, v = qkv.split(H, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs) + 0.0  # (B, H, T, T)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        y = F.dropout(scores.softmax(-1), 0.0, training=True) @ v  # (B, H, T, hs)
        x = x + F.dropout(attention.proj(y.transpose(1, 2).reshape(B, T, C)), 0.0, training=True)
        x = x + F.dropout(block.feedforward(block.norm2(x)), 0.0, training=True)
    return trunk.final_norm(x)


def test_the_base_decoder_matches_its_previous_formulation_exactly():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**TINY)).train()
    idx = torch.randint(0, 30, (3, 8))
    expected = model.lm_head(reference_trunk(model.decoder, model.decoder.token_embedding(idx), None, causal=True))
    assert torch.equal(model(idx).logits, expected)


def test_the_base_classifier_matches_its_previous_formulation_exactly():
    torch.manual_seed(0)
    model = TransformerClassifier(TransformerConfig(**TINY)).train()
    idx = torch.randint(1, 30, (3, 8))
    idx[0, 5:] = idx[2, 2:] = 0  # padding
    key_mask = idx != 0
    h = reference_trunk(model.encoder, model.encoder.token_embedding(idx), key_mask, causal=False)
    pooled = (h * key_mask[..., None]).sum(1) / key_mask.sum(1, keepdim=True)
    assert torch.equal(model(idx).logits, model.head(pooled))


def test_dropout_modules_exist_only_when_dropout_is_on():
    assert not any(isinstance(m, nn.Dropout) for m in TransformerLM(TransformerConfig(**TINY)).modules())
    on = TransformerLM(TransformerConfig(**TINY, dropout=0.1))
    # one after the embeddings, and per block one on the residual branches and one on the attention weights
    assert sum(isinstance(m, nn.Dropout) for m in on.modules()) == 1 + 2 * TINY["n_layer"]


def test_the_evaluation_batch_size_does_not_change_the_summed_loss():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**TINY)).eval()
    stream = torch.randint(0, 30, (8 * 40 + 5,))
    with torch.no_grad():  # every token after the first, one window at a time, summed in float64
        windows = [(stream[i:i + 8], stream[i + 1:i + 9]) for i in range(0, len(stream) - 1, 8)]
        brute = sum(F.cross_entropy(model(x[:len(y)][None]).logits[0], y, reduction="sum").double() for x, y in windows)
    for batch_size in (1, 16, 128):
        total, count = negative_log_likelihood(model, stream, 8, "cpu", batch_size)
        assert count == len(stream) - 1 and total == pytest.approx(brute.item(), rel=1e-6)


# ---------------------------------------------------------------- the allocator

FAULTS_OF_THIRTY_STEPS = """
import ctypes, resource, sys, torch
from runtime.memory import keep_freed_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the host's huge-page setting
if sys.argv[1] == "keep":
    keep_freed_memory()
def step():  # three arrays the size of a course decoder's logits alive at once, then freed, as in a training step
    logits = torch.ones(512, 5635)
    probabilities = logits.softmax(-1)
    return (probabilities - 1).sum().item()
step()  # the heap grows to three arrays
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings (Linux with glibc)")
def test_keeping_freed_memory_stops_each_step_from_faulting_its_arrays_back_in():
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}
    # glibc's own starting point, 128 KiB, held fixed: its default moves the threshold with what was freed,
    # so whether a given step faults depends on the allocations before it; fixed, every step does
    settings = {"keep": env, "default": {**env, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}}
    faults = {how: int(subprocess.run([sys.executable, "-c", FAULTS_OF_THIRTY_STEPS, how], env=settings[how], check=True,
                                      capture_output=True, text=True, cwd=Path(main.__file__).parent).stdout)
              for how in settings}
    pages = 512 * 5635 * 4 // 4096  # of one array
    assert faults["default"] > 30 * pages  # every step faults its arrays in anew (three a step)
    # kept, the pages are reused: the heap grows by a few arrays while its free blocks settle (1 to 3 arrays' worth in
    # 60 runs here, by step 8 in all of them), then not at all; the default's 30 steps fault in about 90
    assert faults["keep"] < faults["default"] / 10


# ---------------------------------------------------------------- the benchmark's LayerNorm variants


def load_bench_steps():
    """bench/bench_steps.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_steps", Path(main.__file__).parent / "bench" / "bench_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["hand", "torch"])
def test_the_benchmarks_layernorm_variants_compute_ours_and_its_gradients(variant):
    # the variants bench/bench_steps.py prices against ours (docs/training.md) must be the same function:
    # their outputs and gradients against autograd through our LayerNorm, in float64
    bench_steps = load_bench_steps()
    torch.manual_seed(0)
    x, grad, weight, bias = (torch.randn(shape, dtype=torch.float64) for shape in ((3, 5, 16), (3, 5, 16), 16, 16))
    results = []
    for name in ("ours", variant):
        norm = bench_steps.NORMS[name](16).double()
        with torch.no_grad():
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
        inputs = x.clone().requires_grad_()
        output = norm(inputs)
        output.backward(grad)
        results.append([output, inputs.grad, norm.weight.grad, norm.bias.grad])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-12)


def test_the_hand_derived_layernorm_backward_matches_finite_differences():
    bench_steps = load_bench_steps()
    torch.manual_seed(0)
    inputs = (torch.randn(2, 2, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64),
              torch.randn(16, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, w, b: bench_steps.HandDerivedLayerNorm.apply(x, w, b, 1e-5),
                                    tuple(tensor.clone().requires_grad_() for tensor in inputs))
