"""The ``fusedrl`` command line.

    fusedrl train --prompts prompts.jsonl --reward-fn count_token --reward-kwargs '{"token": "a"}' \\
                  --advantage-estimator grpo --total-steps 50 --output-dir runs/a
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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import PPOConfig, add_dataclass_arguments, convert_field, dataclass_fields


@dataclass
class TrainArgs:
    """What ``fusedrl train`` needs besides the trainer's PPOConfig."""

    prompts: str | None = None
    """Prompts: a .jsonl file (a "prompt" or "text" field per line) or a text file (one prompt per line)."""
    policy: str = "tiny-llama"
    """Policy: a preset name (see fusedrl.engine.models.PRESETS) or a local HF model directory."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the policy directory, or the built-in character tokenizer for a preset."""
    reward_model: str | None = None
    """Reward model: a preset name or a local HF sequence-classification directory (exclusive with reward_fn)."""
    reward_fn: str | None = None
    """Rule-based reward: a built-in (count_token, target_length, echo_prompt), module:function or file.py:function."""
    reward_kwargs: str = "{}"
    """Keyword arguments bound to reward_fn, as a JSON object, e.g. '{"token": "a"}'."""
    resume: bool = False
    """Continue from the newest intact checkpoint in output_dir (its metrics rows after that step are dropped)."""
    overwrite: bool = False
    """Start over in an output_dir that holds a run: delete its checkpoints, latest, metrics.jsonl, config.yaml, tensorboard/, policy/ and critic/ first (without it such a directory is refused)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available; under torchrun the local rank's GPU)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the policy, reference, critic and reward model weights."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""


# ----------------------------------------------------------------------------------------------------
# fusedrl train: flags
# ----------------------------------------------------------------------------------------------------
def build_train_parser() -> argparse.ArgumentParser:
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


def parse_train_args(argv: list[str]) -> tuple[TrainArgs, PPOConfig]:
    """Defaults <- YAML file <- flags, validated into the two dataclasses."""
    parser = build_train_parser()
    ns = vars(parser.parse_args(argv))
    yaml_path = ns.pop("config")
    values: dict = {}
    known = {f.name: tp for cls in (TrainArgs, PPOConfig) for f, tp in dataclass_fields(cls)}
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
    split = lambda cls: {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    try:
        return TrainArgs(**split(TrainArgs)), PPOConfig(**split(PPOConfig))
    except ValueError as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------------------------------
# fusedrl train
# ----------------------------------------------------------------------------------------------------
def load_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file (field "prompt" or "text", or a bare JSON string per line) or a text
    file (one prompt per non-empty line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist")
    prompts = []
    if p.suffix in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row, str):
                prompts.append(row)
            elif isinstance(row, dict) and isinstance(row.get("prompt", row.get("text")), str):
                prompts.append(row.get("prompt", row.get("text")))
            else:
                raise ValueError(
                    f"{p}:{n}: each line must be a JSON string or an object with a 'prompt' (or 'text') string"
                )
    else:
        prompts = [line for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(p)!r} holds no prompts")
    return prompts


def train_main(argv: list[str]) -> int:
    args, cfg = parse_train_args(argv)
    if args.prompts is None:
        raise SystemExit("fusedrl train: --prompts is required (a .jsonl or text file)")
    if (args.reward_model is None) == (args.reward_fn is None):
        raise SystemExit("fusedrl train: give exactly one of --reward-model and --reward-fn")
    try:
        reward_kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"fusedrl train: --reward-kwargs must be a JSON object, got {args.reward_kwargs!r} ({e})")
    if not isinstance(reward_kwargs, dict):
        raise SystemExit(f"fusedrl train: --reward-kwargs must be a JSON object, got {args.reward_kwargs!r}")
    if reward_kwargs and args.reward_fn is None:
        raise SystemExit("fusedrl train: --reward-kwargs applies to --reward-fn only")
    if cfg.output_dir is None:
        cfg = dataclasses.replace(cfg, output_dir="runs/fusedrl")

    import torch

    from .checkpoint import prepare_run_dir
    from .distributed import init_distributed, resolve_device
    from .models import PRESETS, build_causal_lm, build_reward_model
    from .rewards import load_reward_fn
    from .tokenizer import build_char_tokenizer
    from .trainer import PPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()
    device = resolve_device(args.device)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:  # a refused run fails in a second, not after building the models (train() checks again)
            prepare_run_dir(cfg.output_dir, resume=args.resume, overwrite=args.overwrite)
        except (FileExistsError, FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise SystemExit(f"fusedrl train: {e}") from None
    dtype = getattr(torch, args.dtype)
    prompts = load_prompts(args.prompts)

    if args.tokenizer is not None or args.policy not in PRESETS:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.policy, local_files_only=True)
    else:
        tokenizer = build_char_tokenizer()
    vocab = len(tokenizer) if args.policy in PRESETS else None
    policy = build_causal_lm(args.policy, vocab_size=vocab, seed=cfg.seed, dtype=dtype).to(device)
    if args.reward_fn is not None:
        reward = load_reward_fn(args.reward_fn, **reward_kwargs)
    else:
        rm_vocab = len(tokenizer) if args.reward_model in PRESETS else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        reward = build_reward_model(args.reward_model, vocab_size=rm_vocab, seed=cfg.seed + 1, pad_token_id=pad,
                                    dtype=dtype).to(device)  # fmt: skip

    trainer = PPOTrainer(policy, tokenizer, reward, cfg)
    out = Path(cfg.output_dir)
    run = {**dataclasses.asdict(args), **dataclasses.asdict(cfg)}
    run.pop("resume"), run.pop("overwrite")  # how this invocation treats the directory, not part of the run
    trainer.train(prompts, resume=args.resume, overwrite=args.overwrite, run_config=run)
    if trainer.rank == 0:
        print(f"fusedrl train: {cfg.total_steps} steps done; metrics in {out / 'metrics.jsonl'}, "
              f"model in {out / 'policy'}", file=sys.stderr)  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


USAGE = """usage: fusedrl {train,demo} [options]

  train   PPO / GRPO / RLOO / REINFORCE++ training (fusedrl train --help)
  demo    the built-in demo (fusedrl demo --help)
  dpo     offline preference optimisation: DPO / IPO / SimPO / ORPO on {prompt, chosen, rejected} pairs (fusedrl dpo --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest) or 0
    if cmd == "dpo":
        from .dpo import main as dpo_main

        return dpo_main(rest) or 0
    print(f"fusedrl: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
