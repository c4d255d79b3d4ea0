"""Scoring a rollout: token-budget micro-batches packed padding-free, the response-token layout the stages
exchange tensors in, and the scoring forwards (policy / reference log-probs, critic values, reward scores).

Three index spaces, and the one object that translates between them:
- the buffer's flat token positions (the C++ store of record: packing, rank exchange, checkpoints);
- a micro-batch's packed rows: a packed forward predicts token j at the row *before* j, which is why a
  micro-batch keeps, for each row that carries a loss, the flat position of the token it predicts;
- the response tokens of the batch, r = 0..R-1 sequence by sequence: the layout every stage works in.
  ``ResponseLayout`` owns it; per-token tensors (log-probs, values, rewards, advantages, returns) pass
  between stages as (R,) float32 tensors on the training device, and a micro-batch reads and writes its
  share with ``layout.gather`` / ``layout.scatter``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fusedrl.kernels import linear_logprobs

from .heads import score_packed
from .models import hidden_states, output_head
from .packing import PackedBatch, RolloutBuffer, pack
from .rewards import check_rewards
from .sampling import eval_mode


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """(B,) counts -> (B+1,) int64 offsets with a leading 0."""
    cu = torch.zeros(len(counts) + 1, dtype=torch.long)
    cu[1:] = counts.cumsum(0)
    return cu


def _count_per_sequence(positions: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """How many of the sorted flat ``positions`` fall in each sequence of offsets ``cu`` (B+1,)."""
    counts = torch.zeros(len(cu) - 1, dtype=torch.long)
    return counts.index_add_(0, torch.bucketize(positions, cu[1:], right=True), torch.ones_like(positions))


class ResponseLayout:
    """The response tokens of a rollout buffer as one index space on the training device.

    ``flat_index`` (R,) CPU int64: each response token's flat buffer position, sequence by sequence;
    ``cu`` (B+1,) int64 on the device: per-sequence offsets into the R tokens; ``seq_index`` (R,): the sequence
    of every response token. Per-token stage tensors are (R,) in this order."""

    def __init__(self, buffer: RolloutBuffer, device: torch.device):
        mask = torch.from_numpy(np.asarray(buffer.response_mask())).bool()
        offsets = torch.from_numpy(np.asarray(buffer.offsets())).long()
        self.device = torch.device(device)
        self.flat_index = mask.nonzero().squeeze(1)
        counts = _count_per_sequence(self.flat_index, offsets)
        self.num_tokens, self.num_sequences = len(self.flat_index), len(counts)
        self.cu = _offsets(counts).to(self.device)
        self.seq_index = torch.repeat_interleave(torch.arange(len(counts)), counts).to(self.device)
        # Flat position -> response index (-1 for prompt tokens): how a micro-batch finds its rows' slots.
        self._of_flat = torch.full((len(mask),), -1, dtype=torch.long)
        self._of_flat[self.flat_index] = torch.arange(self.num_tokens)

    def index_of(self, flat_positions: torch.Tensor) -> torch.Tensor:
        """(M,) response indices, on the device, of response tokens given by their flat buffer positions."""
        idx = self._of_flat[flat_positions]
        if bool((idx < 0).any()):
            raise ValueError("index_of: some flat positions are not response tokens of this layout")
        return idx.to(self.device)

    def zeros(self) -> torch.Tensor:
        """A fresh (R,) float32 per-token tensor on the device."""
        return torch.zeros(self.num_tokens, dtype=torch.float32, device=self.device)

    def gather(self, values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """(M,) the micro-batch's share of a (R,) per-token tensor, in its loss-row order."""
        return values[mb.resp]

    def scatter(self, out: torch.Tensor, mb: MicroBatch, values: torch.Tensor) -> None:
        """Write a micro-batch's (M,) per-row values into its slots of the (R,) tensor ``out``."""
        out[mb.resp] = values.detach().to(out.dtype)

    def sequence_sum(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) per-sequence sums of a (R,) per-token tensor."""
        out = torch.zeros(self.num_sequences, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.seq_index, values)

    def to_buffer(self, buffer: RolloutBuffer, name: str, values: torch.Tensor) -> None:
        """Store a (R,) tensor in the buffer field ``name`` at its tokens' flat positions (one device -> host copy;
        prompt positions keep 0)."""
        field = torch.from_numpy(buffer.field(name))
        field.zero_()
        field[self.flat_index] = values.detach().float().cpu()

    def from_buffer(self, buffer: RolloutBuffer, name: str) -> torch.Tensor:
        """(R,) float32 on the device: the buffer field ``name`` at the response tokens."""
        return torch.from_numpy(np.asarray(buffer.field(name)))[self.flat_index].to(self.device)


class MicroBatch:
    """One packed micro-batch on the model's device: model inputs and the rows that carry a loss.

    ``rows`` (M,): packed rows whose next token is a response token; ``targets`` (M,): those tokens'
    flat buffer positions; ``resp`` (M,): their response indices in ``layout`` (None without one);
    ``labels`` (M,): their ids; ``cu_rows`` (b+1,): per-sequence offsets into ``rows`` (a sequence's response
    rows are contiguous)."""

    def __init__(self, buffer: RolloutBuffer, seq_ids: np.ndarray, device: torch.device,
                 layout: ResponseLayout | None = None):  # fmt: skip
        tokens = torch.from_numpy(np.asarray(buffer.tokens())).long()
        self.seq_ids = np.asarray(seq_ids, dtype=np.int64)  # buffer indices of the packed sequences, in order
        pb: PackedBatch = pack(buffer.offsets(), self.seq_ids, buffer.tokens())
        target = torch.from_numpy(pb.target_index)
        keep = target >= 0
        keep[keep.clone()] = torch.from_numpy(np.asarray(buffer.response_mask())).bool()[target[keep]]
        rows = keep.nonzero().squeeze(1)
        cu = torch.from_numpy(pb.cu_seqlens).long()

        self.num_sequences = len(self.seq_ids)
        self.num_loss_tokens = len(rows)
        self.max_seqlen = int(pb.max_seqlen)
        self.targets = target[rows]  # CPU: flat buffer positions
        self.resp = layout.index_of(self.targets) if layout is not None else None
        self.rows = rows.to(device)
        self.labels = torch.from_numpy(pb.labels)[rows].to(device)
        self.cu_rows = _offsets(_count_per_sequence(rows, cu)).to(device=device, dtype=torch.int32)
        self.input_ids = tokens[torch.from_numpy(pb.index)][None].to(device)  # (1, N)
        self.position_ids = torch.from_numpy(pb.position_ids)[None].to(device)  # (1, N)
        self.cu_seqlens = cu.to(device=device, dtype=torch.int32)  # (b+1,)
        self.attn_kwargs = {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                            "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}  # fmt: skip


def packed_hidden_states(model, mb: MicroBatch) -> torch.Tensor:
    """(M, H) last hidden states at the micro-batch's loss rows, every packed sequence attending only to itself."""
    return hidden_states(model, input_ids=mb.input_ids, position_ids=mb.position_ids, **mb.attn_kwargs)[0][mb.rows]


def token_logprobs(model, mb: MicroBatch, *, temperature: float, backend: str = "auto") -> torch.Tensor:
    """(M,) log-probs of the micro-batch's response tokens under ``model`` sampling at ``temperature``, through
    the fused linear log-prob op (no (N, V) logits); a logit scale in the model's config is folded in."""
    h = packed_hidden_states(model, mb)
    weight, bias, scale = output_head(model)
    return linear_logprobs(h, weight, mb.labels, bias=bias, temperature=temperature / scale, backend=backend)


@torch.no_grad()
def score_logprobs(model, micro_batches: list[MicroBatch], layout: ResponseLayout, *, temperature,
                   backend="auto") -> torch.Tensor:  # fmt: skip
    """(R,) float32 log-prob of every response token, on the layout's device."""
    out = layout.zeros()
    with eval_mode(model):
        for mb in micro_batches:
            layout.scatter(out, mb, token_logprobs(model, mb, temperature=temperature, backend=backend))
    return out


@torch.no_grad()
def score_values(critic, micro_batches: list[MicroBatch], layout: ResponseLayout) -> torch.Tensor:
    """(R,) float32 critic value of the state before every response token, on the layout's device."""
    out = layout.zeros()
    with eval_mode(critic):
        for mb in micro_batches:
            v = critic(mb.input_ids, position_ids=mb.position_ids, **mb.attn_kwargs)[0]
            layout.scatter(out, mb, v[mb.rows])
    return out


@torch.no_grad()
def score_reward_model(reward_model, micro_batches: list[MicroBatch], num_sequences: int) -> torch.Tensor:
    """(B,) float32 reward-model scores (read at each sequence's last token), in buffer order, on the CPU."""
    scores = torch.full((num_sequences,), math.nan, dtype=torch.float32)
    with eval_mode(reward_model):
        for mb in micro_batches:
            s = score_packed(reward_model, mb.input_ids, mb.position_ids, mb.cu_seqlens, max_length=mb.max_seqlen)
            scores[torch.from_numpy(mb.seq_ids)] = s.float().cpu()
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"reward model returned a non-finite score {scores[bad].item()} for sequence {bad}")
    return scores


def score_reward_fn(fn: Callable, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """(B,) float32 scores from a Python reward callable, checked for count and finiteness."""
    rewards = fn(list(prompts), list(completions))
    return check_rewards(rewards, len(completions), completions=completions, source="reward function")
