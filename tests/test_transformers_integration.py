"""entmax attention inside Hugging Face transformers models (tiny models built from configs,
randomly initialised, nothing downloaded): alpha = 1 equals the models' own SDPA attention;
alpha = 1.5 equals an eager computation with entmax_cuda.entmax on the scores; alpha learns;
generate() with the KV cache equals repeated full forwards; padding, packing and
save/load round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import entmax_cuda

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
hf = pytest.importorskip("entmax_cuda.integrations.transformers")

from transformers import (AttentionInterface, DataCollatorWithFlattening, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

VOCAB = 61
REFERENCE = "entmax_eager_reference"


def llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": llama, "gpt2": gpt2}


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """The attention written from its definition: scores, SDPA's mask semantics, entmax_cuda.entmax
    with the module's alpha per head, weights times values. Forms the whole score matrix."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.double() @ key.double().transpose(-2, -1)) * scale
    Lq, Lk = scores.shape[-2:]
    if attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if causal and Lq > 1:
            attention_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    alpha = module.entmax_attention.alpha().double().reshape(1, -1, 1, 1)
    p = entmax_cuda.entmax(scores, alpha, dim=-1)
    out = (p @ value.double()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def reference_logits(model, ids, **kwargs) -> torch.Tensor:
    model.set_attn_implementation(REFERENCE)
    try:
        return logits(model, ids, **kwargs)
    finally:
        model.set_attn_implementation(hf.ATTENTION_NAME)


def spread_alphas(model, low: float = 1.1, high: float = 1.9):
    """Different alphas per head and layer, so a head mixed up with another shows."""
    modules = [m for _, m in hf.attention_modules(model)]
    targets = torch.linspace(low, high, sum(m.entmax_attention.n_heads for m in modules))
    with torch.no_grad():
        for m in modules:
            a, targets = targets[: m.entmax_attention.n_heads], targets[m.entmax_attention.n_heads:]
            m.entmax_attention.entmax.alpha_logit.copy_(torch.log((a - 1) / (2 - a)))


# ---------------------------------------------------------------- alpha = 1 and alpha = 1.5


@pytest.mark.parametrize("name", MODELS)
def test_alpha_one_gives_the_logits_of_the_models_sdpa_attention(name, device):
    model = MODELS[name]().to(device)
    ids = torch.randint(0, VOCAB, (3, 37), device=device)
    want = logits(model, ids)
    hf.use_entmax_attention(model, alpha_init=1.0, learn_alpha=False)
    assert model.config._attn_implementation == "entmax"
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_alpha_one_in_bfloat16_is_as_close_to_float32_as_sdpa_is(name, device):
    model = MODELS[name]().to(device)
    ids = torch.randint(0, VOCAB, (2, 33), device=device)
    exact = logits(model, ids)
    model = model.to(torch.bfloat16)
    sdpa_error = (logits(model, ids).float() - exact).abs().max().item()
    hf.use_entmax_attention(model, alpha_init=1.0, learn_alpha=False)
    error = (logits(model, ids).float() - exact).abs().max().item()
    assert 0 < sdpa_error and error <= 2 * sdpa_error, (error, sdpa_error)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learned_alphas_give_the_logits_of_an_eager_entmax_on_the_scores(name, dtype, device):
    model = MODELS[name]().to(device)
    hf.use_entmax_attention(model, alpha_init=1.5)
    spread_alphas(model)
    ids = torch.randint(0, VOCAB, (3, 41), device=device)
    want = reference_logits(model.double(), ids)
    model = model.to(dtype)
    got = logits(model, ids).double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # bfloat16: no further from the float64 logits than the reference attention run in bfloat16
        inherent = (reference_logits(model, ids).double() - want).abs().max().item()
        assert 0 < inherent and (got - want).abs().max().item() <= 2 * inherent


def test_the_attention_is_sparse_with_alpha_above_one():
    """Guards the comparison above against a reference that is softmax too: at alpha = 1.9
    the logits move away from the alpha = 1 ones."""
    model = llama()
    ids = torch.randint(0, VOCAB, (2, 40))
    hf.use_entmax_attention(model, alpha_init=1.0, learn_alpha=False)
    soft = logits(model, ids)
    hf.use_entmax_attention(model, alpha_init=1.9, learn_alpha=False)
    assert (logits(model, ids) - soft).abs().max() > 1e-3


# ---------------------------------------------------------------- learning alpha


def test_alpha_is_a_parameter_with_gradients_that_an_optimiser_moves():
    model = gpt2().train()
    hf.use_entmax_attention(model, alpha_init=1.5)
    alphas = [p for n, p in model.named_parameters() if n.endswith("entmax_attention.entmax.alpha_logit")]
    assert len(alphas) == 2 and all(p.shape == (4,) for p in alphas)
    before = {k: v.clone() for k, v in hf.entmax_alphas(model).items()}
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    ids = torch.randint(0, VOCAB, (4, 32))
    for _ in range(3):
        optimiser.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for p in alphas:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.ne(0).any()
        optimiser.step()
    after = hf.entmax_alphas(model)
    assert all((after[k] - before[k]).abs().max() > 1e-3 for k in before)
    assert all(((a > 1) & (a < 2)).all() for a in after.values())


def test_a_nonzero_attention_dropout_in_training_is_refused():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, attn_pdrop=0.1)
    model = hf.use_entmax_attention(GPT2LMHeadModel(cfg)).train()
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="attention dropout"):
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)  # no dropout in evaluation


# ---------------------------------------------------------------- padding, packing, generation


@pytest.mark.parametrize("name", MODELS)
def test_left_and_right_padding_leave_the_real_tokens_logits_unchanged(name, device):
    model = hf.use_entmax_attention(MODELS[name]().to(device), alpha_init=1.5)
    spread_alphas(model)
    lengths, width = [23, 9, 16], 23
    seqs = [torch.randint(0, VOCAB, (n,), device=device) for n in lengths]
    alone = [logits(model, s[None])[0] for s in seqs]
    for side in ("left", "right"):
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, where], mask[i, where] = s, 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = logits(model, ids, attention_mask=mask, position_ids=positions)
        for i, s in enumerate(seqs):
            where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(out[i, where], alone[i], rtol=1e-5, atol=1e-5)


def _packed(seqs, device):
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(len(s), device=device) for s in seqs])[None]
    cu = torch.tensor([0] + [len(s) for s in seqs], device=device).cumsum(0).to(torch.int32)
    return ids, positions, cu


@pytest.mark.parametrize("name", MODELS)
def test_packed_sequences_equal_the_sequences_run_apart(name, device, monkeypatch):
    model = hf.use_entmax_attention(MODELS[name]().to(device), alpha_init=1.5)
    spread_alphas(model)
    seqs = [torch.randint(0, VOCAB, (n,), device=device) for n in (11, 30, 1, 17)]
    alone = torch.cat([logits(model, s[None])[0] for s in seqs])
    ids, positions, cu = _packed(seqs, device)
    calls = []
    monkeypatch.setattr(hf, "varlen_entmax", lambda *a, **k: calls.append(1) or entmax_cuda.varlen_entmax(*a, **k))
    # The flash-attn route (DataCollatorWithFlattening(return_flash_attn_kwargs=True)): the varlen kernel.
    n = max(len(s) for s in seqs)
    flash = logits(model, ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n,
                   max_length_k=n)
    assert len(calls) == 2  # once per layer
    torch.testing.assert_close(flash[0], alone, rtol=1e-5, atol=1e-5)
    without_max = logits(model, ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(without_max, flash, rtol=0, atol=0)  # the longest sequence read from cu
    # position_ids alone, no cache: transformers builds a block-diagonal mask, the masked kernel takes it.
    packed = logits(model, ids, position_ids=positions, use_cache=False)
    torch.testing.assert_close(packed[0], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_with_the_cache_equals_repeated_full_forwards(name, device, monkeypatch):
    model = hf.use_entmax_attention(MODELS[name]().to(device), alpha_init=1.5)
    spread_alphas(model)
    calls = []
    monkeypatch.setattr(hf, "entmax_with_kvcache",
                        lambda *a, **k: calls.append(1) or entmax_cuda.entmax_with_kvcache(*a, **k))
    prompt = torch.randint(1, VOCAB, (2, 9), device=device)
    new = 12
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert len(calls) == 2 * (new - 1)  # every step after the prompt, in both layers: the decode kernel
    ids = prompt
    for _ in range(new):
        ids = torch.cat([ids, logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_greedy_generate_of_a_left_padded_batch_equals_each_prompt_alone():
    model = hf.use_entmax_attention(llama(), alpha_init=1.5)
    spread_alphas(model)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (7, 12)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 12 - len(p):], mask[i, 12 - len(p):] = p, 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones_like(p[None]), **kw)
        assert torch.equal(batched[i, 12:], alone[0, len(p):])


def test_a_bidirectional_sliding_window_sees_both_sides_in_packed_batches():
    """ModernBERT: local attention in a bidirectional encoder, packed by DataCollatorWithFlattening's
    flash kwargs; at alpha = 1 it equals the model's SDPA attention on each sequence alone."""
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, local_attention=4, global_attn_every_n_layers=2,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                        attn_implementation="sdpa")
    model = transformers.ModernBertModel(cfg).eval()
    seqs = [list(range(3, 12)), list(range(12, 24)), list(range(30, 37))]
    with torch.no_grad():
        want = torch.cat([model(torch.tensor([s])).last_hidden_state[0] for s in seqs])
        hf.use_entmax_attention(model, alpha_init=1.0, learn_alpha=False)
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
        batch.pop("labels")
        got = model(**batch).last_hidden_state[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- saving and loading


def test_save_pretrained_and_from_pretrained_keep_the_learned_alphas(tmp_path):
    model = hf.use_entmax_attention(llama(), alpha_init=1.5)
    spread_alphas(model)
    ids = torch.randint(0, VOCAB, (2, 20))
    want = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(LlamaForCausalLM, tmp_path).eval()
    assert loaded.config._attn_implementation == "entmax"
    for k, a in hf.entmax_alphas(model).items():
        assert torch.equal(hf.entmax_alphas(loaded)[k], a)
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=0)
    assert {k for k in loaded.state_dict() if "entmax" in k} == {k for k in model.state_dict() if "entmax" in k}


def test_a_variant_checkpoint_round_trips(tmp_path):
    model = hf.use_entmax_attention(gpt2(), alpha_init=1.5)
    spread_alphas(model)
    model.save_pretrained(tmp_path, variant="v1")
    loaded = hf.from_pretrained(GPT2LMHeadModel, tmp_path, variant="v1")
    for k, a in hf.entmax_alphas(model).items():
        assert torch.equal(hf.entmax_alphas(loaded)[k], a)


def test_casting_the_model_to_bfloat16_keeps_the_alphas_exact():
    model = hf.use_entmax_attention(llama(), alpha_init=1.003, learn_alpha=False)
    model.to(torch.bfloat16)
    assert all(a.dtype == torch.float32 and torch.equal(a, torch.full((4,), 1.003))
               for a in hf.entmax_alphas(model).values())


def test_from_pretrained_of_a_checkpoint_without_entmax_says_so(tmp_path):
    llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not saved with entmax attention"):
        hf.from_pretrained(LlamaForCausalLM, tmp_path)


def test_a_fixed_alpha_round_trips_through_the_state_dict():
    model = hf.use_entmax_attention(gpt2(), alpha_init=2.5, learn_alpha=False)
    assert not [n for n, _ in model.named_parameters() if "entmax" in n]
    state = model.state_dict()
    assert [k for k in state if "entmax" in k] == [f"transformer.h.{i}.attn.entmax_attention.entmax.alpha_fixed"
                                                   for i in range(2)]
    assert all(torch.equal(a, torch.full((4,), 2.5)) for a in hf.entmax_alphas(model).values())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("alpha_init", [1.0, 2.0, 0.5])
def test_a_learned_alpha_must_start_inside_one_to_two(alpha_init):
    with pytest.raises(ValueError, match="alpha_init"):
        hf.use_entmax_attention(llama(), alpha_init=alpha_init, learn_alpha=True)


def test_a_model_that_is_not_a_transformers_model_is_refused():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.use_entmax_attention(torch.nn.Linear(3, 3))


def test_a_model_whose_attention_cannot_be_replaced_is_refused(monkeypatch):
    model = llama()
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    with pytest.raises(TypeError, match="custom attention functions"):
        hf.use_entmax_attention(model)


def test_models_whose_attention_the_kernels_cannot_compute_are_refused_up_front():
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    with pytest.raises(NotImplementedError, match="soft-caps"):
        hf.use_entmax_attention(gemma2)
    assert gemma2.config._attn_implementation != "entmax" and not hasattr(gemma2.model.layers[0].self_attn,
                                                                          "entmax_attention")


@pytest.mark.parametrize("name", ["softcap", "sinks", "indices", "block_indices", "position_bias"])
def test_attention_arguments_the_kernels_cannot_take_are_refused(name):
    model = hf.use_entmax_attention(llama())
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match=name):
        hf.entmax_attention_forward(module, q, k, k, None, **{name: torch.ones(1)})


def test_selecting_entmax_without_use_entmax_attention_says_what_to_call():
    hf.use_entmax_attention(llama())  # registers the name
    model = llama()
    model.set_attn_implementation("entmax")
    with pytest.raises(RuntimeError, match="use_entmax_attention"):
        logits(model, torch.randint(0, VOCAB, (1, 5)))


def test_the_hf_extra_pins_the_tested_transformers_range():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'hf = ["transformers{",".join(hf.TESTED_TRANSFORMERS)}"]' in text.splitlines()
