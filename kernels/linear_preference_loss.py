"""Offline preference losses (DPO, IPO, SimPO, ORPO, and RPO's NLL term) from the lm_head, without the
(tokens x vocab) logits.

The expensive part of every preference loss is the same: the log-probability sum of each chosen and each
rejected response under the policy, ``log pi(y | x) = sum_t log softmax(h_t W^T + b)[y_t]``. That is
``linear_logprobs`` (chunks of tokens through the lm_head, Triton on CUDA, per-row logsumexp kept for
backward, float32 dW accumulation), followed by a float32 segment sum per sequence. What is left is O(pairs)
scalar math on those sums: the loss of the chosen family, written once (``pair_losses``) and used by the op
and by its reference alike. Backward flows through ``linear_logprobs``' own backward, which recomputes each
chunk of logits; the per-token upstream gradient is d loss / d sum of the token's sequence.

Two input layouts, as the other linear ops:
- packed: ``hidden (N, H)``, ``labels (N,)``, ``cu_seqlens (S + 1,)`` (sequence boundaries, prompts included,
  -100 labels on prompt tokens) and ``pair_index (P, 2)``: sequence ids of the chosen and the rejected
  response of each pair, anywhere in the pack;
- padded: ``hidden (B, T, H)``, ``labels (B, T)``; pairs are rows ``(i, B/2 + i)`` (TRL's concatenated
  chosen-then-rejected batch) unless ``pair_index`` names the rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._utils import IGNORE_INDEX, check_cu_seqlens, check_float, check_int, data_checks_enabled
from .configs import LOSS_TYPES, PreferenceLossConfig  # noqa: F401 (LOSS_TYPES re-exported)
from .linear_ppo_loss import linear_logprobs, linear_logprobs_ref

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# The losses of the pairs, from the sequence log-prob sums (shared by the op and the reference)
# ----------------------------------------------------------------------------------------------------
def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends: log1p(-e^x) far below 0, log(-expm1(x)) near it."""
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    loss = -F.logsigmoid(z)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-z)


def pair_losses(
    chosen_logps: torch.Tensor,  # (P,) log pi(y_w | x): sums over the chosen response's tokens
    rejected_logps: torch.Tensor,  # (P,) log pi(y_l | x)
    chosen_len: torch.Tensor,  # (P,) response tokens of y_w (>= 1)
    rejected_len: torch.Tensor,  # (P,) response tokens of y_l (>= 1)
    ref_chosen_logps: torch.Tensor | None,  # (P,) log pi_ref(y_w | x); dpo / ipo only
    ref_rejected_logps: torch.Tensor | None,  # (P,)
    config: PreferenceLossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses ``(P,)`` and per-pair values for the metrics (rewards, NLL, log-odds), in the dtype of
    the log-probs. With ``r = beta * log(pi / pi_ref)`` the implicit reward:

    - ``dpo``  (Rafailov et al. 2023, "Direct Preference Optimization"): ``-log s(r_w - r_l)``; with label
      smoothing eps, ``-(1 - eps) log s(z) - eps log s(-z)`` (conservative DPO).
    - ``ipo``  (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences"): ``(h - 1 / (2 beta))^2`` with ``h`` the difference of the per-token log-ratios of chosen
      and rejected (the log-ratios are divided by the response lengths, as in TRL, confirmed there with the
      authors).
    - ``simpo`` (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
      ``-log s(beta (a_w - a_l) - gamma)`` with ``a = log pi(y | x) / |y|``, the length-normalised log-prob;
      label smoothing as dpo.
    - ``orpo`` (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
      ``-a_w - beta log s(log odds(a_w) - log odds(a_l))`` with ``odds(a) = e^a / (1 - e^a)``: the NLL of
      the chosen response (per token) plus lambda = beta times the odds-ratio term.
    - ``rpo_alpha > 0`` (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): adds
      ``rpo_alpha * (-a_w)``, the length-normalised NLL of the chosen response, to any of them.
    """
    beta = config.beta
    a_w = chosen_logps / chosen_len
    a_l = rejected_logps / rejected_len
    extra: dict[str, torch.Tensor] = {}
    if config.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={config.loss_type!r} needs the reference log-probs (ref_logp_sums)")
        ratio_w = chosen_logps - ref_chosen_logps
        ratio_l = rejected_logps - ref_rejected_logps
        r_w, r_l = beta * ratio_w, beta * ratio_l
        if config.loss_type == "dpo":
            loss = _smoothed_sigmoid_loss(r_w - r_l, config.label_smoothing)
        else:
            h = ratio_w / chosen_len - ratio_l / rejected_len
            loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        r_w, r_l = beta * a_w, beta * a_l
        if config.loss_type == "simpo":
            loss = _smoothed_sigmoid_loss(beta * (a_w - a_l) - config.simpo_gamma, config.label_smoothing)
        else:
            log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
            loss = -a_w - beta * F.logsigmoid(log_odds)
            extra["log_odds_ratio"] = log_odds
            extra["nll_loss"] = -a_w
    if config.rpo_alpha:
        loss = loss + config.rpo_alpha * -a_w
        extra["nll_loss"] = -a_w
    return loss, {"rewards/chosen": r_w, "rewards/rejected": r_l, "logps/chosen": chosen_logps,
                  "logps/rejected": rejected_logps, **extra}  # fmt: skip


def _metrics(loss_sum: torch.Tensor, values: dict[str, torch.Tensor], n_pairs: int) -> dict[str, torch.Tensor]:
    """TRL's metric names, means over this call's pairs, detached 0-d float32 tensors (no host sync)."""
    v = {k: t.detach().float() for k, t in values.items()}
    out = {"loss": loss_sum.detach().float() / max(n_pairs, 1)}
    mean = lambda t: t.mean() if t.numel() else t.new_zeros(())  # noqa: E731
    out["rewards/chosen"] = mean(v["rewards/chosen"])
    out["rewards/rejected"] = mean(v["rewards/rejected"])
    out["rewards/margins"] = mean(v["rewards/chosen"] - v["rewards/rejected"])
    out["rewards/accuracies"] = mean((v["rewards/chosen"] > v["rewards/rejected"]).float())
    for k in ("logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio"):
        if k in v:
            out[k] = mean(v[k])
    return out


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
def _check_pairs(hidden, labels, pair_index, cu_seqlens, ref_logp_sums, config, num_pairs):
    """(pair_index (P, 2) int64, sequence id of every token (N,) or None for padded rows, S)."""
    if not isinstance(config, PreferenceLossConfig):
        raise TypeError(f"config must be a PreferenceLossConfig, got {type(config).__name__}")
    check_float("hidden", hidden)
    check_int("labels", labels)
    dev = hidden.device
    if hidden.dim() == 2:
        if cu_seqlens is None or pair_index is None:
            raise ValueError("packed input (hidden of shape (N, H)) needs cu_seqlens (S + 1,) and pair_index (P, 2)")
        check_cu_seqlens(cu_seqlens, hidden.shape[0], device=dev)
        n_seq = cu_seqlens.shape[0] - 1
        seq_of_token = torch.repeat_interleave(torch.arange(n_seq, device=dev), cu_seqlens.diff().long(),
                                               output_size=hidden.shape[0])  # fmt: skip
    elif hidden.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError(
                f"cu_seqlens is for packed (N, H) input; hidden is padded (B, T, H) = {tuple(hidden.shape)}"
            )
        n_seq = hidden.shape[0]
        seq_of_token = None
        if pair_index is None:
            if n_seq % 2:
                raise ValueError(f"padded input without pair_index needs an even batch (chosen rows then rejected "
                                 f"rows), got B = {n_seq}")  # fmt: skip
            half = torch.arange(n_seq // 2, device=dev)
            pair_index = torch.stack([half, half + n_seq // 2], 1)
    else:
        raise ValueError(f"hidden must be (N, H) packed or (B, T, H) padded, got shape {tuple(hidden.shape)}")
    check_int("pair_index", pair_index)
    if pair_index.device != dev:
        raise ValueError(f"pair_index is on {pair_index.device} but hidden is on {dev}")
    if pair_index.dim() != 2 or pair_index.shape[1] != 2:
        raise ValueError(
            f"pair_index must be (P, 2) (chosen, rejected sequence ids), got shape {tuple(pair_index.shape)}"
        )
    P = pair_index.shape[0]
    if P == 0:
        raise ValueError("pair_index holds no pairs (P = 0)")
    if data_checks_enabled(pair_index):
        lo, hi = int(pair_index.min()), int(pair_index.max())  # host sync, with the other data checks
        if lo < 0 or hi >= n_seq:
            raise ValueError(f"pair_index must hold sequence ids in [0, {n_seq}), got values in [{lo}, {hi}]")
    if config.needs_reference:
        if ref_logp_sums is None:
            raise ValueError(f"loss_type={config.loss_type!r} needs ref_logp_sums (P, 2): log pi_ref of the chosen "
                             "and the rejected response of every pair")  # fmt: skip
        check_float("ref_logp_sums", ref_logp_sums)
        if tuple(ref_logp_sums.shape) != (P, 2) or ref_logp_sums.device != dev:
            raise ValueError(f"ref_logp_sums must be ({P}, 2) on {dev}, got {tuple(ref_logp_sums.shape)} on "
                             f"{ref_logp_sums.device}")  # fmt: skip
    elif ref_logp_sums is not None:
        raise ValueError(f"loss_type={config.loss_type!r} is reference-free: ref_logp_sums must be None")
    if num_pairs is not None and (isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1):
        raise ValueError(f"num_pairs must be None or an int >= 1 (the pairs of the whole batch), got {num_pairs!r}")
    return pair_index.long(), seq_of_token, n_seq


def _sequence_sums(logp, labels, seq_of_token, n_seq, ignore_index):
    """(S,) float32 log-prob sums and (S,) response-token counts per sequence."""
    valid = (labels != ignore_index).reshape(-1)
    if seq_of_token is None:  # padded: a row is a sequence
        return logp.sum(-1), valid.view(labels.shape).sum(-1).to(logp.dtype)
    sums = logp.new_zeros(n_seq).index_add(0, seq_of_token, logp)
    counts = logp.new_zeros(n_seq).index_add(0, seq_of_token, valid.to(logp.dtype))
    return sums, counts


def _check_lengths(counts: torch.Tensor, pairs: torch.Tensor) -> None:
    if not data_checks_enabled(counts):
        return
    n = counts[pairs]  # (P, 2)
    if bool((n < 1).any()):  # host sync (see set_validation)
        p, side = (int(i) for i in (n < 1).nonzero()[0])
        raise ValueError(f"pair {p}: its {('chosen', 'rejected')[side]} response (sequence {int(pairs[p, side])}) has "
                         f"no labelled token (every label is ignore_index): an empty response has no log-prob")  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def linear_preference_loss(
    hidden: torch.Tensor,  # (N, H) packed or (B, T, H) padded, fp32 / bf16 / fp16
    weight: torch.Tensor,  # (V, H), dtype of hidden
    labels: torch.Tensor,  # (N,) / (B, T) integer, next-token targets; -100 on prompt and padding
    pair_index: torch.Tensor | None = None,  # (P, 2) int: (chosen, rejected) sequence ids
    cu_seqlens: torch.Tensor | None = None,  # (S + 1,) int, packed input only
    ref_logp_sums: torch.Tensor | None = None,  # (P, 2) log pi_ref(chosen), log pi_ref(rejected); dpo / ipo
    *,
    bias: torch.Tensor | None = None,  # (V,)
    config: PreferenceLossConfig = PreferenceLossConfig(),
    num_pairs: int | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    """A preference loss (``config.loss_type``: dpo, ipo, simpo, orpo; see ``pair_losses`` for the math and
    the papers) from the policy's last hidden states and its lm_head, never forming the (N, V) logits.

    ``labels[t]`` is the token predicted at position t (shifted by the caller), ``-100`` where nothing is
    scored. Returns ``(loss, metrics)``: ``loss`` is a float32 scalar, the sum of the per-pair losses divided by
    ``num_pairs`` (default: P; give the whole batch's pair count when one batch is split into micro-batches,
    so that their losses add up to the batch mean); ``metrics`` holds detached 0-d tensors with TRL's names
    (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
    ``logps/rejected``, and ``nll_loss`` / ``log_odds_ratio`` where they exist), means over these P pairs.
    Gradients flow to hidden, weight and bias. A pair whose response has no labelled token raises ValueError
    (one host sync, skipped with ``fusedrl.kernels.set_validation(False)``)."""
    pairs, seq_of_token, n_seq = _check_pairs(hidden, labels, pair_index, cu_seqlens, ref_logp_sums, config,
                                              num_pairs)  # fmt: skip
    logp = linear_logprobs(hidden, weight, labels, bias=bias, temperature=config.temperature,
                           ignore_index=IGNORE_INDEX, chunk_size=chunk_size, backend=backend)  # fmt: skip
    if seq_of_token is not None:
        logp = logp.reshape(-1)
    sums, counts = _sequence_sums(logp, labels, seq_of_token, n_seq, IGNORE_INDEX)
    _check_lengths(counts, pairs)
    ref = None if ref_logp_sums is None else ref_logp_sums.float()
    loss, values = pair_losses(sums[pairs[:, 0]], sums[pairs[:, 1]], counts[pairs[:, 0]], counts[pairs[:, 1]],
                               None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
                               config)  # fmt: skip
    total = loss.sum()
    return total / (num_pairs or pairs.shape[0]), _metrics(total, values, pairs.shape[0])


def linear_preference_loss_ref(hidden, weight, labels, pair_index=None, cu_seqlens=None, ref_logp_sums=None, *,
                               bias=None, config=PreferenceLossConfig(), num_pairs=None):  # fmt: skip
    """Eager reference: the full (N, V) logits (``linear_logprobs_ref``), masked per-sequence sums by a dense
    (S, N) membership matrix, then ``pair_losses`` -- in float64 when the inputs are float64 (the tests'
    ground truth), float32 otherwise. Same arguments and returns as ``linear_preference_loss``."""
    pairs, seq_of_token, n_seq = _check_pairs(hidden, labels, pair_index, cu_seqlens, ref_logp_sums, config,
                                              num_pairs)  # fmt: skip
    logp = linear_logprobs_ref(hidden, weight, labels, bias=bias, temperature=config.temperature)
    valid = (labels != IGNORE_INDEX).to(logp.dtype)
    if seq_of_token is None:
        sums, counts = logp.sum(-1), valid.sum(-1)
    else:
        member = (seq_of_token[None, :] == torch.arange(n_seq, device=logp.device)[:, None]).to(logp.dtype)
        sums, counts = member @ logp, member @ valid
    _check_lengths(counts, pairs)
    ref = None if ref_logp_sums is None else ref_logp_sums.to(logp.dtype)
    loss, values = pair_losses(sums[pairs[:, 0]], sums[pairs[:, 1]], counts[pairs[:, 0]], counts[pairs[:, 1]],
                               None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
                               config)  # fmt: skip
    total = loss.sum()
    return total / (num_pairs or pairs.shape[0]), _metrics(total, values, pairs.shape[0])
