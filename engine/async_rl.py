"""Asynchronous RL: a producer process samples and scores while the learner updates.

    PPOTrainer(policy, tok, reward, PPOConfig(async_mode="one-step-off", max_staleness=1)).train(prompts)

The producer (``producer.Producer``: rollout backend, environments, reward) runs in a process of its own
(``torch.multiprocessing`` spawn, ``producer_threads`` torch threads) with a private copy of the policy, and puts
scored batches in a bounded queue (``queue_batches``). The learner takes them in order, trains, and publishes its
weights to a shared-memory copy (``WeightBoard``: one memcpy per step under a lock; ``perf/weight_sync_s``); the
producer loads the newest published weights before each batch (``one-step-off``) and, in ``streaming``, also between
generation chunks of ``stream_chunk_tokens`` tokens, so a response may span versions.

Versions count trainer steps: the weights published after step s are version s + 1 (version 0: the initial policy).
Batch b trains at version b, and the producer starts it only once version b - max_staleness is published, so its
tokens are at most ``max_staleness`` versions old; a group with an older token (a batch queued before a resume) is
dropped and counted. With ``max_staleness=0`` the producer waits for every step's weights: the synchronous trainer's
computation, seed for seed. Otherwise the producer scores the sampled tokens' log-probs with the weights that sampled
them when the engine gives none, and ``rollout_correction="auto"`` corrects the loss with them (tis).

Reliability: a producer that raises stops the run with its traceback; the learner never waits on a dead producer;
``train()`` leaves no producer process behind, on return or on error (Ctrl-C included: the producer ignores SIGINT
and is stopped by the learner). Multi-turn episodes take new weights between batches only (``streaming`` acts as
``one-step-off`` there).

The vllm backend runs in the producer process only (its engine is built there; the learner's is never started, so
there are no synchronous warm-up steps with it): the engine's own log-probs are the behaviour log-probs, and a refresh
marks the engine stale so that it takes the new weights before its next generation (or chunk, in ``streaming``).
"""

from __future__ import annotations

import contextlib
import ctypes
import copy
import math
import pickle
import queue as queue_mod
import signal
import sys
import threading
import time
import traceback
import types
from dataclasses import replace

import numpy as np
import torch
import torch.multiprocessing as mp

from .attention import use_packed_attention
from .dynamic_sampling import produce_step
from .producer import Producer, ScoredBatch, behaviour_logprobs, draw_prompts
from .rollout_backends import RolloutBackend, RolloutOutput, build_rollout_backend


class WeightBoard:
    """The learner's published weights in shared memory, with their version."""

    def __init__(self, policy: torch.nn.Module, ctx):
        # One shared buffer per dtype, the tensors views into it: a producer attaches to a handful of shared
        # segments instead of one per tensor (each a round trip to this process while it starts).
        state = policy.state_dict()
        sizes: dict[torch.dtype, int] = {}
        self.slots = []  # (name, dtype, offset, shape)
        for name, t in state.items():
            self.slots.append((name, t.dtype, sizes.get(t.dtype, 0), tuple(t.shape)))
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        self.flat = {dt: torch.empty(n, dtype=dt).share_memory_() for dt, n in sizes.items()}
        self.version = ctx.Value("q", 0, lock=False)
        self.lock = ctx.Lock()
        self.publish(policy, 0)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.flat[dt][off : off + math.prod(shape)].view(shape) for name, dt, off, shape in self.slots}

    def publish(self, policy: torch.nn.Module, version: int) -> float:
        """Copy ``policy``'s weights in as ``version``; returns the seconds it took."""
        t0 = time.perf_counter()
        state = policy.state_dict()
        with self.lock, torch.no_grad():
            for k, t in self.tensors.items():
                t.copy_(state[k])
            self.version.value = version
        return time.perf_counter() - t0

    def load(self, model: torch.nn.Module, have: int) -> int:
        """Load the published weights into ``model`` when newer than version ``have``; returns the version it holds."""
        if self.version.value <= have:
            return have
        with self.lock:
            model.load_state_dict(self.tensors)
            return self.version.value


class StreamingBackend(RolloutBackend):
    """A backend generating in chunks of ``chunk`` tokens, calling ``refresh()`` (which loads newer weights and
    returns the version held) between chunks; the unfinished samples continue from prompt + their tokens so far.
    ``last_versions``: per sample, the version of each token of the last call."""

    def __init__(self, inner: RolloutBackend, chunk: int, refresh, score):
        self.inner, self.chunk, self.refresh, self.score = inner, chunk, refresh, score
        self.name = f"{getattr(inner, 'name', type(inner).__name__)}+streaming"
        self.last_versions: list[list[int]] | None = None

    def generate(self, policy, prompt_ids, *, n, spec, stop_ids, pad_token_id):
        stops = set(stop_ids)
        heads = [p for p in prompt_ids for _ in range(n)]
        tokens, logps, versions = [[] for _ in heads], [[] for _ in heads], [[] for _ in heads]
        todo, first = list(range(len(heads))), True
        while todo:
            version = self.refresh()
            budget = min(self.chunk, spec.max_new_tokens - min(len(tokens[i]) for i in todo))
            ids = [heads[i] + tokens[i] for i in todo] if not first else prompt_ids
            out = self.inner.generate(policy, ids, n=n if first else 1, spec=replace(spec, max_new_tokens=budget),
                                      stop_ids=stop_ids, pad_token_id=pad_token_id)  # fmt: skip
            lp = (
                out.logprobs
                if out.logprobs is not None
                else self.score([heads[i] + tokens[i] for i in todo], out.responses)
            )
            for i, r, l in zip(todo, out.responses, lp):
                tokens[i] += r
                logps[i] += list(l)
                versions[i] += [version] * len(r)
            todo = [i for i in todo if tokens[i][-1] not in stops and len(tokens[i]) < spec.max_new_tokens]
            first = False
        self.last_versions = versions
        return RolloutOutput(tokens, logps)

    def sync_weights(self, policy) -> None:
        self.inner.sync_weights(policy)

    def close(self) -> None:
        self.inner.close()


def _producer_main(data: bytes, board: WeightBoard, out_queue, stop, handover, plan: dict) -> None:
    """The producer process (``data``: the pickled ``Producer``): batches ``handover.start`` .. ``plan["total"] - 1``
    into ``out_queue``."""
    producer = None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the learner, which stops this process
    _die_with_parent()
    parent = mp.parent_process()
    stopped = lambda: stop.is_set() or (parent is not None and not parent.is_alive())  # noqa: E731
    try:
        torch.set_num_threads(plan["threads"])
        producer = pickle.loads(data)
        cfg, policy = producer.config, producer.policy
        for model in (policy, producer.reward_model):  # the packed attention registers per process
            if model is not None:
                use_packed_attention(model)
        if producer.rollout is None:
            producer.rollout, _ = build_rollout_backend(cfg, policy, rank=plan["rank"])
        handover.ready.set()
        while not handover.go.is_set():  # the learner says at which step the producer takes over
            if stopped():
                return
            time.sleep(0.002)
        start = handover.start.value
        torch.manual_seed(producer_seed(cfg.seed, plan["rank"], start))
        held = [board.load(policy, -1)]
        producer.rollout.sync_weights(policy)
        sync_s = [0.0]

        def refresh() -> int:
            t0 = time.perf_counter()
            new = board.load(policy, held[0])
            if new != held[0]:
                producer.rollout.sync_weights(policy)
                held[0] = new
                sync_s[0] += time.perf_counter() - t0
            return held[0]

        ahead = 0 if plan["staleness"] == 0 else 1 if cfg.async_mode == "one-step-off" else plan["staleness"]
        if cfg.async_mode == "streaming" and plan["staleness"] > 0 and producer.episodes is None:
            score = lambda heads, resp: behaviour_logprobs(policy, heads, resp, cfg, producer.device)  # noqa: E731
            producer.rollout = StreamingBackend(producer.rollout, cfg.stream_chunk_tokens, refresh, score)
        busy, started = 0.0, time.perf_counter()
        for b in range(start, plan["total"]):
            while board.version.value < b - ahead:  # the learner has not published the weights batch b may use
                if stopped():
                    return
                time.sleep(0.002)
            t0 = time.perf_counter()
            version = refresh()

            def produce(prompts, b=b):
                return producer.produce(prompts, version=version)

            draw = lambda r, b=b: draw_prompts(plan["prompts"], seed=cfg.seed, step=b, n=cfg.prompts_per_step,  # noqa: E731
                                               world_size=plan["world_size"], rank=plan["rank"], round=r)  # fmt: skip
            batch = produce_step(produce, draw, cfg)
            busy += time.perf_counter() - t0
            timing = {"busy_frac": busy / max(time.perf_counter() - started, 1e-9), "weight_load_s": sync_s[0]}
            sync_s[0] = 0.0
            # Plain pickle: tensors by value (torch's queue would share them through this process, which may
            # have exited by the time the learner reads them).
            data = pickle.dumps(batch)
            while not stopped():
                try:
                    out_queue.put(("batch", b, data, timing), timeout=0.1)
                    break
                except queue_mod.Full:
                    continue
    except BaseException:  # noqa: BLE001 - everything goes back to the learner, which raises it
        with contextlib.suppress(Exception):
            out_queue.put(("error", traceback.format_exc()), timeout=5)
    finally:
        if producer is not None and producer.rollout is not None:
            with contextlib.suppress(Exception):
                producer.rollout.close()


def _die_with_parent() -> None:
    """Linux: have the kernel stop this process when the learner dies (SIGKILL included), even mid-generation (the
    producer's waits also poll the parent, for the other platforms)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ProducerFailed(RuntimeError):
    """The producer process raised (its traceback is the message) or died."""


class AsyncRun:
    """The learner's side of an asynchronous run of trainer ``tr`` over ``prompts``: starts the producer process,
    hands out batches (``step(i)``), publishes weights, and stops the producer on ``close`` (a context manager)."""

    def __init__(self, tr, prompts: list, *, timeout_s: float = 600.0):
        cfg = tr.config
        self.tr, self.timeout_s = tr, timeout_s
        if tr.fsdp:
            raise ValueError(f"async_mode={cfg.async_mode!r} needs the policy's full weights in every learner "
                             "(DDP); FSDP shards them: use fsdp=False or async_mode='off'")  # fmt: skip
        for name, obj in (("reward", tr.reward_fn), ("rollout", tr._given_rollout), ("environment", tr.episodes)):
            try:
                pickle.dumps(obj)
            except Exception as e:  # noqa: BLE001 - any pickling failure means the same thing
                raise ValueError(
                    f"async_mode={cfg.async_mode!r} runs the producer in its own process: the {name} "
                    f"must be picklable (a module-level function or class), got {obj!r} ({e})"
                ) from None
        ctx = mp.get_context("spawn")
        self.board = WeightBoard(tr.policy, ctx)
        self.board.version.value = tr.global_step
        self.queue = ctx.Queue(maxsize=cfg.queue_batches)
        self.stop = ctx.Event()
        k = cfg.max_staleness
        producer = Producer.of(tr, behaviour_logp=scores_behaviour(cfg))
        producer.policy = copy.deepcopy(tr.policy).eval()
        producer.rollout = tr._given_rollout  # None: the producer builds the configured backend itself
        plan = {"total": cfg.total_steps, "prompts": prompts, "threads": cfg.producer_threads, "rank": tr.rank,
                "world_size": tr.world_size, "staleness": k}  # fmt: skip
        # ready: the producer has started; go + start: the step it takes over at (the learner runs the steps before
        # synchronously with sync_warmup; at max_staleness=0 the producer takes the first step, as the trainer would).
        self.handover = types.SimpleNamespace(ready=ctx.Event(), go=ctx.Event(), start=ctx.Value("q", -1, lock=False))
        # A backend with an engine of its own (vllm) is built on first use: synchronous warm-up steps would build a
        # second engine in the learner for a few steps, so with one the learner waits for the producer's engine.
        self.warmup = cfg.sync_warmup and k > 0 and getattr(tr.rollout, "runs_policy", True)
        self.prompts = prompts
        # The producer by value (plain pickle): only the published weights are shared memory.
        args = (pickle.dumps(producer), self.board, self.queue, self.stop, self.handover, plan)
        self.process = ctx.Process(target=_producer_main, args=args, daemon=True, name="fusedrl-producer")
        # Ctrl-C is ignored for the moment the producer is started: an interrupt would cut its start-up data
        # mid-write, and the child keeps the ignored disposition through its own start-up (it then ignores SIGINT for
        # good: the learner stops it).
        main = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.process.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, before)
        del producer
        self.dropped_groups = 0
        self.last_end = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _get(self):
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                msg = self.queue.get(timeout=0.2)
            except queue_mod.Empty:
                if not self.process.is_alive():
                    with contextlib.suppress(queue_mod.Empty):
                        msg = self.queue.get(timeout=1.0)  # an error put just before it exited
                        break
                    raise ProducerFailed(f"the producer process died (exit code {self.process.exitcode})") from None
                if time.monotonic() > deadline:
                    raise ProducerFailed(f"no batch from the producer in {self.timeout_s:.0f} s") from None
                continue
            break
        if msg[0] == "error":
            raise ProducerFailed(f"the producer process raised:\n{msg[1]}")
        return msg

    def step(self, i: int) -> dict[str, float]:
        """Step ``i`` on the next batch the producer made that is fresh enough (or, until the producer has
        started, a synchronous step); returns its metrics."""
        tr, k = self.tr, self.tr.config.max_staleness
        if not self.handover.go.is_set():
            # Every rank hands over at the same step: the synchronous step's rollout may hold collectives.
            waiting = not self.handover.ready.is_set() and self.process.is_alive()
            if self.warmup and tr.dist.max(float(waiting)):
                return self._synchronous_step(i)
            self.handover.start.value = i
            self.handover.go.set()
        t_wait = time.perf_counter()
        dropped = 0
        while True:
            _, b, data, timing = self._get()
            batch = pickle.loads(data)
            keep = fresh_groups(batch, tr.global_step, k, tr.config.samples_per_prompt)
            dropped += int(len(batch) - keep.sum())
            if keep.any():
                break
        if not keep.all():
            batch = batch.select(np.flatnonzero(keep))
        wait_s = time.perf_counter() - t_wait
        t_learn = time.perf_counter()
        lag = np.concatenate([tr.global_step - np.asarray(v, dtype=np.float64) for v in batch.token_versions()])
        metrics = tr.learn(batch)
        sync_s = self.board.publish(tr.policy, tr.global_step)
        learn_s = time.perf_counter() - t_learn
        now = time.perf_counter()
        self.dropped_groups += dropped
        # Tokens over the step's wall time (waiting for the producer included), as the synchronous step counts them.
        metrics["perf/tokens_per_s"] *= metrics["perf/step_s"] / max(now - self.last_end, 1e-9)
        metrics.update({
            "async/staleness_mean": float(lag.mean()), "async/staleness_max": float(lag.max()),
            "async/dropped_trajectories": float(dropped), "async/queued_batches": float(self.queue.qsize()),
            "async/producer_busy_frac": timing["busy_frac"], "async/trainer_busy_frac": learn_s / max(now - self.last_end, 1e-9),
            "async/wait_s": wait_s, "perf/weight_sync_s": sync_s, "async/producer_weight_load_s": timing["weight_load_s"],
            "async/synchronous_step": 0.0,
        })  # fmt: skip
        self.last_end = now
        return metrics

    def _synchronous_step(self, i: int) -> dict[str, float]:
        tr = self.tr
        metrics = tr.step(tr.sample_prompts(self.prompts, i))
        sync_s = self.board.publish(tr.policy, tr.global_step)
        self.last_end = time.perf_counter()
        return {**metrics, "async/synchronous_step": 1.0, "async/staleness_mean": 0.0, "async/staleness_max": 0.0,
                "async/dropped_trajectories": 0.0, "perf/weight_sync_s": sync_s}  # fmt: skip

    def close(self) -> None:
        """Stop the producer and reap it (terminate, then kill, if it does not stop in time)."""
        # A producer still reading its start-up data would die mid-read with a traceback: let it finish starting
        # (it then sees the stop and returns quietly).
        deadline = time.monotonic() + 60
        while self.process.is_alive() and not self.handover.ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop.set()
        with contextlib.suppress(Exception):
            while True:
                self.queue.get_nowait()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.queue.close()
        self.queue.cancel_join_thread()


def producer_seed(seed: int, rank: int, step: int) -> int:
    """The producer's torch seed when it starts at ``step``: the synchronous trainer's at step 0, else one derived
    from (seed, rank, step) alone, so that a resumed run's producer draws the same samples again."""
    if step == 0:
        return seed + 1000003 * rank
    return int(np.random.default_rng([seed, rank, step]).integers(2**62))


def scores_behaviour(config) -> bool:
    """Whether the producer process gives behaviour log-probs for every batch (scoring them when the engine gives
    none): in an async mode with a staleness above 0 (at 0 the behaviour policy is the one the learner scores)."""
    return config.async_mode != "off" and config.max_staleness > 0


def producer_state(tr) -> dict:
    """What a checkpoint keeps of the producer: the batch it restarts from and that batch's torch seed (batches
    queued but not trained are dropped on resume and sampled again)."""
    return {"next_batch": tr.global_step, "seed": producer_seed(tr.config.seed, tr.rank, tr.global_step)}


@contextlib.contextmanager
def step_source(tr, prompts: list):
    """The function ``train()`` runs step ``i`` with: the synchronous step, or an ``AsyncRun``'s (stopped on exit)."""
    if tr.config.async_mode == "off":
        yield lambda i: tr.step(tr.sample_prompts(prompts, i))
        return
    with AsyncRun(tr, prompts) as run:
        yield run.step


def fresh_groups(batch: ScoredBatch, step: int, max_staleness: int, group_size: int) -> np.ndarray:
    """(B,) bool: the sequences whose whole group was sampled at most ``max_staleness`` versions before ``step``."""
    oldest = np.array([min(v) if len(v) else step for v in batch.token_versions()], dtype=np.int64)
    ok = (step - oldest <= max_staleness).reshape(-1, group_size).all(1)
    return np.repeat(ok, group_size)
