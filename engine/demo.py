"""``fusedrl demo``: the whole RLHF pipeline of the seed documents, end to end, in minutes on a CPU.

    fusedrl demo --out demo-run                     # ~1.5 minutes on 2 CPU cores
    fusedrl demo --quick --out demo-quick           # reduced size, ~30 s (what CI runs)
    fusedrl demo --kl-coef 0.01 --out demo-hacked   # a weak KL leash: the gold reward peaks, then collapses

Stage 1 (SFT) trains a tiny Llama on demonstrations; that policy is the reference pi_ref. Stage 2 samples
pairs of its completions, labels them with a hidden *gold* scorer plus annotator noise and fits a reward
model with the Bradley-Terry loss. Stage 3 runs the engine's PPO against that learned (*proxy*) reward
with a per-token KL penalty to pi_ref. The report plots gold and proxy reward against KL(pi || pi_ref),
the over-optimisation curve of Gao et al. (2022): the proxy is what PPO climbs, the gold is what the
annotators meant, and the two part ways once the policy leaves the region the reward model was fit on.

The task, built in code: a prompt is a short digit string ended by ``:``; a completion is digits then
eos. The hidden gold score is the mean over the completion's digits of d / 9, where a digit that repeats
the one before it (the first is compared with the prompt's last digit) counts 0: the annotators want big
digits but no stutter. Random demonstrations are well formed and score about 0.45: the SFT policy writes
correct-looking, unaligned answers, and only the comparisons tell it what is wanted. The reward model
learns "bigger digits are better" easily; "no repeats" is a relation between neighbouring digits that it
sees rarely (one digit in ten repeats in the SFT samples) and learns poorly. PPO first gains gold reward
by moving to big digits; pushed further (a small KL coefficient, a long run) it collapses onto one digit
-- ``99999`` -- which the proxy loves and the gold scorer does not: reward over-optimisation.

Output directory: ``metrics.jsonl`` (one row per PPO step: the trainer's metrics plus the gold reward
of the same rollouts), ``report.png``, ``summary.json``, ``config.json``, and the checkpoints ``sft/``,
``reward_model/`` and ``ppo/`` (the trainer's own directory: checkpoints, final ``policy/``, ``critic/``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DIGITS = "0123456789"
SEPARATOR = ":"
GOLD_LOG = "gold.jsonl"  # in OUT/ppo: the gold score of every PPO step's rollouts, joined into OUT/metrics.jsonl


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoConfig:
    """Every knob of ``fusedrl demo``; each field is a ``--kebab-case`` flag."""

    out: str = "fusedrl-demo"
    """Output directory (metrics.jsonl, report.png, summary.json, checkpoints)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    seed: int = 0
    """Seed of data, models, sampling and training."""
    threads: int = 1
    """torch CPU threads (0: torch's default). One is best for these tiny models: they gain nothing from
    intra-op threads, and threads competing with other processes for the cores slow them down ~10x."""
    model: str = "tiny-llama"
    """Model preset of the policy and the reward model (fusedrl.engine.models.PRESETS)."""
    progress: bool = True
    """Show a progress bar per stage."""
    # --- the task
    prompt_len_min: int = 3
    """Fewest digits in a prompt."""
    prompt_len_max: int = 6
    """Most digits in a prompt."""
    completion_len_min: int = 3
    """Fewest digits in a well-formed completion."""
    completion_len_max: int = 8
    """Most digits in a well-formed completion (longer ones, and truncated ones, score 0 gold)."""
    # --- stage 1: SFT
    sft_demos: int = 4096
    """Demonstrations (random well-formed completions of random prompts)."""
    sft_steps: int = 250
    """SFT optimizer steps."""
    sft_batch_size: int = 64
    """Demonstrations per SFT step."""
    sft_lr: float = 3e-3
    """SFT peak learning rate."""
    # --- stage 2: reward model
    rm_pairs: int = 3000
    """Preference pairs sampled from the SFT policy to train the reward model on (ties dropped)."""
    rm_eval_pairs: int = 500
    """Held-out pairs for the reward model's pairwise accuracy."""
    flip_rate: float = 0.2
    """Annotator noise: the fraction of comparisons whose label is flipped."""
    rm_epochs: int = 8
    """Reward-model passes over its pairs."""
    rm_lr: float = 2e-3
    """Reward-model peak learning rate."""
    # --- stage 3: PPO
    ppo_steps: int = 120
    """PPO steps."""
    prompts_per_step: int = 16
    """Prompts per PPO step."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt and step."""
    kl_coef: float = 0.1
    """KL coefficient beta of the per-token penalty to the SFT policy (smaller: more over-optimisation)."""
    ppo_lr: float = 3e-4
    """Policy learning rate (the critic uses twice that)."""
    ppo_epochs: int = 2
    """PPO passes over each step's rollouts."""
    save_every: int = 0
    """Checkpoint the PPO stage every this many steps (0: final model only)."""
    resume: bool = False
    """Resume the PPO stage from the latest checkpoint in OUT/ppo (stages 1 and 2 are loaded from OUT)."""
    # --- report
    eval_prompts: int = 256
    """Held-out prompts on which the SFT and the final policy are compared (gold, proxy, KL)."""

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"DemoConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("prompt_len_min", "completion_len_min", "sft_demos", "sft_steps", "sft_batch_size", "rm_pairs",
                     "rm_eval_pairs", "rm_epochs", "ppo_steps", "prompts_per_step", "samples_per_prompt",
                     "ppo_epochs", "eval_prompts"):  # fmt: skip
            need(getattr(self, name) >= 1, name, "an int >= 1")
        for name in ("threads", "save_every", "seed"):
            need(getattr(self, name) >= 0, name, "an int >= 0")
        need(self.prompt_len_max >= self.prompt_len_min, "prompt_len_max", f">= prompt_len_min={self.prompt_len_min}")
        need(self.completion_len_max >= self.completion_len_min, "completion_len_max",
             f">= completion_len_min={self.completion_len_min}")  # fmt: skip
        need(0.0 <= self.flip_rate < 0.5, "flip_rate", "in [0, 0.5) (at 0.5 the labels carry no information)")
        need(self.kl_coef >= 0, "kl_coef", ">= 0")
        for name in ("sft_lr", "rm_lr", "ppo_lr"):
            need(getattr(self, name) > 0, name, "> 0")

    @property
    def max_new_tokens(self) -> int:
        # Room for the longest well-formed completion, its eos and one token more: a policy that learns to
        # ramble runs into the limit visibly (gold 0) instead of being cut exactly at the longest legal length.
        return self.completion_len_max + 2


# The reduced run CI uses (~30 s on 2 idle cores); every flag still overrides it.
QUICK = dict(sft_demos=2048, sft_steps=120, rm_pairs=1200, rm_eval_pairs=300, rm_epochs=6, ppo_steps=30,
             prompts_per_step=16, eval_prompts=128)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The synthetic task and its hidden gold scorer
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitTask:
    """Prompts are digit strings ending in ':'; completions are digit strings; the gold score is hidden."""

    prompt_len: tuple[int, int]
    """(fewest, most) digits in a prompt."""
    completion_len: tuple[int, int]
    """(fewest, most) digits in a well-formed completion."""

    def prompts(self, n: int, rng: random.Random) -> list[str]:
        lo, hi = self.prompt_len
        return ["".join(rng.choices(DIGITS, k=rng.randint(lo, hi))) + SEPARATOR for _ in range(n)]

    def demonstration(self, rng: random.Random) -> str:
        """A well-formed completion with no preference in it: uniform length, uniform digits."""
        lo, hi = self.completion_len
        return "".join(rng.choices(DIGITS, k=rng.randint(lo, hi)))

    def well_formed(self, completion: str) -> bool:
        lo, hi = self.completion_len
        return lo <= len(completion) <= hi and all(c in DIGITS for c in completion)

    def gold(self, prompt: str, completion: str) -> float:
        """Mean over the completion's digits of d / 9, where a digit that repeats the one before it (the first
        is compared with the prompt's last digit) counts 0; 0 if the completion is not well formed."""
        if not self.well_formed(completion):
            return 0.0
        prev = prompt.rstrip(SEPARATOR)[-1:]
        total = 0
        for c in completion:
            total += int(c) if c != prev else 0
            prev = c
        return total / (9 * len(completion))

    def gold_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [self.gold(p, c) for p, c in zip(prompts, completions)]


def task_of(cfg: DemoConfig) -> DigitTask:
    return DigitTask((cfg.prompt_len_min, cfg.prompt_len_max), (cfg.completion_len_min, cfg.completion_len_max))


def label_pairs(
    task: DigitTask,
    prompts: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    *,
    flip_rate: float,
    rng: random.Random,
):
    """Annotate (prompt, first, second) comparisons: the gold-preferred completion wins, except that a
    ``flip_rate`` fraction of labels is flipped. Ties in gold are dropped (the annotator has no preference).

    Returns ``(pairs, clean)``: the noisy ``PreferencePair`` list and the same pairs labelled by gold alone."""
    from .reward_model import PreferencePair

    pairs, clean = [], []
    for p, a, b in zip(prompts, first, second):
        ga, gb = task.gold(p, a), task.gold(p, b)
        if ga == gb:
            continue
        win, lose = (a, b) if ga > gb else (b, a)
        clean.append(PreferencePair(p, win, lose))
        if rng.random() < flip_rate:
            win, lose = lose, win
        pairs.append(PreferencePair(p, win, lose))
    return pairs, clean


# ----------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------------
def sample(policy, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 256):
    """One completion per prompt at temperature 1 (the distribution PPO trains): ``(texts, prompt_ids,
    response_ids)``; a response keeps its eos, a truncated one has none."""
    from .rollout import context_length, encode_prompts, generate_responses

    prompt_ids = encode_prompts(tokenizer, prompts, max_new_tokens=max_new_tokens, context=context_length(policy))
    responses = generate_responses(
        policy, prompt_ids, max_new_tokens=max_new_tokens, temperature=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
    )  # fmt: skip
    return tokenizer.batch_decode(responses, skip_special_tokens=True), prompt_ids, responses


@torch.no_grad()
def response_logprob(
    model, prompt_ids: list[list[int]], responses: list[list[int]], *, pad_token_id: int
) -> torch.Tensor:
    """(B,) float32 log-probability of each whole response given its prompt (sum over its tokens)."""
    from ..kernels import logprobs

    device = next(model.parameters()).device
    rows = [p + r for p, r in zip(prompt_ids, responses)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, rows)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, len(p) : len(r)] = torch.tensor(r[len(p) :])
    was_training = model.training
    model.eval()
    # Right padding keeps every real token at its unpadded position: the same numbers as a packed forward.
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    model.train(was_training)
    lp = logprobs(logits[:, :-1], labels[:, 1:].to(device), ignore_index=-100)  # (B, T-1), 0 off the response
    return lp.sum(1).float().cpu()


def evaluate(
    policy, ref_policy, reward_model, tokenizer, task: DigitTask, prompts: Sequence[str], *, max_new_tokens: int
) -> dict:
    """Gold and proxy reward of fresh samples of ``policy`` on ``prompts``, and KL(policy || ref) per
    sequence (the mean of log pi(y|x) - log pi_ref(y|x) over those samples: the k1 estimate)."""
    from .reward_model import score_sequences

    texts, prompt_ids, responses = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens)
    gold = torch.tensor(task.gold_scores(prompts, texts))
    proxy = score_sequences(reward_model, tokenizer, prompts, texts)
    kl = response_logprob(policy, prompt_ids, responses, pad_token_id=tokenizer.pad_token_id) - response_logprob(
        ref_policy, prompt_ids, responses, pad_token_id=tokenizer.pad_token_id
    )
    return {
        "gold": gold.mean().item(),
        "proxy": proxy.mean().item(),
        "kl": kl.mean().item(),
        "well_formed": sum(task.well_formed(t) for t in texts) / len(texts),
        "length": sum(len(t) for t in texts) / len(texts),
        "examples": [p + t for p, t in zip(prompts[:6], texts[:6])],
    }


class ProxyReward:
    """The reward PPO optimises: the learned reward model's score of prompt + completion + eos.

    It also scores the same completions with the hidden gold scorer and appends one row per call (one
    call per PPO step) to ``log_path``; the policy never sees those numbers, the report does."""

    def __init__(self, reward_model, tokenizer, task: DigitTask, log_path: Path, step_of=lambda: 0):
        self.reward_model, self.tokenizer, self.task = reward_model, tokenizer, task
        self.log_path = Path(log_path)
        self.step_of = step_of  # the PPO step these rollouts belong to, asked at call time

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        from .reward_model import score_sequences

        proxy = score_sequences(self.reward_model, self.tokenizer, prompts, completions)
        gold = self.task.gold_scores(prompts, completions)
        row = {
            "step": int(self.step_of()),
            "gold/reward_mean": sum(gold) / len(gold),
            "gold/well_formed_frac": sum(self.task.well_formed(c) for c in completions) / len(completions),
            "proxy/reward_mean": proxy.mean().item(),
        }
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return proxy.tolist()


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------
def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was asked for but CUDA is not available (use --device cpu or auto)")
    return dev


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stage_sft(cfg: DemoConfig, task: DigitTask, tokenizer, rng: random.Random, device: torch.device, out: Path):
    """Stage 1: next-token SFT on random well-formed demonstrations; the result is the reference policy.
    Saved to ``out/sft``. Returns ``(policy, mean loss of the last 10 steps)``."""
    from .models import build_causal_lm
    from .sft import SFTConfig, train_sft

    policy = build_causal_lm(cfg.model, vocab_size=len(tokenizer), seed=cfg.seed, pad_token_id=tokenizer.pad_token_id)
    policy.to(device)
    prompts = task.prompts(cfg.sft_demos, rng)
    demos = [task.demonstration(rng) for _ in prompts]
    sft_cfg = SFTConfig(steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=cfg.seed)
    losses = train_sft(policy, tokenizer, prompts, demos, sft_cfg, progress=cfg.progress)
    policy.save_pretrained(out / "sft")
    tokenizer.save_pretrained(out / "sft")
    return policy, sum(losses[-10:]) / len(losses[-10:])


def stage_reward_model(cfg: DemoConfig, task: DigitTask, tokenizer, policy, rng: random.Random, device, out: Path):
    """Stage 2: pairs of SFT samples, labelled by the gold scorer with annotator noise, fit with the
    Bradley-Terry loss. Saved to ``out/reward_model``. Returns ``(reward_model, results)``."""
    from .models import build_reward_model
    from .reward_model import RewardModelConfig, pairwise_accuracy, train_reward_model

    n_train, n_eval = cfg.rm_pairs, cfg.rm_eval_pairs
    noisy, clean = [], []
    while len(noisy) < n_train + n_eval:  # ties in gold are dropped: draw until there are enough pairs
        prompts = task.prompts(n_train + n_eval - len(noisy) + 64, rng)
        first, _, _ = sample(policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
        second, _, _ = sample(policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens)
        more_noisy, more_clean = label_pairs(task, prompts, first, second, flip_rate=cfg.flip_rate, rng=rng)
        if not more_noisy:
            raise RuntimeError(f"all {len(prompts)} sampled comparisons tie in gold: the SFT policy is degenerate "
                               "(raise --sft-steps or check --sft-lr)")  # fmt: skip
        noisy, clean = noisy + more_noisy, clean + more_clean
    train = noisy[:n_train]
    held_out_noisy, held_out_clean = noisy[n_train : n_train + n_eval], clean[n_train : n_train + n_eval]

    reward_model = build_reward_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.seed + 1,
                                      pad_token_id=tokenizer.pad_token_id).to(device)  # fmt: skip
    rm_cfg = RewardModelConfig(epochs=cfg.rm_epochs, lr=cfg.rm_lr, seed=cfg.seed)
    losses = train_reward_model(reward_model, train, tokenizer=tokenizer, config=rm_cfg, progress=cfg.progress)
    reward_model.save_pretrained(out / "reward_model")
    tokenizer.save_pretrained(out / "reward_model")
    results = {
        "rm_loss_final": sum(losses[-10:]) / len(losses[-10:]),
        # Against the gold preference: what the annotators meant, which the reward model never saw.
        "rm_accuracy": pairwise_accuracy(reward_model, held_out_clean, tokenizer=tokenizer),
        "rm_accuracy_noisy_labels": pairwise_accuracy(reward_model, held_out_noisy, tokenizer=tokenizer),
        "rm_train_accuracy": pairwise_accuracy(reward_model, train, tokenizer=tokenizer),
        "rm_pairs": len(train),
    }
    _log(f"reward model: held-out pairwise accuracy {results['rm_accuracy']:.3f} against the gold preference "
         f"({results['rm_accuracy_noisy_labels']:.3f} against the noisy labels; chance is 0.5)")  # fmt: skip
    return reward_model, results


def stage_ppo(cfg: DemoConfig, task: DigitTask, tokenizer, policy, ref_policy, reward_model, out: Path):
    """Stage 3: the engine's PPO (critic, GAE, per-token KL penalty in the reward) against the learned
    reward, in ``out/ppo``. Returns the trained policy; the gold scores of its rollouts are in
    ``out/ppo/gold.jsonl``."""
    from .trainer import PPOConfig, PPOTrainer

    ppo_dir = out / "ppo"
    ppo_dir.mkdir(parents=True, exist_ok=True)
    gold_log = ppo_dir / GOLD_LOG
    if not cfg.resume:
        gold_log.write_text("")
    ppo_cfg = PPOConfig(
        prompts_per_step=cfg.prompts_per_step, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, advantage_estimator="gae", kl_coef=cfg.kl_coef,
        learning_rate=cfg.ppo_lr, critic_learning_rate=2 * cfg.ppo_lr, ppo_epochs=cfg.ppo_epochs,
        total_steps=cfg.ppo_steps, seed=cfg.seed, output_dir=str(ppo_dir), save_every=cfg.save_every,
        progress=cfg.progress,
    )  # fmt: skip
    proxy = ProxyReward(reward_model, tokenizer, task, gold_log)
    trainer = PPOTrainer(policy, tokenizer, proxy, ppo_cfg, ref_policy=ref_policy)
    proxy.step_of = lambda: trainer.global_step + 1  # the trainer counts a step once it is done
    # A generator of its own: a resumed run (which skips stages 1-2) trains on the same prompts.
    prompts = task.prompts(max(4096, cfg.prompts_per_step), random.Random(cfg.seed + 2))
    trainer.train(prompts, resume=cfg.resume)
    return trainer.policy


def run(cfg: DemoConfig, *, quick: bool = False) -> dict:
    """Run the three stages and the report; returns the summary (also written to ``cfg.out/summary.json``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from .tokenizer import build_char_tokenizer

    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # one bar per stage: not one per checkpoint shard saved or loaded
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "quick": quick}, indent=2) + "\n")
    task = task_of(cfg)
    tokenizer = build_char_tokenizer(DIGITS + SEPARATOR)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    timings = {}

    stages_path = out / "stages.json"
    if cfg.resume:
        # Stages 1 and 2 are deterministic given the config, but redoing them costs a minute: reuse them.
        if not stages_path.is_file():
            raise FileNotFoundError(f"--resume: {stages_path} does not exist (run the demo once without --resume)")
        stages = json.loads(stages_path.read_text())
        policy = AutoModelForCausalLM.from_pretrained(out / "sft", local_files_only=True).to(device)
        reward_model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model", local_files_only=True)
        reward_model.to(device)
        _log(f"resume: loaded the SFT policy and the reward model from {out}")
    else:
        t0 = time.perf_counter()
        policy, sft_loss = stage_sft(cfg, task, tokenizer, rng, device, out)
        timings["sft_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reward_model, stages = stage_reward_model(cfg, task, tokenizer, policy, rng, device, out)
        timings["reward_model_s"] = time.perf_counter() - t0
        stages["sft_loss_final"] = sft_loss
        stages_path.write_text(json.dumps(stages, indent=2) + "\n")

    # The SFT policy and the final one are compared on the same held-out prompts.
    eval_prompts = task.prompts(cfg.eval_prompts, random.Random(cfg.seed + 1))
    ref_policy = AutoModelForCausalLM.from_pretrained(out / "sft", local_files_only=True).to(device)
    models = (ref_policy, reward_model, tokenizer, task, eval_prompts)
    sft_eval = evaluate(policy, *models, max_new_tokens=cfg.max_new_tokens)
    _log(f"stage 3/3 PPO: {cfg.ppo_steps} steps of {cfg.prompts_per_step} x {cfg.samples_per_prompt} rollouts, "
         f"beta = {cfg.kl_coef:g}; the SFT policy's gold reward on held-out prompts is {sft_eval['gold']:.3f}")
    t0 = time.perf_counter()
    policy = stage_ppo(cfg, task, tokenizer, policy, ref_policy, reward_model, out)
    timings["ppo_s"] = time.perf_counter() - t0
    final_eval = evaluate(policy, *models, max_new_tokens=cfg.max_new_tokens)

    rows = merge_metrics(out / "ppo" / "metrics.jsonl", out / "ppo" / GOLD_LOG, out / "metrics.jsonl")
    timings["total_s"] = time.perf_counter() - t_start
    summary = make_summary(cfg, stages, sft_eval, final_eval, rows, timings)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_report(rows, sft_eval, final_eval, out / "report.png", kl_coef=cfg.kl_coef)
    print(format_summary(summary, rows))
    return summary


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
def merge_metrics(trainer_metrics: Path, gold_log: Path, out_path: Path) -> list[dict]:
    """The trainer's rows with the gold rows of the same steps joined in (a step logged twice, by a run
    that crashed after it and the resumed run, keeps its last row); written to ``out_path`` as JSONL."""
    from .metrics import read_metrics

    gold = {r["step"]: r for r in read_metrics(gold_log)}
    by_step = {r["step"]: r for r in read_metrics(trainer_metrics)}
    rows = []
    for step in sorted(by_step):
        row = dict(by_step[step])
        row.update({k: v for k, v in gold.get(step, {}).items() if k != "step"})
        rows.append(row)
    out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_summary(
    cfg: DemoConfig, stages: dict, sft_eval: dict, final_eval: dict, rows: list[dict], timings: dict
) -> dict:
    """summary.json: the stage results, SFT vs final policy on held-out prompts, and where the gold peaked."""
    window = 5  # rollout means of one step are noisy: peaks are read off a moving average
    gold = _smooth([r.get("gold/reward_mean", math.nan) for r in rows], window)
    proxy = _smooth([r.get("rollout/reward_mean", math.nan) for r in rows], window)
    peak = max(range(len(rows)), key=lambda i: gold[i]) if rows else None
    return {
        "rm_accuracy": stages["rm_accuracy"],
        "rm_accuracy_noisy_labels": stages["rm_accuracy_noisy_labels"],
        "rm_train_accuracy": stages["rm_train_accuracy"],
        "gold_reward_sft": sft_eval["gold"],
        "proxy_reward_sft": sft_eval["proxy"],
        "gold_reward_final": final_eval["gold"],
        "proxy_reward_final": final_eval["proxy"],
        "kl_final": final_eval["kl"],
        "well_formed_sft": sft_eval["well_formed"],
        "well_formed_final": final_eval["well_formed"],
        "completion_len_sft": sft_eval["length"],
        "completion_len_final": final_eval["length"],
        "gold_reward_peak": gold[peak] if rows else None,
        "gold_reward_peak_step": rows[peak]["step"] if rows else None,
        "kl_at_gold_peak": rows[peak].get("objective/kl") if rows else None,
        "gold_reward_last": gold[-1] if rows else None,
        "proxy_reward_at_gold_peak": proxy[peak] if rows else None,
        "proxy_reward_last": proxy[-1] if rows else None,
        "sft_loss_final": stages["sft_loss_final"],
        "rm_loss_final": stages["rm_loss_final"],
        "ppo_steps": len(rows),
        "kl_coef": cfg.kl_coef,
        "flip_rate": cfg.flip_rate,
        "examples_sft": sft_eval["examples"],
        "examples_final": final_eval["examples"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "device": str(_device(cfg.device)),
    }


def _smooth(xs: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (per-step rollout means are noisy)."""
    out, acc = [], []
    for x in xs:
        acc.append(x)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def _kl_bins(kl: list[float], *series: list[float], n_bins: int) -> tuple[list[float], ...]:
    """Means of ``kl`` and of each series over ``n_bins`` equal-count bins of the steps sorted by KL."""
    order = sorted((i for i in range(len(kl)) if kl[i] == kl[i]), key=lambda i: kl[i])
    bins = [order[len(order) * b // n_bins : len(order) * (b + 1) // n_bins] for b in range(n_bins)]
    bins = [b for b in bins if b]
    mean = lambda xs, b: sum(xs[i] for i in b) / len(b)  # noqa: E731
    return tuple([mean(xs, b) for b in bins] for xs in (kl, *series))


def plot_report(rows: list[dict], sft_eval: dict, final_eval: dict, path: Path, *, kl_coef: float) -> None:
    """report.png: gold and proxy reward against KL to the SFT policy (the over-optimisation curve), both
    rewards against the PPO step, and the KL against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    kl = [r.get("objective/kl", math.nan) for r in rows]
    gold = [r.get("gold/reward_mean", math.nan) for r in rows]
    proxy = [r.get("rollout/reward_mean", math.nan) for r in rows]
    w = max(1, len(rows) // 20)
    fig, (ax, ax_t, ax_k) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.4, 1, 0.8]})

    # KL does not grow monotonically step by step: average the steps in KL bins for the curve, starting
    # from the SFT policy at KL 0, and show every step as a faint point.
    kl_b, gold_b, proxy_b = _kl_bins(kl, gold, proxy, n_bins=min(15, max(1, len(rows) // 4)))
    kl_b, gold_b, proxy_b = [0.0] + kl_b, [sft_eval["gold"]] + gold_b, [sft_eval["proxy"]] + proxy_b
    ax.scatter(kl, gold, s=8, color="tab:green", alpha=0.25)
    ax.plot(kl_b, gold_b, "-o", ms=3, color="tab:green", label="gold (hidden scorer)")
    ax.scatter([final_eval["kl"]], [final_eval["gold"]], marker="*", s=150, color="tab:green", zorder=3,
               label="final policy, held-out prompts")  # fmt: skip
    ax.axhline(sft_eval["gold"], color="tab:green", ls=":", lw=1)
    ax.set_xlabel("KL(policy || SFT reference) per sequence [nats]")
    ax.set_ylabel("gold reward", color="tab:green")
    ax2 = ax.twinx()
    ax2.scatter(kl, proxy, s=8, color="tab:blue", alpha=0.25)
    ax2.plot(kl_b, proxy_b, "-o", ms=3, color="tab:blue", label="proxy (learned reward model)")
    ax2.scatter([final_eval["kl"]], [final_eval["proxy"]], marker="*", s=150, color="tab:blue", zorder=3)
    ax2.set_ylabel("proxy reward (reward-model units)", color="tab:blue")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3,
              fontsize=8)  # fmt: skip
    ax.set_title(f"Gold and proxy reward vs KL (beta = {kl_coef:g}; dotted: SFT gold)")

    ax_t.plot(steps, _smooth(gold, w), color="tab:green", label="gold")
    ax_t.axhline(sft_eval["gold"], color="tab:green", ls=":", lw=1)
    ax_t.set_xlabel("PPO step")
    ax_t.set_ylabel("gold reward", color="tab:green")
    ax_t2 = ax_t.twinx()
    ax_t2.plot(steps, _smooth(proxy, w), color="tab:blue", label="proxy")
    ax_t2.set_ylabel("proxy reward", color="tab:blue")
    lines = ax_t.get_legend_handles_labels()
    lines2 = ax_t2.get_legend_handles_labels()
    ax_t.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
                fontsize=8)  # fmt: skip
    ax_t.set_title(f"Rollout rewards per step (moving average of {w})")

    ax_k.plot(steps, kl, color="tab:red", lw=1)
    ax_k.set_xlabel("PPO step")
    ax_k.set_ylabel("KL per sequence [nats]")
    ax_k.set_title("KL to the SFT reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(summary: dict, rows: list[dict], *, n_rows: int = 10) -> str:
    """The console table: the per-stage results, then gold / proxy / KL at evenly spaced PPO steps."""
    lines = [
        "",
        "fusedrl demo: SFT -> reward model -> PPO",
        f"  reward model held-out accuracy   {summary['rm_accuracy']:.3f}  (vs the gold preference; chance 0.5)",
        f"  {'':32} {'gold':>8} {'proxy':>8} {'KL':>8} {'well-formed':>12}",
        f"  {'SFT policy (reference)':32} {summary['gold_reward_sft']:8.3f} {summary['proxy_reward_sft']:8.3f} "
        f"{0.0:8.3f} {summary['well_formed_sft']:12.2f}",
        f"  {'PPO policy (final)':32} {summary['gold_reward_final']:8.3f} {summary['proxy_reward_final']:8.3f} "
        f"{summary['kl_final']:8.3f} {summary['well_formed_final']:12.2f}",
        "",
        f"  {'step':>6} {'gold':>8} {'proxy':>8} {'KL':>8}   (rollout means)",
    ]
    picks = sorted({round(i * (len(rows) - 1) / max(1, n_rows - 1)) for i in range(n_rows)}) if rows else []
    for i in picks:
        r = rows[i]
        gold, proxy, kl = (r.get(k, math.nan) for k in ("gold/reward_mean", "rollout/reward_mean", "objective/kl"))
        lines.append(f"  {r['step']:6d} {gold:8.3f} {proxy:8.3f} {kl:8.3f}")
    lines.append("")
    if rows and summary["gold_reward_peak"] - summary["gold_reward_last"] > 0.05 and (
        summary["proxy_reward_last"] >= summary["proxy_reward_at_gold_peak"]
    ):
        lines.append(f"  over-optimisation: the gold reward peaked at {summary['gold_reward_peak']:.3f} (step "
                     f"{summary['gold_reward_peak_step']}, KL {summary['kl_at_gold_peak']:.2f}) and fell to "
                     f"{summary['gold_reward_last']:.3f} while the proxy kept rising")  # fmt: skip
    else:
        lines.append(f"  no over-optimisation at beta = {summary['kl_coef']:g}: try --kl-coef 0.01 (a weaker KL leash)")
    lines.append(f"  samples before: {', '.join(summary['examples_sft'][:4])}")
    lines.append(f"  samples after:  {', '.join(summary['examples_final'][:4])}")
    t = summary["timings_s"]
    lines.append(f"  time: {t.get('total_s', math.nan):.0f} s on {summary['device']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> tuple[DemoConfig, bool]:
    from .cli import add_dataclass_arguments

    parser = argparse.ArgumentParser(
        prog="fusedrl demo",
        description="RLHF end to end on a synthetic task: SFT -> Bradley-Terry reward model -> PPO, then the "
        "over-optimisation report (gold vs proxy reward against KL).",
    )
    parser.add_argument("--quick", action="store_true", help=f"reduced size for CI (~30 s on 2 cores): {QUICK}")
    add_dataclass_arguments(parser, DemoConfig, "demo settings")
    ns = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    quick = ns.pop("quick")
    try:
        cfg = DemoConfig(**{**(QUICK if quick else {}), **ns})
    except ValueError as e:
        parser.error(str(e))
    return cfg, quick


def main(argv: Sequence[str] | None = None) -> int:
    cfg, quick = parse_args(argv)
    run(cfg, quick=quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
