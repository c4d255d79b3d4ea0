"""``fusedrl demo``: the whole RLHF pipeline of the seed documents, end to end, in minutes on a CPU.

    fusedrl demo --out demo-run                     # ~1.5 minutes on 2 CPU cores
    fusedrl demo --quick --out demo-quick           # reduced size, ~30 s (what CI runs)
    fusedrl demo --kl-coef 0.01 --out demo-hacked   # a weak KL leash: the gold reward peaks, then collapses
    fusedrl demo --compare --out demo-compare       # + GRPO and DPO on the same task: one table, compare.png

Stage 1 (SFT) trains a tiny Llama on demonstrations; that policy is the reference pi_ref. Stage 2 samples
pairs of its completions, labels them with a hidden *gold* scorer plus annotator noise and fits a reward
model with the Bradley-Terry loss. Stage 3 runs the engine's PPO against that learned (*proxy*) reward
with a per-token KL penalty to pi_ref. The report plots gold and proxy reward against KL(pi || pi_ref), the
axes of the over-optimisation curve of Gao et al. (2022): the proxy is what PPO climbs, the gold is what the
annotators meant. At the default beta = 0.1 the run stays where the two rise together -- the plot shows
the gold reward gained at the KL spent, and no over-optimisation (the report says so); a weak KL leash
(``--kl-coef 0.01``) or a long run is what takes the policy out of the region the reward model was fit on,
where the two part ways.

``--compare`` adds two more policies trained from the same SFT reference on the same task: GRPO against the
same reward model (group-normalised advantages, the KL in the loss, no critic) and DPO directly on the
preference pairs the reward model was fit on (no reward model, no sampling), and reports each policy's
gold reward, proxy reward, KL to the reference and wall time in one table (``compare.json``) and one plot
(``compare.png``).

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
of the same rollouts), ``report.png``, ``summary.json``, ``config.json``, ``pairs.jsonl`` (the reward model's
training pairs in ``fusedrl dpo``'s format), and the checkpoints ``sft/``, ``reward_model/`` and ``ppo/``
(the trainer's own directory: checkpoints, final ``policy/``, ``critic/``, ``completions.jsonl`` with
``--log-completions``); with ``--compare`` also ``grpo/``, ``dpo/``, ``compare.json`` and ``compare.png``.
``fusedrl report OUT`` plots the run (gold reward included), ``fusedrl report OUT/ppo`` shows its completions too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import prepare_run_dir
from .demo_report import (
    format_compare,
    format_summary,
    make_compare,
    make_summary,
    merge_metrics,
    overoptimised,
    plot_compare,
    plot_report,
)
from .demo_task import DIGITS, SEPARATOR, DigitTask, ProxyReward, evaluate, label_pairs, sample
from .distributed import resolve_device
from .trackers import parse_report_to

# What a demo run writes into OUT besides a training run's own files: removed by --overwrite, never anything else.
RUN_FILES = ("config.json", "stages.json", "sft", "reward_model", "ppo", "summary.json", "report.png", "pairs.jsonl",
             "grpo", "dpo", "compare.json", "compare.png")  # fmt: skip
GOLD_LOG = "gold.jsonl"  # in OUT/ppo: the gold score of every PPO step's rollouts, joined into OUT/metrics.jsonl
PAIRS_FILE = "pairs.jsonl"  # in OUT: the reward model's training pairs, {prompt, chosen, rejected} per line


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
    report_to: str = "none"
    """Experiment trackers of the PPO stage (its config once, every metrics row, the completions tables): none, or a comma-separated list of tensorboard, wandb, trackio, mlflow."""
    log_every: int = 0
    """Where stderr is not a terminal, print a one-line PPO step summary every this many steps instead of the progress bar (0 = off)."""
    log_completions: int = 0
    """Every this many PPO steps write a sample of rollouts to OUT/ppo/completions.jsonl and the trackers' tables (0 = off)."""
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
    overwrite: bool = False
    """Start over in an OUT that holds a demo run (its files there are deleted first)."""
    # --- report
    eval_prompts: int = 256
    """Held-out prompts on which the SFT and the final policy are compared (gold, proxy, KL)."""
    # --- --compare: GRPO and DPO beside PPO
    compare: bool = False
    """Also train GRPO against the reward model and DPO on its preference pairs; write compare.json and compare.png."""
    dpo_beta: float = 0.3
    """DPO's beta (the implicit-reward scale) in --compare."""
    dpo_lr: float = 3e-4
    """DPO's learning rate in --compare (1e-3 gains less gold and loses well-formedness on the default run)."""
    dpo_epochs: int = 2
    """DPO's passes over the reward model's training pairs in --compare."""

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"DemoConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("prompt_len_min", "completion_len_min", "sft_demos", "sft_steps", "sft_batch_size", "rm_pairs",
                     "rm_eval_pairs", "rm_epochs", "ppo_steps", "prompts_per_step", "samples_per_prompt",
                     "ppo_epochs", "eval_prompts"):  # fmt: skip
            need(getattr(self, name) >= 1, name, "an int >= 1")
        for name in ("threads", "save_every", "seed", "log_every", "log_completions"):
            need(getattr(self, name) >= 0, name, "an int >= 0")
        need(self.prompt_len_max >= self.prompt_len_min, "prompt_len_max", f">= prompt_len_min={self.prompt_len_min}")
        need(self.completion_len_max >= self.completion_len_min, "completion_len_max",
             f">= completion_len_min={self.completion_len_min}")  # fmt: skip
        need(0.0 <= self.flip_rate < 0.5, "flip_rate", "in [0, 0.5) (at 0.5 the labels carry no information)")
        need(self.kl_coef >= 0, "kl_coef", ">= 0")
        need(not (self.resume and self.overwrite), "overwrite", "False with resume=True (they exclude each other)")
        need(not (self.resume and self.compare), "compare", "False with resume=True (--compare runs every stage fresh)")
        need(self.dpo_epochs >= 1, "dpo_epochs", "an int >= 1")
        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            raise ValueError(f"DemoConfig.{e}") from None
        for name in ("sft_lr", "rm_lr", "ppo_lr", "dpo_beta", "dpo_lr"):
            need(getattr(self, name) > 0, name, "> 0")

    @property
    def max_new_tokens(self) -> int:
        # Room for the longest well-formed completion, its eos and one token more: a policy that learns to
        # ramble runs into the limit visibly (gold 0) instead of being cut exactly at the longest legal length.
        return self.completion_len_max + 2


# The reduced run CI uses (~30 s on 2 idle cores); every flag still overrides it.
QUICK = dict(sft_demos=2048, sft_steps=120, rm_pairs=1200, rm_eval_pairs=300, rm_epochs=6, ppo_steps=30,
             prompts_per_step=16, eval_prompts=128)  # fmt: skip


def task_of(cfg: DemoConfig) -> DigitTask:
    return DigitTask((cfg.prompt_len_min, cfg.prompt_len_max), (cfg.completion_len_min, cfg.completion_len_max))


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------
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
    # The same pairs in fusedrl dpo's format. A completion that is eos alone (the SFT policy stops at once now
    # and then) is an empty response there, which fusedrl dpo refuses: those few pairs are left out.
    (out / PAIRS_FILE).write_text("".join(
        json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
        for p in train if p.chosen and p.rejected))  # fmt: skip
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


def stage_ppo(cfg: DemoConfig, task: DigitTask, tokenizer, policy, ref_policy, reward_model, out: Path, *,
              estimator: str = "gae", name: str = "ppo"):  # fmt: skip
    """Stage 3: the engine's PPO (critic, GAE, per-token KL penalty in the reward; or ``estimator="grpo"``:
    group-normalised advantages, the KL in the loss) against the learned reward, in ``out/<name>``. Returns
    the trained policy; the gold scores of its rollouts are in ``out/<name>/gold.jsonl``."""
    from .checkpoint import find_latest
    from .trainer import PPOConfig, PPOTrainer

    ppo_dir = out / name
    ppo_dir.mkdir(parents=True, exist_ok=True)
    gold_log = ppo_dir / GOLD_LOG
    if not cfg.resume or find_latest(ppo_dir) is None:  # a PPO stage without a checkpoint starts over
        gold_log.write_text("")
    ppo_cfg = PPOConfig(
        prompts_per_step=cfg.prompts_per_step, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, advantage_estimator=estimator, kl_coef=cfg.kl_coef,
        learning_rate=cfg.ppo_lr, critic_learning_rate=2 * cfg.ppo_lr, ppo_epochs=cfg.ppo_epochs,
        total_steps=cfg.ppo_steps, seed=cfg.seed, output_dir=str(ppo_dir), save_every=cfg.save_every,
        progress=cfg.progress, report_to=cfg.report_to, log_every=cfg.log_every, log_completions=cfg.log_completions,
    )  # fmt: skip
    proxy = ProxyReward(reward_model, tokenizer, task, gold_log)
    trainer = PPOTrainer(policy, tokenizer, proxy, ppo_cfg, ref_policy=ref_policy)
    proxy.step_of = lambda: trainer.global_step + 1  # the trainer counts a step once it is done
    # A generator of its own: a resumed run (which skips stages 1-2) trains on the same prompts.
    prompts = task.prompts(max(4096, cfg.prompts_per_step), random.Random(cfg.seed + 2))
    trainer.train(prompts, resume=cfg.resume)
    return trainer.policy


def stage_dpo(cfg: DemoConfig, tokenizer, out: Path, device):
    """--compare: DPO from the SFT policy directly on the reward model's training pairs (``out/pairs.jsonl``),
    in ``out/dpo``, through ``fusedrl.engine.dpo``. Returns ``(policy, pairs used)``."""
    from transformers import AutoModelForCausalLM

    from .dpo import DPOConfig, load_pairs, train_dpo

    dpo_cfg = DPOConfig(policy=str(out / "sft"), data=str(out / PAIRS_FILE), loss_type="dpo", beta=cfg.dpo_beta,
                        epochs=cfg.dpo_epochs, pairs_per_step=32, learning_rate=cfg.dpo_lr, seed=cfg.seed,
                        output_dir=str(out / "dpo"), progress=cfg.progress)  # fmt: skip
    policy = AutoModelForCausalLM.from_pretrained(out / "sft", local_files_only=True).to(device)
    pairs = load_pairs(out / PAIRS_FILE, tokenizer, max_pair_tokens=dpo_cfg.max_tokens_per_microbatch)
    train_dpo(policy, tokenizer, pairs, dpo_cfg)
    return policy, len(pairs)


def run(cfg: DemoConfig, *, quick: bool = False) -> dict:
    """Run the three stages and the report; returns the summary (also written to ``cfg.out/summary.json``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from .tokenizer import build_char_tokenizer

    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # one bar per stage: not one per checkpoint shard saved or loaded
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    # Checked before anything is written: a refused or failed run leaves OUT as it was.
    if cfg.resume:
        if not (out / "stages.json").is_file():
            raise FileNotFoundError(
                f"--resume: {out / 'stages.json'} does not exist (run the demo once without --resume)"
            )
    else:
        prepare_run_dir(out, resume=False, overwrite=cfg.overwrite, extra_files=RUN_FILES)
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
    _log(
        f"stage 3/3 PPO: {cfg.ppo_steps} steps of {cfg.prompts_per_step} x {cfg.samples_per_prompt} rollouts, "
        f"beta = {cfg.kl_coef:g}; the SFT policy's gold reward on held-out prompts is {sft_eval['gold']:.3f}"
    )
    t0 = time.perf_counter()
    policy = stage_ppo(cfg, task, tokenizer, policy, ref_policy, reward_model, out)
    timings["ppo_s"] = time.perf_counter() - t0
    final_eval = evaluate(policy, *models, max_new_tokens=cfg.max_new_tokens)

    rows = merge_metrics(out / "ppo" / "metrics.jsonl", out / "ppo" / GOLD_LOG, out / "metrics.jsonl")
    timings["total_s"] = time.perf_counter() - t_start
    summary = make_summary(cfg, stages, sft_eval, final_eval, rows, timings)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_report(rows, sft_eval, final_eval, out / "report.png", kl_coef=cfg.kl_coef,
                overoptimised=overoptimised(summary))  # fmt: skip
    print(format_summary(summary, rows))
    if cfg.compare:
        compare = {"sft": dict(sft_eval, wall_s=0.0), "ppo": dict(final_eval, wall_s=timings["ppo_s"])}
        del policy
        t0 = time.perf_counter()
        _log(f"compare: GRPO, {cfg.ppo_steps} steps against the same reward model")
        grpo = AutoModelForCausalLM.from_pretrained(out / "sft", local_files_only=True).to(device)
        grpo = stage_ppo(cfg, task, tokenizer, grpo, ref_policy, reward_model, out, estimator="grpo", name="grpo")
        compare["grpo"] = dict(evaluate(grpo, *models, max_new_tokens=cfg.max_new_tokens),
                               wall_s=time.perf_counter() - t0)  # fmt: skip
        del grpo
        t0 = time.perf_counter()
        _log(f"compare: DPO, {cfg.dpo_epochs} epochs on the reward model's training pairs")
        dpo_policy, n_pairs = stage_dpo(cfg, tokenizer, out, device)
        compare["dpo"] = dict(evaluate(dpo_policy, *models, max_new_tokens=cfg.max_new_tokens),
                              wall_s=time.perf_counter() - t0, pairs=n_pairs)  # fmt: skip
        gold_logs = {k: out / k / GOLD_LOG for k in ("ppo", "grpo")}
        result = make_compare(cfg, compare, gold_logs)
        (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_compare(result, out / "compare.png")
        print(format_compare(result))
        summary["compare"] = result
    _log(f"outputs in {out.resolve()}: summary.json, metrics.jsonl, report.png" + (", compare.json, compare.png" if cfg.compare
                                                                         else ""))  # fmt: skip
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> tuple[DemoConfig, bool]:
    from .config import add_dataclass_arguments

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
    from .trackers import check_installed

    try:
        check_installed(parse_report_to(cfg.report_to))
    except ImportError as e:
        raise SystemExit(f"fusedrl demo: {e}") from None
    return cfg, quick


def main(argv: Sequence[str] | None = None) -> int:
    cfg, quick = parse_args(argv)
    run(cfg, quick=quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
