"""``fusedrl dpo``: offline preference optimisation (DPO, IPO, SimPO, ORPO, + RPO's NLL term) on a JSONL file of
preference pairs, through the fused lm_head loss (``fusedrl.kernels.linear_preference_loss``).

    fusedrl dpo --policy sft-dir --data pairs.jsonl --loss-type dpo --beta 0.1 --output-dir runs/dpo

Data: one JSON object per line with ``prompt``, ``chosen`` and ``rejected``. Either three strings (the
response is tokenized after the prompt and ends with the tokenizer's eos), or chat messages as TRL writes
them (``prompt``: a list of ``{"role", "content"}`` messages, ``chosen`` / ``rejected``: the assistant
message(s), or a string taken as the assistant's content) rendered with the tokenizer's chat template.

The recipe: tokenize and check every pair (errors name ``file:line``); the reference log-probs of every
chosen and rejected response, computed once before the first update (by the policy itself unless
``--ref-policy`` names another model, which then leaves memory), or with ``--ref-logps online`` by a kept
reference model on each micro-batch as it trains; then ``epochs`` passes over the pairs, ``pairs_per_step``
per optimizer step, packed padding-free into token-budget micro-batches by the C++ planner (the two
sequences of a pair always travel together). Output directory: ``metrics.jsonl``, ``config.yaml``,
checkpoints (``--save-every``, resumable with ``--resume``) and the final ``policy/``.

Data parallel under torchrun (``torchrun --nproc-per-node N -m fusedrl.engine.cli dpo ...``): every rank
reads all the pairs and draws the same step; one global ``plan_microbatches(num_ranks=N)`` per step gives
each rank its share of the step's pairs (a pair is never split); the losses are divided by the step's
*global* pair count and DDP sums the gradients, so N processes make the update one process makes. The
precomputed reference log-probs are scored once, each rank its share of the pairs, and gathered onto every
rank. Metrics are reduced over ranks; rank 0 writes metrics, checkpoints and the final model, and every rank
resumes from the same checkpoint.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fusedrl.kernels import LOSS_TYPES, PreferenceLossConfig

from .compose import composed, flat_dict, part
from .preference_data import EncodedPair, build_buffer, encode_record, load_pairs  # noqa: F401 - dpo's data API
from .config import OptimConfig, RunConfig

from .trackers import parse_report_to

# The per-pair-weighted metrics of a step (means over its pairs); the rest are per step.
_PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio")  # fmt: skip


@composed
@dataclass
class DPOConfig:
    """Everything ``fusedrl dpo`` needs; each field (and each field of its parts) is a ``--kebab-case`` flag."""

    policy: str = "tiny-llama"
    """Policy to train: a preset name (fusedrl.engine.models.PRESETS), a local HF directory or a Hub id."""
    data: str | None = None
    """Preference pairs: a .jsonl file, one {"prompt", "chosen", "rejected"} object per line (strings or chat messages)."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub id; default: the policy's, or the built-in character tokenizer for a preset."""
    ref_policy: str | None = None
    """Reference policy for dpo/ipo; default: the policy itself before training (no second model is loaded)."""
    ref_logps: Literal["precompute", "online"] = "precompute"
    """dpo/ipo reference log-probs: precompute = one no-grad pass over all pairs before training, then only the
    (pairs, 2) table is kept (the reference model leaves memory); online = keep the reference model (a frozen copy
    of the initial policy when no ref_policy is given) and score each micro-batch's pairs under no_grad as it
    trains (same losses; a second model in memory and one more forward per micro-batch, but no pass up front)."""
    loss_type: Literal[LOSS_TYPES] = "dpo"
    """dpo (Rafailov et al. 2023), ipo (Azar et al. 2023), simpo (Meng et al. 2024) or orpo (Hong et al. 2024)."""
    beta: float = 0.1
    """dpo/simpo: implicit-reward scale; ipo: tau; orpo: lambda (weight of the odds-ratio term)."""
    label_smoothing: float = 0.0
    """dpo/simpo: assumed label-flip rate (conservative DPO); 0 = off."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin."""
    rpo_alpha: float = 0.0
    """Weight of an NLL term on the chosen response (RPO, Pang et al. 2024); 0 = off."""
    epochs: int = 1
    """Passes over the pairs."""
    pairs_per_step: int = 32
    """Pairs per optimizer step (split into token-budget micro-batches with gradient accumulation)."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one packed forward/backward; a pair (both sequences) must fit in it."""
    max_length: int | None = None
    """Longest prompt + response in tokens (responses beyond it are truncated); None: the model's context."""
    optim: OptimConfig = part(lambda: OptimConfig(learning_rate=1e-6, lr_schedule="cosine"))
    """The optimizer (shared with every objective)."""
    run: RunConfig = part(lambda: RunConfig(output_dir="runs/dpo"), owned=("log_completions",))  # nothing sampled
    """Output directory, seed (of the pair order and a preset's random weights), checkpoints, logging."""
    resume: bool = False
    """Continue from the newest intact checkpoint in output_dir, or start from step 0 (a warning) when there is none."""
    overwrite: bool = False
    """Start over in an output_dir that holds a run (its run files are deleted first)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the policy (and reference) weights."""
    threads: int = 0
    """torch CPU threads (0: the CPUs this process may actually use, as for fusedrl train)."""

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"DPOConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("epochs", "pairs_per_step", "max_tokens_per_microbatch"):
            need(getattr(self, name) >= 1, name, "an int >= 1")
        need(self.threads >= 0, "threads", "an int >= 0")
        need(self.output_dir is not None, "output_dir", "a directory (where the run is written)")
        need(self.max_length is None or self.max_length >= 2, "max_length", "None or an int >= 2")
        need(not (self.resume and self.overwrite), "overwrite", "False with resume=True (they exclude each other)")
        need(self.ref_logps in ("precompute", "online"), "ref_logps", "'precompute' or 'online'")
        self.loss_config()  # loss_type, beta, label_smoothing, ... checked where they are defined

    def loss_config(self, temperature: float = 1.0) -> PreferenceLossConfig:
        return PreferenceLossConfig(self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma, self.rpo_alpha,
                                    temperature)  # fmt: skip


def micro_batches(buf, lengths: np.ndarray, pair_ids: np.ndarray, max_tokens: int, device, *, rank: int = 0,
                  num_ranks: int = 1):  # fmt: skip
    """``[(pair ids (p,), MicroBatch)]``: rank ``rank``'s share of one global plan over ``pair_ids`` for
    ``num_ranks`` ranks (all of them for one rank), each micro-batch within the token budget, a pair's two
    sequences side by side (packed sequences 2j, 2j + 1 are pair j of the micro-batch). A rank may get none
    (fewer pairs than ranks)."""
    from .packing import plan_microbatches
    from .scoring import MicroBatch

    out = []
    for idx in plan_microbatches(lengths[pair_ids], max_tokens, num_ranks=num_ranks)[rank]:
        if len(idx) == 0:
            continue
        ids = pair_ids[idx]
        seq_ids = np.stack([2 * ids, 2 * ids + 1], 1).reshape(-1)
        out.append((ids, MicroBatch(buf, seq_ids, device)))
    return out


def sequence_logps(model, mb, *, backend: str = "auto") -> torch.Tensor:
    """(p, 2) float32 log pi(response | prompt) of a micro-batch's pairs (no gradient)."""
    from fusedrl.kernels import linear_logprobs

    from .models import output_head
    from .scoring import packed_hidden_states

    h = packed_hidden_states(model, mb)
    weight, bias, scale = output_head(model)
    lp = linear_logprobs(h, weight, mb.labels, bias=bias, temperature=1.0 / scale, backend=backend)
    seq = torch.repeat_interleave(torch.arange(len(mb.cu_rows) - 1, device=lp.device), mb.cu_rows.diff().long())
    return lp.new_zeros(len(mb.cu_rows) - 1).index_add(0, seq, lp).view(-1, 2)


@torch.no_grad()
def reference_logps(model, buf, lengths, max_tokens: int, device, *, backend="auto", dist=None) -> torch.Tensor:
    """(P, 2) float32 CPU log pi_ref of every pair's chosen and rejected response (``build_buffer``'s layout),
    one packed pass over the data. With ``dist`` (a ``Distributed`` of several ranks) each rank scores its
    share of one global plan and every rank gets the whole table (a collective: every rank calls it)."""
    from .attention import use_packed_attention
    from .sampling import eval_mode

    rank, ranks = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    use_packed_attention(model)
    out = torch.full((len(lengths), 2), math.nan)
    mine = []
    with eval_mode(model):
        for ids, mb in micro_batches(buf, lengths, np.arange(len(lengths)), max_tokens, device, rank=rank,
                                     num_ranks=ranks):  # fmt: skip
            mine.append((ids, sequence_logps(model, mb, backend=backend).cpu()))
    parts = dist.gather_objects(mine) if ranks > 1 else [mine]
    for shard in parts:
        for ids, lp in shard:
            out[torch.from_numpy(ids)] = lp
    return out


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def _load_tokenizer(cfg: DPOConfig):
    from .models import PRESETS
    from .tokenizer import build_char_tokenizer, load_tokenizer

    if cfg.tokenizer is None and cfg.policy in PRESETS:
        return build_char_tokenizer()
    return load_tokenizer(cfg.tokenizer or cfg.policy, "tokenizer" if cfg.tokenizer else "policy")


def _step_pairs(n_pairs: int, cfg: DPOConfig, step: int) -> np.ndarray:
    """The pair ids of ``step`` (0-based): epoch-wise seeded shuffles, derived from (seed, epoch) alone so a
    resumed run draws the same pairs."""
    per_epoch = math.ceil(n_pairs / cfg.pairs_per_step)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_pairs)
    return order[k * cfg.pairs_per_step : (k + 1) * cfg.pairs_per_step]


def train_dpo(policy, tokenizer, pairs: Sequence[EncodedPair], cfg: DPOConfig, *,
              ref_logps: torch.Tensor | None = None, ref_model=None,
              run_config: dict | None = None) -> list[dict]:  # fmt: skip
    """Train ``policy`` (an HF causal LM on its device) on encoded ``pairs``; returns the metrics rows.
    metrics.jsonl, config.yaml (``run_config``), checkpoints and the final ``policy/`` go to ``cfg.output_dir``.

    The reference of dpo/ipo: ``ref_logps`` (P, 2), precomputed log-probs (``reference_logps`` of another model),
    or ``ref_model``, another model (scored once up front with ``cfg.ref_logps='precompute'``, kept and scored per
    micro-batch with ``'online'``); default: the policy itself before the first update. A resumed run takes the
    precomputed table from its checkpoint. Under torchrun (a process group is initialised) every rank calls it
    with the same arguments and trains its share of each step (see the module docstring)."""
    from fusedrl.kernels import linear_preference_loss

    from .attention import use_packed_attention
    from .distributed import Distributed, PolicyBody
    from .models import disable_dropout, output_head
    from .update import GuardedStep, RunDir, accumulate, adamw, lr_schedule, metrics_logger, passes, run_loop
    from .update import save_model

    device = next(policy.parameters()).device
    dist = Distributed(device)
    out = Path(cfg.output_dir)
    run = RunDir(out, dist, resume=cfg.resume, overwrite=cfg.overwrite, keep_checkpoints=cfg.keep_checkpoints)
    latest = run.latest
    if run_config is not None:
        run.write_config(run_config)
    use_packed_attention(policy)
    # The implicit reward compares two forwards of the same weights (policy and its own reference at step 0):
    # with dropout it would start as noise instead of 0.
    disable_dropout(policy)
    buf, lengths = build_buffer(pairs)
    n_pairs = len(pairs)
    total = cfg.epochs * math.ceil(n_pairs / cfg.pairs_per_step)
    opt = adamw(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, cfg.optim, total)
    step, ref = 0, ref_logps
    state = run.load()
    if state is not None:
        if int(state["num_pairs"]) != n_pairs:
            raise ValueError(f"resume: the checkpoint {str(latest)!r} was trained on {int(state['num_pairs'])} pairs, "
                             f"the data now holds {n_pairs}")  # fmt: skip
        step, ref = int(state["step"]), state.get("ref_logps", ref)
    needs_ref = cfg.loss_config().needs_reference
    online = needs_ref and cfg.ref_logps == "online"
    # The reference is the policy *before* training: taken (scored or copied) before a checkpoint's weights load.
    if online:
        if ref_logps is not None:
            raise ValueError("ref_logps (a precomputed table) was given but cfg.ref_logps='online' scores the "
                             "reference on the fly: give ref_model instead, or cfg.ref_logps='precompute'")  # fmt: skip
        import copy

        ref, ref_model = None, copy.deepcopy(policy) if ref_model is None else ref_model
        ref_model.requires_grad_(False).eval()
        use_packed_attention(ref_model)
        disable_dropout(ref_model)
    elif needs_ref and ref is None:
        if ref_model is None and cfg.ref_policy is not None:
            # Never score with the policy when another reference was asked for. run() does not load it when
            # resuming a precompute run: the table was expected in the checkpoint.
            if latest is None:
                raise ValueError(f"cfg.ref_policy={cfg.ref_policy!r} but neither ref_logps nor ref_model was given")
            raise ValueError(f"resume: the checkpoint {str(latest)!r} holds no reference log-probs (it was written "
                             f"with ref_logps='online') and ref_policy={cfg.ref_policy!r} is not loaded to score "
                             "them: resume with --ref-logps online")  # fmt: skip
        t0 = time.perf_counter()
        ref = reference_logps(policy if ref_model is None else ref_model, buf, lengths, cfg.max_tokens_per_microbatch,
                              device, backend=cfg.backend, dist=dist)  # fmt: skip
        ref_model = None  # leaves memory (unless the caller holds it)
        if dist.rank == 0:
            print(f"fusedrl dpo: reference log-probs of {n_pairs} pairs in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)  # fmt: skip
    if not online and ref is not None and tuple(ref.shape) != (n_pairs, 2):
        raise ValueError(
            f"ref_logps must be ({n_pairs}, 2), one (chosen, rejected) row per pair, got {tuple(ref.shape)}"
        )
    if state is not None:
        policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["policy_optimizer"])
        sched.load_state_dict(state["scheduler"])
        del state
    # Several ranks: DDP with summed gradients (each rank's loss already carries the global pair count). The body
    # holds the whole policy, so the lm_head that the fused loss applies outside its forward is reduced too.
    body = dist.data_parallel(PolicyBody(policy))
    guard = GuardedStep(dist)

    def save(at: int) -> None:
        state = {"policy": policy.state_dict(), "policy_optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "num_pairs": n_pairs}  # fmt: skip
        if ref is not None:
            state["ref_logps"] = ref
        run.save(at, state)

    _, _, scale = output_head(policy)
    loss_cfg = cfg.loss_config(temperature=1.0 / scale)

    def one_step(step: int) -> dict:
        t0 = time.perf_counter()
        ids = _step_pairs(n_pairs, cfg, step)  # the same on every rank
        sums: dict[str, torch.Tensor] = {}
        n_tok, losses = [0], []

        def objective(item, weight):
            mb_ids, mb = item
            h = body(mb.input_ids, mb.position_ids, **mb.attn_kwargs)[0][mb.rows]  # (M, H)
            weight_h, bias, _ = output_head(policy)
            pair_index = torch.arange(2 * len(mb_ids), device=device).view(-1, 2)
            if online:
                with torch.no_grad():
                    ref_mb = sequence_logps(ref_model, mb, backend=cfg.backend)  # (p, 2)
            else:
                ref_mb = ref[torch.from_numpy(mb_ids)].to(device) if needs_ref else None
            # Global denominator: each micro-batch loss is its share of the whole step's mean.
            loss, m = linear_preference_loss(h, weight_h, mb.labels, pair_index, mb.cu_rows, ref_mb, bias=bias,
                                             config=loss_cfg, num_pairs=len(ids), backend=cfg.backend)  # fmt: skip
            losses.append(loss.detach())
            yield loss
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * (len(mb_ids) * weight)
            n_tok[0] += int(mb.input_ids.shape[1]) if weight else 0

        # One global plan of the step's pairs; this rank trains its share (possibly none: a zero-weighted pass).
        mine = micro_batches(buf, lengths, ids, cfg.max_tokens_per_microbatch, device, rank=dist.rank,
                             num_ranks=dist.world_size)  # fmt: skip
        idle = mine[0] if mine else micro_batches(buf, lengths, ids[:1], cfg.max_tokens_per_microbatch, device)[0]
        accumulate((body,), passes(mine, idle), objective)
        ok = torch.isfinite(torch.stack(losses)).all()
        norm = guard.step(policy, opt, ok, max_grad_norm=cfg.max_grad_norm, step=step + 1)
        sched.step()
        keys = sorted(sums)
        totals = dist.sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]))
        tokens = dist.sum(float(n_tok[0]))
        dt = time.perf_counter() - t0
        metrics = dict(zip(keys, (totals / len(ids)).tolist()))  # one host sync for the step's metrics
        metrics.update({"grad_norm": norm.item(), "lr": sched.get_last_lr()[0], "epoch": (step + 1) *
                        cfg.pairs_per_step / n_pairs, "perf/step_s": dt, "perf/tokens_per_s": tokens / dt,
                        "train/skipped_steps": float(guard.skipped)})  # fmt: skip
        return metrics

    logger = metrics_logger(out, dist, cfg, total_steps=total, resume_step=step if latest is not None else None,
                            run_config=run_config if run_config is not None else flat_dict(cfg))  # fmt: skip
    body.train()
    rows = run_loop(one_step, step, total, logger, save_every=cfg.save_every, save=save)
    body.eval()
    if dist.rank == 0:
        save_model(policy, tokenizer, out / "policy")
    dist.barrier()
    return rows


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> DPOConfig:
    from .config import add_dataclass_arguments

    parser = argparse.ArgumentParser(
        prog="fusedrl dpo",
        description="Offline preference optimisation (DPO / IPO / SimPO / ORPO, + RPO) on a JSONL file of "
        "{prompt, chosen, rejected} pairs, from the fused lm_head. Writes metrics.jsonl, config.yaml, "
        "checkpoints and the final policy/ to --output-dir.",
    )
    add_dataclass_arguments(parser, DPOConfig, "dpo settings (DPOConfig)")
    ns = vars(parser.parse_args(list(argv)))
    try:
        cfg = DPOConfig(**ns)
    except ValueError as e:
        parser.error(str(e))
    if cfg.data is None:
        parser.error("--data is required (a .jsonl file of {prompt, chosen, rejected} records)")
    return cfg


def run(cfg: DPOConfig) -> list[dict]:
    """Load the tokenizer, the data, the policy (and a reference), then ``train_dpo``. Under torchrun
    (WORLD_SIZE > 1) it joins the process group first and every rank runs it."""
    args, kwargs = setup(cfg)
    return train_dpo(*args, **kwargs)


def setup(cfg: DPOConfig) -> tuple[tuple, dict]:
    """Everything ``run`` does before training: ``train_dpo``'s positional and keyword arguments. The user's mistakes (a missing file,
    a bad model id, an existing run directory, a bad setting) surface here, before any step."""
    from .checkpoint import find_latest, prepare_run_dir
    from .distributed import Distributed, default_threads, init_distributed, resolve_device
    from .models import PRESETS, build_causal_lm

    from .trackers import check_installed

    check_installed(parse_report_to(cfg.report_to))  # a missing extra fails before any model is built
    torch.set_num_threads(cfg.threads or default_threads())
    init_distributed()
    device = resolve_device(cfg.device)
    dist = Distributed(device)
    # A refused run fails first, before any model is built.
    if not cfg.resume:
        dist.on_rank0(prepare_run_dir, Path(cfg.output_dir), resume=False, overwrite=cfg.overwrite)
    resuming = cfg.resume and find_latest(cfg.output_dir) is not None
    dtype = getattr(torch, cfg.dtype)
    tokenizer = _load_tokenizer(cfg)
    preset = cfg.policy in PRESETS
    policy = build_causal_lm(cfg.policy, vocab_size=len(tokenizer) if preset else None, seed=cfg.seed, dtype=dtype)
    policy.to(device)
    max_length = cfg.max_length
    if max_length is None:
        from .data import context_length

        max_length = context_length(policy)
    pairs = load_pairs(cfg.data, tokenizer, max_length=max_length, max_pair_tokens=cfg.max_tokens_per_microbatch)
    ref_logps = ref_model = None
    online = cfg.ref_logps == "online"
    # A resumed precompute run takes the table from its checkpoint; an online one needs the model again.
    if cfg.ref_policy is not None and cfg.loss_config().needs_reference and (online or not resuming):
        ref_model = build_causal_lm(cfg.ref_policy, vocab_size=len(tokenizer) if cfg.ref_policy in PRESETS else None,
                                    seed=cfg.seed, dtype=dtype).to(device)  # fmt: skip
        if not online:
            buf, lengths = build_buffer(pairs)
            ref_logps = reference_logps(ref_model, buf, lengths, cfg.max_tokens_per_microbatch, device,
                                        backend=cfg.backend, dist=dist)  # fmt: skip
            ref_model = buf = None  # the reference leaves memory: only its (P, 2) log-probs are kept
    run_config = flat_dict(cfg)
    run_config.pop("resume"), run_config.pop("overwrite")
    return (policy, tokenizer, pairs, cfg), dict(ref_logps=ref_logps, ref_model=ref_model, run_config=run_config)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    # Set-up errors are the user's (one line); an error during training is a bug or a numerical failure and keeps
    # its traceback, as in fusedrl train.
    try:
        args, kwargs = setup(cfg)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, ImportError) as e:
        raise SystemExit(f"fusedrl dpo: {e}") from None
    rows = train_dpo(*args, **kwargs)
    from .distributed import shutdown_distributed

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    shutdown_distributed()
    if not rank0:
        return 0
    out = Path(cfg.output_dir)
    last = rows[-1] if rows else {}
    print(f"fusedrl dpo: {len(rows)} steps; last loss {last.get('loss', math.nan):.4f}, reward accuracy "
          f"{last.get('rewards/accuracies', math.nan):.2f}; metrics in {out / 'metrics.jsonl'}, model in "
          f"{out / 'policy'}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
