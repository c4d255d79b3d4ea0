"""Models the engine trains and scores with: named tiny-to-small presets built from code (no downloads) or any
Hub id / local directory (``build_causal_lm``), LoRA adapters (``apply_lora``, peft), the
policy's output head and body (the critic and the reward model's scalar heads: ``heads.py``).

Every model here is an ordinary transformers model (or wraps one), so ``use_packed_attention`` from
``fusedrl.engine.attention`` applies to all of them.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attention import is_packed_attention

# Special-token fields a preset may carry; dropped when a smaller vocabulary no longer contains them.
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")
# Config fields that multiply the logits after the lm_head projection.
_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
# Model types whose ``logits_scaling`` multiplies the logits; every other model (the Granite family) divides.
_LOGITS_SCALING_MULTIPLIES = ("hyperclovax",)
# A Hub repository id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


@dataclass(frozen=True)
class Preset:
    """A named model shape: a transformers config class and the fields that differ from its defaults."""

    config_class: str
    """Name of the config class in ``transformers`` (``"LlamaConfig"``, ``"GPT2Config"``, ...)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Config fields, vocabulary size included."""

    def config(self, **overrides):
        """A fresh config of this shape with ``overrides`` applied (None values are ignored)."""
        import transformers

        values = {**self.fields, **{k: v for k, v in overrides.items() if v is not None}}
        vocab = values.get("vocab_size")
        if not (isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0):
            raise ValueError(f"vocab_size must be a positive int, got {vocab!r}")
        for name in _TOKEN_ID_FIELDS:
            if name not in overrides and isinstance(values.get(name), int) and values[name] >= vocab:
                values[name] = None
        return getattr(transformers, self.config_class)(**values)


# Tiny presets have no dropout, so train() and eval() compute the same function (tests compare both ways).
_NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)

PRESETS: dict[str, Preset] = {
    # ~0.1M parameters at vocab 256: unit tests.
    "tiny-llama": Preset("LlamaConfig", dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )),
    "tiny-gpt2": Preset("GPT2Config", dict(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2,
        **_NO_DROPOUT_GPT2,
    )),
    # ~14M parameters: end-to-end runs on CPU.
    "small-llama": Preset("LlamaConfig", dict(
        vocab_size=32000, hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=704, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )),
    # ~100M parameters: GPU benchmarks.
    "llama-100m": Preset("LlamaConfig", dict(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
        intermediate_size=2048, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )),
    # The shape of Qwen2-0.5B (~494M parameters) with random weights: the large-vocabulary benchmark case.
    "qwen-0.5b-like": Preset("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True, use_sliding_window=False,
    )),
}  # fmt: skip


def _check_name(preset_or_path) -> str:
    if not isinstance(preset_or_path, (str, os.PathLike)):
        raise TypeError(f"preset_or_path must be a preset name, a directory or a Hub id, got "
                        f"{type(preset_or_path).__name__}")  # fmt: skip
    return os.fspath(preset_or_path)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub repository id (``name`` or ``org/name``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith(".")


def model_source(name: str | os.PathLike, what: str = "model") -> str:
    """``name`` checked as something ``from_pretrained`` can load: an existing local directory, or a Hub id
    (``org/name``; fetched into, or read from, the Hub cache, ``HF_HUB_OFFLINE=1`` honoured). A path that does
    not exist is a FileNotFoundError saying so (not a complaint about repository ids)."""
    name = _check_name(name)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise NotADirectoryError(f"{what} {name!r} is a file; expected a model directory (what save_pretrained "
                                 "writes) or a Hugging Face Hub id such as Qwen/Qwen2.5-0.5B-Instruct")  # fmt: skip
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")
    if looks_like_path or not is_hub_id(name):
        raise FileNotFoundError(f"{what} {name!r} does not exist (not a local directory, and not a Hugging Face "
                                "Hub id of the form org/name)")  # fmt: skip
    return name


def _hub_error(e: BaseException, name: str, what: str) -> OSError | None:
    """The one-line error for a failed Hub load, or None when ``e`` is not a Hub lookup failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain, seen = [], e
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(c, GatedRepoError) for c in chain):
        return OSError(f"{what} {name!r} is a gated Hub repository: accept its terms on huggingface.co and log in "
                       "(hf auth login), or pass a local directory")  # fmt: skip
    if any(isinstance(c, RepositoryNotFoundError) for c in chain):
        return OSError(f"{what} {name!r} is neither a local directory nor a repository on the Hugging Face Hub "
                       "(a private one needs hf auth login)")  # fmt: skip
    offline = any(isinstance(c, LocalEntryNotFoundError) for c in chain) or "couldn't connect" in str(e)
    if offline:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no connection"
        return OSError(f"{what} {name!r} is not a local directory, and as a Hub id it is not in the local cache "
                       f"({constants.HF_HUB_CACHE}) and the Hub is unreachable ({why}): download it first "
                       f"(hf download {name}) or pass a local directory")  # fmt: skip
    return None


def load_pretrained(load, name: str | os.PathLike, what: str = "model", **kwargs):
    """``load(name, **kwargs)`` for a transformers ``from_pretrained`` (or ``GenerationConfig.from_pretrained``,
    ``AutoTokenizer.from_pretrained``, ...) with the standard resolution (local directory, else the Hub and its
    cache), and one clear line instead of a chain of tracebacks when the model cannot be found or fetched."""
    src = model_source(name, what)
    try:
        return load(src, **kwargs)
    except (OSError, ValueError) as e:
        err = _hub_error(e, src, what) if not os.path.isdir(src) else None
        if err is None:
            raise
        raise err from None


def _config_for(preset_or_path: str, vocab_size: int | None, overrides: dict) -> Any:
    """The preset's config, or None when ``preset_or_path`` is a directory or a Hub id (loaded by the caller)."""
    name = _check_name(preset_or_path)
    if name in PRESETS:
        return PRESETS[name].config(vocab_size=vocab_size, **overrides)
    model_source(name)
    if vocab_size is not None:
        raise ValueError(f"vocab_size applies to presets only; {name!r} is a saved model (got vocab_size={vocab_size})")
    return None


def build_causal_lm(
    preset_or_path: str,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A causal LM: a preset name gives a random-weight model (weights drawn from ``seed``, the caller's RNG
    state left untouched); a local directory or a Hub id (``Qwen/Qwen2.5-0.5B-Instruct``) is loaded with
    ``from_pretrained`` the standard way: the Hub cache is used and ``HF_HUB_OFFLINE=1`` honoured.

    ``overrides`` are config fields (presets) or ``from_pretrained`` keyword arguments (saved models). The
    model is returned in eval mode, in ``dtype``, on the CPU."""
    from transformers import AutoModelForCausalLM

    config = _config_for(preset_or_path, vocab_size, overrides)
    if config is None:
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, preset_or_path, "model", **overrides)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def build_reward_model(preset_or_path: str, vocab_size: int | None = None, seed: int = 0, pad_token_id: int = 0,
                       *, dtype: torch.dtype = torch.float32, **overrides):  # fmt: skip
    """A scalar reward model: ``AutoModelForSequenceClassification`` with ``num_labels=1`` from a preset
    (random weights from ``seed``), a local directory or a Hub id (a causal-LM checkpoint gets a fresh score
    head).

    ``pad_token_id`` is what transformers' own (unpacked) scoring uses to find each row's last token;
    ``score_packed`` does not need it."""
    from transformers import AutoModelForSequenceClassification

    config = _config_for(preset_or_path, vocab_size, dict(overrides, pad_token_id=pad_token_id))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config is None:
            model = load_pretrained(AutoModelForSequenceClassification.from_pretrained, preset_or_path,
                                    "reward model", num_labels=1, pad_token_id=pad_token_id, **overrides)  # fmt: skip
        else:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------
# LoRA (peft)
# ----------------------------------------------------------------------------------------------------
def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft package: pip install 'fusedrl[lora]'") from None
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft wrapper (``PeftModel``) with adapters that can be switched off."""
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


def apply_lora(model: nn.Module, *, r: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear"):  # fmt: skip
    """``model`` wrapped by peft with LoRA adapters of rank ``r`` (scale ``alpha / r``, ``alpha`` defaulting to
    ``2 r``) on ``target_modules`` (peft's ``"all-linear"``: every linear layer but the output head, which the
    fused loss reads as a plain ``nn.Linear``). Only the adapters train; with the trainer's default reference
    (the same model, adapters disabled) the frozen weights are held once."""
    peft = _peft()
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an int >= 1, got {r!r}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    if not target_modules:
        raise ValueError("LoRA target_modules must name at least one module (or be 'all-linear')")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if head_name is not None and any(head_name == t or head_name.endswith("." + t) for t in names):
        raise ValueError(f"LoRA target_modules {target_modules!r} include the output head {head_name!r}: the fused "
                         "loss reads the head as a plain nn.Linear; adapt the other layers")  # fmt: skip
    config = peft.LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=target_modules, task_type="CAUSAL_LM")  # fmt: skip
    try:
        with warnings.catch_warnings():  # peft probes a property transformers 5 deprecates; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"LoRA target_modules {target_modules!r}: {str(e).splitlines()[0]}") from None


@contextmanager
def adapter_disabled(model: nn.Module, disable: bool = True):
    """The base model's function for the duration: a peft model with its adapters switched off (the LoRA
    policy's reference, with no second copy of the weights); any other model, or ``disable=False``, as it is."""
    if disable and is_peft_model(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def save_model(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None, merge_lora: bool = False,
               state_dict: dict | None = None) -> None:  # fmt: skip
    """``model`` as a directory ``from_pretrained`` loads, with its generation config and ``tokenizer``: a peft
    model as its adapter (``PeftModel.from_pretrained(base, directory)``), or with ``merge_lora`` as a plain model
    with the adapters merged in (the model itself is left unmerged)."""
    directory = os.fspath(directory)
    if merge_lora and is_peft_model(model):
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(directory)
    else:
        model.save_pretrained(directory, **({"state_dict": state_dict} if state_dict is not None else {}))
    gen = getattr(unwrap(model), "generation_config", None)
    if gen is not None and not os.path.exists(os.path.join(directory, "generation_config.json")):
        gen.save_pretrained(directory)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` of the model's output projection, for the fused linear ops.
    Tied embeddings are fine (the weight is then the input embedding matrix). Use ``output_head`` to also get
    the model's logit scale: the logits of some models are not ``h W^T + b`` alone."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"lm_head_of needs a model whose output embeddings are a plain nn.Linear; {type(model).__name__} has "
            f"{type(head).__name__ if head is not None else 'none'}"
        )
    return head.weight, head.bias


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers model with a .config, got {type(model).__name__}")
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def logit_scale_of(model: nn.Module) -> float:
    """The constant ``s`` in ``logits = s * lm_head(h)`` read from the model's config (1.0 for most models).

    Raises ValueError for tanh soft-capping, which no fused linear head can reproduce, and for a scale that
    is not a positive finite number (a temperature cannot absorb it)."""
    cfg = _text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (config.final_logit_softcapping={cap}: "
            "logits = cap * tanh(logits / cap)), which the fused linear lm_head does not compute; score this model "
            "from its own logits instead (fusedrl.kernels.logprobs(model(...).logits, labels))"
        )
    scale = 1.0
    for name in _MULTIPLIERS:
        value = getattr(cfg, name, None)
        if value is not None:
            scale *= float(value)
    value = getattr(cfg, "logits_scaling", None)
    if value is not None:
        value = float(value)
        if getattr(cfg, "model_type", None) in _LOGITS_SCALING_MULTIPLIES:
            scale *= value
        else:
            scale = scale / value if value != 0 else float("inf")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"{type(model).__name__}'s config scales its logits by {scale!r}; the fused lm_head folds the scale into "
            "the temperature and needs a positive finite number"
        )
    return scale


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(weight (V, H), bias (V,) or None, scale)`` such that the model's logits are ``scale * (h W^T + b)``:
    the one reader of a model's output head, for the engine and the drop-ins alike. The fused ops take the
    scale as ``temperature / scale`` (what ``generate()`` samples from is ``softmax(scale * z / T)``).

    TypeError when the output head is not a plain ``nn.Linear``; ValueError for soft-capped logits. A head
    sharded as a DTensor (FSDP2) is gathered whole, as the fused op reads the full weight."""
    model = unwrap(model)
    weight, bias = lm_head_of(model)
    scale = logit_scale_of(model)
    if callable(getattr(weight, "full_tensor", None)):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias, scale


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model to read the body and the head from: a PEFT wrapper's base model (its adapters
    stay injected in the layers). A DistributedDataParallel wrapper is refused: calling the body directly would
    skip its forward, and with it the gradient all-reduce bookkeeping."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "model is wrapped in DistributedDataParallel: calling its body directly would bypass DDP's forward and "
            "its gradient synchronisation. Compute the log-probs inside the wrapped model's forward (as "
            "fusedrl.integrations.trl does), or use fusedrl.engine's trainer"
        )
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def backbone_of(model: nn.Module) -> nn.Module:
    """The body of a transformers model that returns hidden states (``model.model``, ``model.transformer``,
    a critic's ``.backbone``, ...): ``backbone_of(m)(input_ids, position_ids=..., **attn_kwargs).last_hidden_state``."""
    for attr in ("model", "transformer", "backbone"):
        body = getattr(model, attr, None)
        if isinstance(body, nn.Module):
            return body
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    raise TypeError(
        f"backbone_of needs a transformers model with a body (.model, .transformer or .base_model); got "
        f"{type(model).__name__}"
    )


def hidden_states(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """``(B, T, H)`` last hidden states of the model's body: what its output head would be applied to, without
    applying it. The one body forward of the engine and the drop-ins; ``args`` / ``kwargs`` are what the body
    takes (``input_ids``, ``attention_mask``, ``position_ids``, and for packed input ``cu_seq_lens_q/k``,
    ``max_length_q/k``, which need ``use_packed_attention(model)`` first)."""
    _check_packed_ready(model, kwargs, type(model).__name__)
    return backbone_of(unwrap(model))(*args, use_cache=False, **kwargs).last_hidden_state


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio compares two forwards of the same weights: dropout would make it noise, not 1."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        cfg = getattr(m, "config", None)
        if cfg is not None:
            for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                         "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):  # fmt: skip
                if isinstance(getattr(cfg, name, None), float):
                    setattr(cfg, name, 0.0)


def enable_checkpointing(model: nn.Module) -> None:
    """HF activation (gradient) checkpointing on the outermost transformers model inside ``model``."""
    for m in model.modules():
        # transformers 5 renamed the method; older releases only have the gradient_ name.
        enable = getattr(m, "activation_checkpointing_enable", None) or getattr(
            m, "gradient_checkpointing_enable", None
        )
        if enable is not None and getattr(m, "supports_gradient_checkpointing", False):
            enable()
            return
    raise ValueError(f"gradient_checkpointing=True but {type(model).__name__} holds no model that supports it")


def _check_packed_ready(model: nn.Module, kwargs: dict, who: str) -> None:
    if any(kwargs.get(k) is not None for k in _PACKING_KWARGS) and not is_packed_attention(model):
        raise ValueError(
            f"{who} got cu_seq_lens_* but its attention is {model_attention(model)!r}: call "
            "fusedrl.engine.attention.use_packed_attention(model) first, or the packed sequences attend to each other"
        )


def model_attention(model: nn.Module) -> str | None:
    """The attention implementation of the first transformers model inside ``model``."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            return cfg._attn_implementation
    return None
