"""The ``fusedrl`` command line.

    fusedrl train --prompts prompts.jsonl --reward-fn count_token --reward-kwargs '{"token": "a"}' \\
                  --advantage-estimator grpo --total-steps 50 --output-dir runs/a
    fusedrl train --policy Qwen/Qwen2.5-0.5B-Instruct --lora-r 16 --prompts gsm8k.jsonl \\
                  --reward-fn math_answer --advantage-estimator grpo   # chat prompts, the "answer" column
    fusedrl train --config run.yaml --kl-coef 0.02          # flags override the YAML file
    fusedrl train --config run.yaml --resume                 # continue from output_dir's latest checkpoint
    fusedrl demo ...                                         # fusedrl.engine.demo

Also runs as ``python -m fusedrl.engine.cli train ...`` (the form torchrun launches). The ``train`` flags
are generated from two dataclasses: ``TrainArgs`` below (models, data, reward, device) and
``PPOConfig`` (the trainer); each field becomes ``--kebab-case-name`` with the field's type, default
and one-line docstring as help. A YAML file given with ``--config`` may set any of those fields
(snake_case or kebab-case keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Nothing here imports torch at module level: `fusedrl --help` and `fusedrl --version` answer at once.


@dataclass
class TrainArgs:
    """What ``fusedrl train`` needs besides the trainer's PPOConfig."""

    prompts: str | None = None
    """Prompts: a .jsonl/.json/.parquet/.csv/.txt file, a datasets directory (save_to_disk) or a Hub data set name. A row's prompt is a string or a list of chat messages (rendered with the tokenizer's chat template); its other columns reach reward_fn as keyword arguments (e.g. answer=)."""
    prompt_field: str | None = None
    """Column holding the prompt (default: the first of prompt, question, text)."""
    dataset_split: str = "train"
    """Split of a datasets directory or Hub data set."""
    dataset_config: str | None = None
    """Configuration (subset) of a Hub data set, e.g. main for openai/gsm8k."""
    policy: str = "tiny-llama"
    """Policy: a preset name (see fusedrl.engine.models.PRESETS), a local HF model directory or a Hub id such as Qwen/Qwen2.5-0.5B-Instruct (downloaded into the Hub cache once; HF_HUB_OFFLINE=1 uses the cache only)."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub id; default: the policy's, or the built-in character tokenizer for a preset."""
    reward_model: str | None = None
    """Reward model: a preset name, a local HF sequence-classification directory or a Hub id (exclusive with reward_fn)."""
    reward_fn: str | None = None
    """Rule-based reward: a built-in (math_answer, format_reward, length_penalty, count_token, target_length, echo_prompt), module:function or file.py:function."""
    reward_kwargs: str = "{}"
    """Keyword arguments bound to reward_fn, as a JSON object, e.g. '{"token": "a"}' or '{"pattern": "#### [0-9]+"}'."""
    environment: str | None = None
    """Multi-turn episodes against an environment class, module:Class or file.py:Class (TRL's environment_factory contract: reset(**row), tools as public methods, optional get_reward; or a text environment with step(completion)); each row reaches reset() with all its columns; reward_fn / reward_model become optional when it defines get_reward."""
    lora_r: int = 0
    """LoRA rank (0: train all weights). Needs peft (pip install 'fusedrl[lora]'); the reference policy is then the base model with the adapter disabled (no second copy of the weights), and policy/ holds the adapter."""
    lora_alpha: float | None = None
    """LoRA alpha (default: 2 * lora_r)."""
    lora_dropout: float = 0.0
    """LoRA dropout (the trainer sets every dropout to 0 anyway: PPO's ratio needs deterministic forwards)."""
    lora_target_modules: str = "all-linear"
    """Modules given LoRA adapters: comma-separated names (q_proj,v_proj) or all-linear (every linear layer but the output head)."""
    merge_lora: bool = False
    """Save the final policy with the LoRA adapter merged into its weights (a plain model) instead of the adapter alone."""
    save_hf_checkpoints: bool = False
    """Also write every checkpoint's policy (and critic) as Hugging Face directories inside it: ckpt-<step>/policy loads with from_pretrained (rotated with the checkpoint)."""
    resume: bool = False
    """Continue from the newest intact checkpoint in output_dir (its metrics rows after that step are dropped), or start from step 0 with a warning when there is none (the same command restarts a preempted run)."""
    overwrite: bool = False
    """Start over in an output_dir that holds a run: delete its checkpoints, latest, metrics.jsonl, config.yaml, tensorboard/, policy/ and critic/ first (without it such a directory is refused)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available; under torchrun the local rank's GPU)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the policy, reference, critic and reward model weights."""
    threads: int = 0
    """torch CPU threads (0: the CPUs this process may actually use: its affinity mask capped by the cgroup CPU quota, less the share other processes keep busy (load average), divided among torchrun's local ranks; at least 1. torch's own default takes every visible core, which oversubscribes a CPU-limited or shared machine)."""


# ----------------------------------------------------------------------------------------------------
# fusedrl train: flags
# ----------------------------------------------------------------------------------------------------
def build_train_parser() -> argparse.ArgumentParser:
    from .config import PPOConfig, add_dataclass_arguments

    parser = argparse.ArgumentParser(
        prog="fusedrl train",
        description="Train a causal LM with PPO / GRPO / RLOO / REINFORCE++ against a reward model or a "
        "rule-based reward. Writes metrics.jsonl, config.yaml, checkpoints and the final policy/ (and critic/) "
        "to --output-dir (runs/fusedrl when not given).",
    )
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="YAML file of field values (any flag below, snake_case or kebab-case); flags "
                        "override it")  # fmt: skip
    add_dataclass_arguments(parser, TrainArgs, "models, data and reward")
    add_dataclass_arguments(parser, PPOConfig, "trainer (PPOConfig)")
    return parser


def _join_negative_numbers(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--flag -1e-3`` as ``--flag=-1e-3``: argparse takes a value that starts with ``-`` and is not a plain
    ``-1`` / ``-0.5`` for an option and says "expected one argument"."""
    takes_value = {opt for a in parser._actions if a.nargs is None and a.option_strings for opt in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and _NEGATIVE_NUMBER.fullmatch(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def parse_train_args(argv: list[str]):
    """Defaults <- YAML file <- flags, validated into ``(TrainArgs, PPOConfig)``."""
    from .config import PPOConfig, convert_field, dataclass_fields, flat_fields

    parser = build_train_parser()
    ns = vars(parser.parse_args(_join_negative_numbers(list(argv), parser)))
    yaml_path = ns.pop("config")
    values: dict = {}
    known = {f.name: tp for f, tp in dataclass_fields(TrainArgs)} | {x.name: x.type for x in flat_fields(PPOConfig)}
    if yaml_path is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except FileNotFoundError:
            parser.error(f"--config file {yaml_path!r} does not exist")
        if not isinstance(loaded, dict):
            parser.error(
                f"--config file {yaml_path!r} must hold a mapping of field: value, got {type(loaded).__name__}"
            )
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in known:
                parser.error(f"--config file {yaml_path!r}: unknown field {key!r} (see fusedrl train --help)")
            try:
                values[name] = convert_field(f"{key} in {yaml_path}", known[name], value)
            except argparse.ArgumentTypeError as e:
                parser.error(str(e))
    values.update(ns)
    args = {f.name: values[f.name] for f in dataclasses.fields(TrainArgs) if f.name in values}
    ppo = {x.name: values[x.name] for x in flat_fields(PPOConfig) if x.name in values}
    try:
        return TrainArgs(**args), PPOConfig(**ppo)
    except ValueError as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------------------------------
# fusedrl train
# ----------------------------------------------------------------------------------------------------
def _fail(message) -> SystemExit:
    """A user mistake: one line on stderr, exit status 1, no traceback."""
    text = " ".join(str(message).split()) if "\n" in str(message) else str(message)
    return SystemExit(f"fusedrl train: {text}")


def _check_extras(args: TrainArgs, cfg) -> None:
    import importlib.util

    if args.lora_r and importlib.util.find_spec("peft") is None:
        raise _fail("--lora-r needs the peft package: pip install 'fusedrl[lora]'")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise _fail("--tensorboard needs the tensorboard package: pip install 'fusedrl[tensorboard]'")
    from .trackers import check_installed, parse_report_to

    try:
        check_installed(parse_report_to(cfg.report_to))
    except ImportError as e:
        raise _fail(e) from None


def _outputs(out: Path, *, lora: bool, merged: bool) -> list[tuple[str, str]]:
    """What a finished run left in ``out``, each with how to use it."""
    if lora and not merged:
        policy = "the LoRA adapter + tokenizer: PeftModel.from_pretrained(base_model, this directory)"
    else:
        policy = "the trained policy + tokenizer + generation config: AutoModelForCausalLM.from_pretrained"
    items = [("metrics.jsonl", "one JSON object of metrics per step"),
             ("config.yaml", f"the run's settings: fusedrl train --config {out / 'config.yaml'} repeats it"),
             ("policy", policy), ("critic", "the critic (ValueModel.from_pretrained)"),
             ("tensorboard", f"tensorboard --logdir {out / 'tensorboard'}"),
             ("completions.jsonl", "sampled rollouts every --log-completions steps"),
             ("wandb", f"offline W&B runs: wandb sync {out / 'wandb'}/offline-run-*")]  # fmt: skip
    found = [(name + ("/" if (out / name).is_dir() else ""), what) for name, what in items if (out / name).exists()]
    ckpts = sorted(out.glob("ckpt-*"))
    if ckpts:
        found.append((f"{ckpts[-1].name}/", f"newest of {len(ckpts)} checkpoint(s): --resume continues from it"))
    return found


def _hf_checkpoint_trainer():
    """PPOTrainer whose checkpoints also hold the policy (and critic) as Hugging Face directories."""
    from .checkpoint import checkpoint_path
    from .trainer import PPOTrainer

    class HFCheckpointTrainer(PPOTrainer):
        def save_checkpoint(self):
            path = super().save_checkpoint()
            # Every rank calls it: under FSDP saving gathers the shards.
            self.save_pretrained(checkpoint_path(self.config.output_dir, self.global_step))
            return path

    return HFCheckpointTrainer


def train_main(argv: list[str]) -> int:
    args, cfg = parse_train_args(argv)
    if args.prompts is None:
        raise SystemExit("fusedrl train: --prompts is required (a .jsonl/.json/.parquet/.csv/.txt file, a datasets "
                         "directory or a Hub data set name)")  # fmt: skip
    if args.reward_model is not None and args.reward_fn is not None:
        raise SystemExit("fusedrl train: give one of --reward-model and --reward-fn, not both")
    if args.reward_model is None and args.reward_fn is None and args.environment is None:
        raise SystemExit("fusedrl train: give one of --reward-model and --reward-fn (or an --environment that owns "
                         "the reward with get_reward)")  # fmt: skip
    try:
        reward_kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"fusedrl train: --reward-kwargs must be a JSON object, got {args.reward_kwargs!r} ({e})")
    if not isinstance(reward_kwargs, dict):
        raise SystemExit(f"fusedrl train: --reward-kwargs must be a JSON object, got {args.reward_kwargs!r}")
    if reward_kwargs and args.reward_fn is None:
        raise SystemExit("fusedrl train: --reward-kwargs applies to --reward-fn only")
    if args.lora_r < 0:
        raise SystemExit(f"fusedrl train: --lora-r must be >= 0, got {args.lora_r}")
    if args.merge_lora and not args.lora_r:
        raise SystemExit("fusedrl train: --merge-lora applies with --lora-r only")
    if args.save_hf_checkpoints and not cfg.save_every:
        raise SystemExit("fusedrl train: --save-hf-checkpoints needs --save-every N (the checkpoints it adds to)")
    if cfg.output_dir is None:
        cfg = dataclasses.replace(cfg, output_dir="runs/fusedrl")
    _check_extras(args, cfg)
    started = time.monotonic()

    import torch

    from .checkpoint import prepare_run_dir
    from .compose import flat_dict
    from .data import bind_columns, load_environment_rows, load_prompt_data, reward_columns
    from .distributed import default_threads, init_distributed, resolve_device, shutdown_distributed
    from .models import PRESETS, apply_lora, build_causal_lm, build_reward_model, is_peft_model, save_model
    from .rewards import load_object, load_reward_fn
    from .tokenizer import build_char_tokenizer, load_tokenizer
    from .trainer import PPOTrainer

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    # User mistakes found while setting up (a missing file or model, no CUDA, an unknown reward, a bad column)
    # are one line each; a failure once training runs keeps its traceback.
    try:
        init_distributed()
        device = resolve_device(args.device)
        dtype = getattr(torch, args.dtype)
        if args.tokenizer is not None or args.policy not in PRESETS:
            tokenizer = load_tokenizer(args.tokenizer or args.policy, "tokenizer" if args.tokenizer else "policy")
        else:
            tokenizer = build_char_tokenizer()
        where = {"prompt_field": args.prompt_field, "split": args.dataset_split, "config": args.dataset_config}
        if args.environment is not None:  # rows as they are: reset(**row) takes their columns
            environment = load_object(args.environment, "environment")
            data = load_environment_rows(args.prompts, **where)
            reward_fn = load_reward_fn(args.reward_fn, **reward_kwargs) if args.reward_fn else None
            columns = reward_columns(reward_fn, sorted({c for r in data for c in r} - {"prompt"})) if reward_fn else []
            if columns:
                raise ValueError(f"--reward-fn {args.reward_fn} takes the data set columns {columns}; with --environment "
                                 "the row goes to the environment's reset(): score it in get_reward")  # fmt: skip
        else:
            environment = None
            data = load_prompt_data(args.prompts, tokenizer=tokenizer, **where)
            reward_fn = bind_columns(load_reward_fn(args.reward_fn, **reward_kwargs), data) if args.reward_fn else None
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if rank0 and not args.resume:  # a refused run fails in a second, not after building the models
            prepare_run_dir(cfg.output_dir, resume=False, overwrite=args.overwrite)
        vocab = len(tokenizer) if args.policy in PRESETS else None
        policy = build_causal_lm(args.policy, vocab_size=vocab, seed=cfg.seed, dtype=dtype)
        if args.lora_r:
            policy = apply_lora(policy, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                target_modules=args.lora_target_modules)  # fmt: skip
        policy = policy.to(device)
        if reward_fn is not None or args.reward_model is None:
            reward = reward_fn
        else:
            rm_vocab = len(tokenizer) if args.reward_model in PRESETS else None
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            reward = build_reward_model(args.reward_model, vocab_size=rm_vocab, seed=cfg.seed + 1, pad_token_id=pad,
                                        dtype=dtype).to(device)  # fmt: skip
        trainer_cls = _hf_checkpoint_trainer() if args.save_hf_checkpoints else PPOTrainer
        trainer = trainer_cls(policy, tokenizer, reward, cfg, environment_factory=environment)
    except (OSError, ValueError, TypeError, ImportError) as e:  # FileNotFoundError, FileExistsError, ...
        raise _fail(e) from None
    if trainer.rank == 0:
        msg = f"fusedrl train: {len(data)} prompts from {args.prompts}, policy {args.policy} on {device}"
        msg += f" ({threads} CPU threads)" if device.type == "cpu" else ""
        if is_peft_model(policy):
            n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
            n_all = sum(p.numel() for p in policy.parameters())
            ref_mib = sum(p.numel() * p.element_size() for p in policy.parameters() if not p.requires_grad) / 2**20
            msg += (f"; LoRA r={args.lora_r}: {n_train:,} of {n_all:,} parameters train, the reference is the base "
                    f"model with the adapter disabled ({ref_mib:,.1f} MiB not copied)")  # fmt: skip
        print(msg, file=sys.stderr)
    out = Path(cfg.output_dir)
    run = {**dataclasses.asdict(args), **flat_dict(cfg)}
    run.pop("resume"), run.pop("overwrite")  # how this invocation treats the directory, not part of the run
    rows = data if environment is not None else data.prompts
    try:
        trainer.train(rows, resume=args.resume, overwrite=args.overwrite, run_config=run)
    except KeyboardInterrupt:  # train() has stopped its producer process by now
        raise SystemExit(f"fusedrl train: interrupted; --resume continues {out} from its last checkpoint") from None
    if trainer.rank == 0:
        if args.merge_lora:  # policy/ becomes the plain model with the adapter merged in
            import shutil

            tmp = out / "policy.merging"
            save_model(trainer.policy, tmp, tokenizer=tokenizer, merge_lora=True)
            shutil.rmtree(out / "policy")
            os.replace(tmp, out / "policy")
        elapsed = time.monotonic() - started
        outputs = _outputs(out, lora=bool(args.lora_r), merged=args.merge_lora)
        width = max((len(n) for n, _ in outputs), default=0)
        lines = [f"fusedrl train: {cfg.total_steps} steps done in {elapsed:.0f} s; outputs in {out}/"]
        lines += [f"  {n:<{width}}  {what}" for n, what in outputs]
        print("\n".join(lines), file=sys.stderr)
    shutdown_distributed()
    return 0


USAGE = """usage: fusedrl {train,dpo,sft,rm,demo,report} [options]

  train   PPO / GRPO / RLOO / REINFORCE++ training (fusedrl train --help)
  demo    the built-in demo (fusedrl demo --help)
  dpo     offline DPO / IPO / SimPO / ORPO on {prompt, chosen, rejected} pairs (fusedrl dpo --help)
  sft     supervised fine-tuning on {prompt, completion} or {messages} records (fusedrl sft --help)
  rm      a Bradley-Terry reward model on {prompt, chosen, rejected} pairs (fusedrl rm --help)
  report  plots of runs (PNGs + one self-contained HTML page), several overlaid (fusedrl report --help)

  fusedrl --version prints the installed version
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from fusedrl import __version__

        print(f"fusedrl {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest) or 0
    if cmd == "dpo":
        from .dpo import main as dpo_main

        return dpo_main(rest) or 0
    if cmd == "sft":
        from .sft_cli import main as sft_main

        return sft_main(rest)
    if cmd == "rm":
        from .rm_cli import main as rm_main

        return rm_main(rest)
    if cmd == "report":
        from .report import main as report_main

        return report_main(rest) or 0
    print(f"fusedrl: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
