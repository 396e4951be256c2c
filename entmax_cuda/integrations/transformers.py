"""alpha-entmax attention with a learned alpha per head in Hugging Face transformers models.

    from transformers import AutoConfig, AutoModelForCausalLM
    from entmax_cuda.integrations.transformers import use_entmax_attention

    model = AutoModelForCausalLM.from_pretrained("...")
    use_entmax_attention(model, alpha_init=1.5)   # alpha = 1 + sigmoid(a), one per head and layer
    ...train; model.save_pretrained(path)...
    model = entmax_cuda.integrations.transformers.from_pretrained(AutoModelForCausalLM, path)

use_entmax_attention registers the attention function "entmax" in transformers'
AttentionInterface, with the same mask function as "sdpa" in AttentionMaskInterface (so
causal, padding, sliding-window and packed-sequence masks reach it), gives every attention
module an `entmax_attention` submodule (an EntmaxAttention holding that module's alpha per
head: in model.parameters(), the state dict and save_pretrained) and switches the model to
attn_implementation="entmax". The mask semantics are SDPA's: no mask with more than one
query means causal (upper-left) in a causal module; a boolean mask, True = attend.

Routes: packed sequences given as flash-attn style kwargs (cu_seq_lens_q/k, max_length_q/k,
as DataCollatorWithFlattening(return_flash_attn_kwargs=True) produces) run the varlen kernel
(transformers may still build its block-diagonal mask from position_ids; it is not read); a
decoding step without gradients that transformers gives no mask (one new token, a dynamic
cache, no padding, no window in reach) runs the split-K decode kernel; everything else the
fused masked kernel (scaled_dot_product_entmax). Needs transformers (pip install "entmax-cuda[hf]").
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # the optional extra is missing
    raise ImportError(
        'entmax_cuda.integrations.transformers needs Hugging Face transformers: pip install "entmax-cuda[hf]"'
    ) from e

from ..attention import EntmaxAttention
from ..sequences import entmax_with_kvcache, varlen_entmax

__all__ = ["ATTENTION_NAME", "TESTED_TRANSFORMERS", "use_entmax_attention", "from_pretrained", "entmax_alphas",
           "attention_modules"]

ATTENTION_NAME = "entmax"
# The transformers releases the tests ran with; the `hf` extra in pyproject.toml pins the same.
TESTED_TRANSFORMERS = (">=5.23", "<5.24")
# The submodule each attention module gets, and the config entry that records the settings.
SUBMODULE = "entmax_attention"
CONFIG_KEY = "entmax_attention"


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _check_version():
    have = _version_tuple(transformers.__version__)
    low, high = (_version_tuple(bound.lstrip("<>=")) for bound in TESTED_TRANSFORMERS)
    if not low <= have < high:
        warnings.warn(
            f"entmax_cuda.integrations.transformers was tested with transformers {','.join(TESTED_TRANSFORMERS)}; "
            f"this is {transformers.__version__}, whose attention interface may differ",
            stacklevel=3,
        )


def _uses_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward dispatches through transformers' AttentionInterface."""
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of the model whose attention goes through AttentionInterface."""
    return [(name, m) for name, m in model.named_modules() if _uses_attention_interface(m)]


def _heads_of(module: nn.Module, model: nn.Module) -> int:
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        n = getattr(module, attr, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    for config in (getattr(module, "config", None), getattr(model, "config", None)):
        n = getattr(config, "num_attention_heads", None)
        if isinstance(n, int) and n > 0:
            return n
    raise TypeError(f"use_entmax_attention: cannot tell how many heads {type(module).__name__} has")


def _register():
    AttentionInterface.register(ATTENTION_NAME, entmax_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_entmax_attention(model: nn.Module, alpha_init: float = 1.5, learn_alpha: bool = True) -> nn.Module:
    """Switch a transformers model to alpha-entmax attention, alpha per head in every layer.

    learn_alpha=True: alpha = 1 + sigmoid(a) per head, a learned parameter, starting at
    alpha_init in (1, 2). learn_alpha=False: alpha fixed at alpha_init, any float >= 1
    (1.0 is exactly softmax attention, 2.0 sparsemax). Calling it again replaces the alphas.
    The settings are recorded in model.config (saved by save_pretrained; from_pretrained
    below restores the model with its alphas). Returns the model, changed in place.
    Attention dropout is not applied by entmax attention: a model in training mode with a
    nonzero attention dropout raises (set the config's attention dropout to 0).
    """
    _check_version()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"use_entmax_attention: model must be a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    modules = attention_modules(model)
    if not modules:
        raise TypeError(f"use_entmax_attention: {type(model).__name__}'s attention does not go through "
                        "transformers' AttentionInterface, so entmax attention cannot be plugged in")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(f"use_entmax_attention: {type(model).__name__} does not declare support for custom "
                        "attention functions (transformers' _supports_attention_backend is False)")
    _refuse_unsupported(model, modules)
    # Everything that can fail comes before the model is changed.
    attns = [EntmaxAttention(_heads_of(m, model), alpha_init=alpha_init, learn_alpha=learn_alpha) for _, m in modules]
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise TypeError(f"use_entmax_attention: {type(model).__name__} refused attn_implementation="
                        f"{ATTENTION_NAME!r} (it kept {model.config._attn_implementation!r})")
    for (_, module), attn in zip(modules, attns):
        param = next(module.parameters(), None)
        if param is not None:
            attn = attn.to(param.device)
        if hasattr(module, SUBMODULE):
            delattr(module, SUBMODULE)
        module.add_module(SUBMODULE, attn)
    setattr(model.config, CONFIG_KEY, {"alpha_init": float(alpha_init), "learn_alpha": bool(learn_alpha)})
    return model


def _configs(model: nn.Module):
    """The model's config and its sub-configs (text, vision, ...)."""
    seen, todo = [], [model.config]
    while todo:
        config = todo.pop()
        if config is None or any(config is c for c in seen):
            continue
        seen.append(config)
        todo.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return seen


def _refuse_unsupported(model: nn.Module, modules):
    """Model features that change the attention outside what the kernels compute."""
    name = type(model).__name__
    for config in _configs(model):
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise NotImplementedError(f"use_entmax_attention: {name} soft-caps its attention scores "
                                      "(attn_logit_softcapping), which entmax attention does not do")
        if getattr(config, "num_kv_shared_layers", 0):
            raise NotImplementedError(f"use_entmax_attention: {name} shares key/value states across layers "
                                      "(num_kv_shared_layers), whose query slicing assumes attn_implementation "
                                      "'sdpa' by name")
    for module_name, m in modules:
        if getattr(m, "sinks", None) is not None:
            raise NotImplementedError(f"use_entmax_attention: {module_name} has attention sinks, which entmax "
                                      "attention does not take")


def entmax_alphas(model: nn.Module) -> dict[str, torch.Tensor]:
    """alpha per head of every attention module (name -> (n_heads,) float32 tensor, detached)."""
    return {name: getattr(m, SUBMODULE).alpha().detach() for name, m in attention_modules(model)
            if hasattr(m, SUBMODULE)}


def _checkpoint_tensors(name_or_path: str, keys: list[str], kwargs: dict) -> dict[str, torch.Tensor]:
    """The given tensors of a safetensors checkpoint (one file or sharded with an index)."""
    import json

    from safetensors import safe_open
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("cache_dir", "revision", "subfolder", "token", "local_files_only") if k in kwargs}
    variant = kwargs.get("variant")

    def named(file: str) -> str:  # transformers' file name of a variant: model.VARIANT.safetensors
        if not variant:
            return file
        parts = file.split(".")
        return ".".join(parts[:-1] + [variant] + parts[-1:])

    index = cached_file(name_or_path, named("model.safetensors.index.json"),
                        _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {k: weight_map.get(k) for k in keys}
    else:
        files = dict.fromkeys(keys, named("model.safetensors"))
    missing = [k for k, f in files.items() if f is None]
    out = {}
    for file in sorted({f for f in files.values() if f is not None}):
        with safe_open(cached_file(name_or_path, file, **hub), framework="pt") as f:
            present = set(f.keys())
            for k in keys:
                if files[k] == file:
                    if k in present:
                        out[k] = f.get_tensor(k)
                    else:
                        missing.append(k)
    if missing:
        raise ValueError(
            f"from_pretrained: the checkpoint {name_or_path!r} has no entmax alphas under the names "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}: it must be loaded with the class that saved it, "
            "and models whose keys transformers renames when saving (e.g. the Llava family) are not supported")
    return out


def from_pretrained(model_class, name_or_path: str, **kwargs) -> nn.Module:
    """model_class.from_pretrained(name_or_path, **kwargs) of a model saved after
    use_entmax_attention, with entmax attention and its saved alphas restored.

    transformers builds the model without the alphas and drops them as unexpected keys (a plain
    model_class.from_pretrained gives the model back with softmax attention); this reads them
    back from the checkpoint's safetensors files, under the names the model's state dict gives
    them: load with the class that saved it. Models whose keys transformers renames on saving
    (the Llava family) are refused with an error.
    """
    name_or_path = str(name_or_path)
    model = model_class.from_pretrained(name_or_path, **kwargs)
    settings = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"from_pretrained: {name_or_path!r} was not saved with entmax attention (its config has no "
                         f"{CONFIG_KEY!r}); load it with {model_class.__name__}.from_pretrained and call "
                         "use_entmax_attention")
    use_entmax_attention(model, **settings)
    state = model.state_dict()
    keys = [k for k in state if f".{SUBMODULE}." in f".{k}"]
    saved = _checkpoint_tensors(name_or_path, keys, kwargs)
    with torch.no_grad():
        for k, t in saved.items():
            state[k].copy_(t)
    return model


# ---------------------------------------------------------------- the attention function


def _refuse(name: str, why: str):
    raise NotImplementedError(f"entmax attention: {name} is not supported ({why})")


def entmax_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D);
    returns ((B, Lq, Hq, Dv), None)."""
    attn = getattr(module, SUBMODULE, None)
    if not isinstance(attn, EntmaxAttention):
        raise RuntimeError(
            f"entmax attention: {type(module).__name__} has no alpha; switch models with "
            "entmax_cuda.integrations.transformers.use_entmax_attention(model), not attn_implementation='entmax'"
        )
    if dropout:
        raise ValueError(
            f"entmax attention does not apply attention dropout, got dropout={dropout} (the model is training "
            "with a nonzero attention dropout: set it to 0 in the config, e.g. attention_dropout or attn_pdrop)"
        )
    for name in ("softcap", "s_aux", "sinks", "position_bias", "head_mask", "indices", "block_indices"):
        if kwargs.get(name) is not None:
            _refuse(name, "it changes which keys or scores the attention sees outside the kernels' masks")
    if kwargs.get("output_attentions"):
        warnings.warn("entmax attention does not return attention weights (output_attentions)", stacklevel=2)
    if query.shape[1] != attn.n_heads:
        raise ValueError(f"entmax attention: {type(module).__name__} gives {query.shape[1]} query heads, its alpha "
                         f"has {attn.n_heads}")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if B != 1:
            raise ValueError(f"entmax attention: packed sequences (cu_seq_lens_q/k) need batch size 1, got {B}")
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q, max_k = (int(m) if m is not None else int(cu.diff().max()) if cu.numel() > 1 else 0
                        for m, cu in ((kwargs.get("max_length_q"), cu_q), (kwargs.get("max_length_k"), cu_k)))
        out = varlen_entmax(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                            max_q, max_k, alpha=attn.alpha().to(query.device), is_causal=causal, scale=scaling,
                            window_size=_window(kwargs))
        return out.unsqueeze(0), None
    no_grad = not torch.is_grad_enabled() or not any(t.requires_grad for t in (query, key, value, *attn.parameters()))
    if attention_mask is None and Lq == 1 and no_grad and Lk > 0:
        # One new token against the whole cache: every key is visible, the split-K decode kernel.
        out = entmax_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), Lk,
                                  alpha=attn.alpha().to(query.device), scale=scaling, window_size=_window(kwargs))
        return out, None
    # SDPA's reading of "no mask": causal (upper-left) for several queries in a causal module.
    out = attn(query, key, value, attn_mask=attention_mask, is_causal=causal and Lq > 1 and attention_mask is None,
               scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _window(kwargs: dict) -> tuple:
    """transformers' sliding_window as flash-attn's window: sliding_window - 1 keys on each side
    (causality removes the right side in causal modules; bidirectional ones such as ModernBERT
    see both)."""
    w = kwargs.get("sliding_window")
    return (-1, -1) if w is None else (int(w) - 1, int(w) - 1)
