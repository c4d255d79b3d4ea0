"""The ``vllm`` rollout backend: vLLM colocated in this process (see ``rollout_backends`` for the protocol)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import torch

from .data import context_length
from .rollout_backends import RolloutBackend, RolloutOutput, _check_request, _cut_at_stop


class VLLMBackend(RolloutBackend):
    """vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), built on first use from the policy saved to a
    temporary directory. ``kv_cache_gb``: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``; None sizes it from
    the first call's token budget); ``gpu_memory_utilization``: the share of GPU memory vLLM may take on CUDA.
    ``cache_dir``: where the sampler's inductor compile is cached (the run directory; None: a temporary one)."""

    name = "vllm"

    def __init__(self, *, gpu_memory_utilization: float = 0.3, kv_cache_gb: float | None = None,
                 cache_dir: str | None = None, seed: int = 0):  # fmt: skip
        self.gpu_memory_utilization, self.kv_cache_gb = gpu_memory_utilization, kv_cache_gb
        self.cache_dir, self.seed = cache_dir, seed
        self.llm = None
        self._dir = None
        self._stale = False

    # -- engine life cycle
    def _build(self, policy, tokens: int) -> None:
        """Build the engine; ``tokens``: the most tokens its sequences may hold at once (the KV cache's size)."""
        model = _unwrap(policy)
        device = next(model.parameters()).device
        self._dir = tempfile.mkdtemp(prefix="fusedrl-vllm-")
        model.save_pretrained(self._dir, safe_serialization=True)
        cfg = model.config
        ctx = context_length(model) or 2048
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if device.type == "cpu":
            gb = self.kv_cache_gb
            if gb is None:  # twice the worst case of this call (every sequence resident at full length), >= 1 GiB
                heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
                per_token = 2 * cfg.num_hidden_layers * heads * head_dim * model.dtype.itemsize
                gb = 2 * per_token * (tokens + ctx) / 2**30
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(gb)))
        # The sampler vLLM compiles with inductor on the first call that asks for log-probs (seconds): cached where
        # the run lives, so a second run in the same directory skips it. Kept set: later compiles find it too.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(self.cache_dir or self._dir, "inductor"))
        saved = {k: os.environ.get(k) for k in (*env, "LD_PRELOAD", "VLLM_DIST_IDENT")}
        os.environ.update(env)
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            # vLLM's CPU worker re-seeds torch's global RNG and replaces torch.set_num_threads with a no-op; it
            # also sets LD_PRELOAD for child processes: all three are put back once the engine stands.
            with torch.random.fork_rng(devices=[]):
                from vllm import LLM

                kwargs = dict(
                    model=self._dir, dtype=str(model.dtype).removeprefix("torch."), max_model_len=ctx,
                    enforce_eager=True, seed=self.seed, skip_tokenizer_init=True, enable_prefix_caching=True,
                    logprobs_mode="processed_logprobs", generation_config="vllm",  # no defaults from the model dir
                )  # fmt: skip
                if device.type == "cuda":
                    kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
                else:  # CPU's default block is 128 tokens: RL prompts rarely fill one, and a group shares full blocks
                    kwargs["block_size"] = 32
                self.llm = LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            set_threads(threads)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._stale = False

    def sync_weights(self, policy) -> None:
        """Push the policy's weights into the engine (in place) and drop its prefix cache. Lazy: the push happens
        before the next generation, once however many optimizer steps came in between."""
        self._stale = True

    def _push(self, policy) -> None:
        model = _unwrap(policy)
        weights = [(k, v.detach()) for k, v in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        self._stale = False

    def _ready(self, policy, tokens: int) -> None:
        """The engine built (sized for ``tokens`` resident tokens) and serving the policy's current weights."""
        if self.llm is None:
            self._build(policy, tokens)
        elif self._stale:
            self._push(policy)

    @staticmethod
    def params(spec, stop_ids, *, n: int, max_tokens: int, seed: int):
        """vLLM's SamplingParams for ``spec``: ``n`` samples of at most ``max_tokens``, seeded per request."""
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=0.0 if spec.greedy else spec.temperature, seed=seed,
            top_p=1.0 if spec.greedy else spec.top_p, top_k=0 if spec.greedy else spec.top_k,  # 0: vLLM's "off"
            max_tokens=max_tokens, stop_token_ids=list(stop_ids), logprobs=0, detokenize=False,
            ignore_eos=True,  # stop_ids are the only stops (they hold the eos when the caller wants it), as in hf
        )  # fmt: skip

    stream_reproducible = True  # every request samples from its own seeded generator

    def stream(self, policy, *, spec, stop_ids, capacity):
        """A re-admitting session (``episode_stream``) on the engine's step-wise ``LLMEngine``."""
        from .episode_stream import VLLMSession

        self._ready(policy, sum(capacity))
        return VLLMSession(self, spec, stop_ids)

    def close(self) -> None:
        self.llm = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        _check_request(prompt_ids, n)
        self._ready(policy, sum(len(p) + spec.max_new_tokens for p in prompt_ids) * n)
        # Greedy takes n = 1 only: its n copies go in as separate requests (the prefix cache shares their prefill).
        inputs, forks = ([p for p in prompt_ids for _ in range(n)], 1) if spec.greedy else (prompt_ids, n)
        # A seed per request, from the caller's RNG: a request's samples do not depend on what shares its batch
        # (episode_stream re-admits turns at any time and seeds them the same way).
        seeds = torch.randint(0, 2**31 - 1, (len(inputs),)).tolist()
        params = [self.params(spec, stop_ids, n=forks, max_tokens=spec.max_new_tokens, seed=s) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in inputs], params, use_tqdm=False)
        stops = set(stop_ids)
        responses, logprobs = [], []
        for o in outs:
            for c in sorted(o.outputs, key=lambda c: c.index):
                toks, lps = completion(c, stops, spec.max_new_tokens)
                responses.append(toks)
                logprobs.append(lps)
        if any(lp is None or len(lp) != len(t) for lp, t in zip(logprobs, responses)):
            logprobs = None
        return RolloutOutput(responses, logprobs)


def completion(c, stops: set[int], limit: int):
    """(tokens, log-probs or None) of a vLLM completion, cut at its first stop id and ``limit``."""
    lps = None if c.logprobs is None else [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
    return _cut_at_stop(c.token_ids, lps, stops, limit)


def _unwrap(policy):
    """The plain transformers model whose weights vLLM loads (LoRA is refused where the backend is chosen)."""
    return getattr(policy, "module", policy)
