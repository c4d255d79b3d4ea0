"""Re-admitting episodes: on a continuous-batching engine, an episode whose turn finished goes to its environment
in a worker thread while the engine keeps decoding the others, and its next turn joins the running batch as soon
as the observation is ready, instead of every episode waiting for the batch's slowest turn and slowest
environment call.

A backend offers this through ``stream(policy, spec=, stop_ids=, capacity=)``: a session (a context manager) with

    session.submit(key, prompt_ids, n=, max_new_tokens=, seed=)   # n samples of one prompt, keyed key, key+1, ...
    session.poll(timeout) -> [(key, tokens, logprobs or None)]     # turns finished since the last poll
    session.in_flight                                                 # requests not yet returned

``capacity``: the worst-case lengths of every sequence the session may hold at once (the KV cache's size).
``hf-paged`` (transformers' ``ContinuousBatchingManager``: a background thread decodes while requests arrive) and
``vllm`` (its ``LLMEngine``, stepped here; ``step()`` returns the requests it finished) have one; plain ``hf``
generates a left-padded batch to its end and cannot admit mid-generation, so it keeps the turn-synchronous loop
of ``EpisodeRunner.run`` (its environment calls still run concurrently across episodes).

Reproducibility. What an episode sees depends only on its own samples and its own environment, never on the order
in which environments answer. Its samples are reproducible where the engine samples each request from its own
seeded generator (vllm): an episode's turn t draws from a seed derived from its group's seed (drawn from torch's
RNG, as a single-turn ``generate`` draws it, so a one-turn environment samples what the single-turn trainer
samples) and (sample, t), whichever requests share its batch. hf-paged draws every token of a batch from one
random stream, so with re-admission which episode gets which draw depends on timing: ``EpisodeConfig.readmit``
turns it on there explicitly (None, the default, re-admits only where seeded runs still repeat).
"""

from __future__ import annotations

import concurrent.futures as cf

import torch

from .rollout_backends import SamplingSpec


def readmits(tr) -> bool:
    """Whether the trainer's episodes run re-admitting: the backend has a session, and ``EpisodeConfig.readmit``
    (None: where the engine samples per request, ``stream_reproducible``)."""
    backend = tr.rollout
    if not callable(getattr(backend, "stream", None)):
        return False
    if tr.config.readmit is None:
        return bool(getattr(backend, "stream_reproducible", False))
    return tr.config.readmit


def turn_seed(group_seed: int, sample: int, turn: int) -> int:
    """The seed of a sample's turn (turn 0 is the group's request, seeded ``group_seed``, forked by the engine)."""
    return (group_seed * 1_000_003 + sample * 7_919 + turn * 104_729) % (2**31 - 1)


def run_readmitting(runner, tr, episodes: list, pool: cf.Executor | None) -> bool:
    """Run ``episodes`` (``samples_per_prompt`` consecutive per row) to their end on the backend's session; True
    when every turn came with the engine's log-probs. ``pool``: where environment calls run (None: here)."""
    cfg = tr.config
    n = cfg.samples_per_prompt
    spec = SamplingSpec(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k)  # fmt: skip
    seeds = torch.randint(0, 2**31 - 1, (len(episodes) // n,)).tolist()
    capacity = [len(e.prompt) + e.limit for e in episodes]
    has_logprobs, waiting = True, {}
    session = tr.rollout.stream(tr.policy, spec=spec, stop_ids=tr.stop_ids, capacity=capacity)
    with session:
        for g, seed in enumerate(seeds):
            e = episodes[g * n]
            session.submit(g * n, e.prompt, n=n, max_new_tokens=min(cfg.max_new_tokens, e.limit), seed=seed)
        while session.in_flight or waiting:
            # Block on the engine only while no environment call is pending; else look at both in turn.
            finished = session.poll(0.002 if waiting else 1.0) if session.in_flight else []
            for key, tokens, logprobs in finished:
                e = episodes[key]
                runner._add_turn(e, tokens, logprobs, min(cfg.max_new_tokens, e.limit - len(e.tokens)))
                has_logprobs = has_logprobs and logprobs is not None
                read = runner._read(e)
                if pool is None:
                    runner._take(e, read, runner._ask(e, read))
                    _next_turn(session, episodes, key, seeds, cfg)
                else:
                    waiting[pool.submit(runner._ask, e, read)] = (key, read)
            if waiting and not session.in_flight:
                cf.wait(waiting, return_when=cf.FIRST_COMPLETED)
            for fut in [f for f in waiting if f.done()]:
                key, read = waiting.pop(fut)
                runner._take(episodes[key], read, fut.result())
                _next_turn(session, episodes, key, seeds, cfg)
    return has_logprobs


def _next_turn(session, episodes: list, key: int, seeds: list[int], cfg) -> None:
    e = episodes[key]
    if not e.done:
        n = cfg.samples_per_prompt
        session.submit(key, e.prompt + e.tokens, n=1, max_new_tokens=min(cfg.max_new_tokens, e.limit - len(e.tokens)),
                       seed=turn_seed(seeds[key // n], key % n, e.turns))  # fmt: skip


class HFPagedSession:
    """``HFPagedBackend.stream``: one transformers ``ContinuousBatchingManager`` for a step's episodes; its
    background thread decodes while requests arrive. ``seed`` is not used (one random stream for the batch)."""

    def __init__(self, model, gen, cb, stop_ids):
        from .rollout_backends import _cb_attention, _skip_manager_gc
        from .sampling import eval_mode

        self.model, self.gen, self.cb, self.stops = model, gen, cb, set(stop_ids)
        self._contexts = [eval_mode(model), _cb_attention(model), torch.random.fork_rng(devices=[]), _skip_manager_gc()]
        self._keys, self._budget, self.manager = {}, {}, None

    def __enter__(self):
        for c in self._contexts:
            c.__enter__()
        self.manager = self.model.init_continuous_batching(generation_config=self.gen,
                                                           continuous_batching_config=self.cb)  # fmt: skip
        self.manager.start()
        return self

    def __exit__(self, *exc):
        try:
            if self.manager is not None:
                self.manager.stop(block=True, timeout=5)
                self.manager.destroy()
        finally:
            for c in reversed(self._contexts):
                c.__exit__(*exc)
        return False

    @property
    def in_flight(self) -> int:
        return len(self._keys)

    def submit(self, key: int, prompt_ids, *, n: int, max_new_tokens: int, seed: int | None = None) -> None:
        for i in range(n):  # the manager forks by its generation config only: n requests of the same prompt
            rid = self.manager.add_request(list(prompt_ids), max_new_tokens=max_new_tokens)
            if rid is None:
                raise RuntimeError("the continuous batching manager refused a request (it has stopped)")
            self._keys[rid], self._budget[rid] = key + i, max_new_tokens

    def poll(self, timeout: float) -> list[tuple[int, list[int], list[float] | None]]:
        from .rollout_backends import _cut_at_stop

        done, wait = [], timeout
        while (r := self.manager.get_result(timeout=wait)) is not None:
            wait = 0.0001
            if not r.is_finished():
                continue
            if r.error is not None:
                raise RuntimeError(f"continuous batching failed on request {r.request_id}: {r.error}")
            key = self._keys.pop(r.request_id)
            toks, lps = _cut_at_stop(r.generated_tokens, r.logprobs, self.stops, self._budget.pop(r.request_id))
            done.append((key, toks, lps if lps is not None and len(lps) == len(toks) else None))
        if not done and not self.manager.is_running():
            raise RuntimeError("the continuous batching manager stopped with requests in flight")
        return done


class VLLMSession:
    """``VLLMBackend.stream``: requests go straight into the colocated engine's ``LLMEngine``; ``poll`` runs one
    engine step (a forward over every running request) and returns the requests it finished."""

    def __init__(self, backend, spec, stop_ids):
        self.backend, self.spec, self.stop_ids, self.stops = backend, spec, list(stop_ids), set(stop_ids)
        self.engine = backend.llm.llm_engine
        self._keys, self._budget, self._count = {}, {}, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._keys:  # an environment failed mid-step: leave the engine empty for the next call
            self.engine.abort_request(list(self._keys))
        self.backend._rested()
        return False

    @property
    def in_flight(self) -> int:
        return len(self._keys)

    def submit(self, key: int, prompt_ids, *, n: int, max_new_tokens: int, seed: int | None = None) -> None:
        from vllm.sampling_params import RequestOutputKind

        params = self.backend.params(self.spec, self.stop_ids, n=n, max_tokens=max_new_tokens, seed=seed)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        rid = f"fusedrl-episode-{self._count}"
        self._count += 1
        self.engine.add_request(rid, {"prompt_token_ids": list(prompt_ids)}, params, lora_request=self.backend._lora)
        self._keys[rid], self._budget[rid] = key, max_new_tokens

    def poll(self, timeout: float) -> list[tuple[int, list[int], list[float] | None]]:
        from .vllm_backend import completion

        done = []
        for o in self.engine.step():
            if not o.finished:
                continue
            key, limit = self._keys.pop(o.request_id), self._budget.pop(o.request_id)
            for c in sorted(o.outputs, key=lambda c: c.index):
                toks, lps = completion(c, self.stops, limit)
                done.append((key + c.index, toks, lps))
        return done
