"""Models with a scalar head: the critic (``ValueModel``: a causal LM's body with a value head, ``V(s_t)`` at every
token) and the reward model's head read padding-free (``score_packed``: the score at each sequence's last token)."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .attention import is_packed_attention
from .models import backbone_of, hidden_states, is_peft_model, model_attention


class ValueModel(nn.Module):
    """Critic: a causal LM's body with a scalar head, ``V(s_t) = w . h_t + b`` at every token."""

    HEAD_FILE = "value_head.pt"
    BACKBONE_DIR = "backbone"

    def __init__(self, backbone: nn.Module, *, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        std = getattr(backbone.config, "initializer_range", 0.02)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Small weights and a zero bias: initial values are near 0, so early advantages are not dominated
            # by an arbitrary critic.
            nn.init.normal_(self.value_head.weight, std=std)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(device=next(backbone.parameters()).device)

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_causal_lm(cls, policy: nn.Module, *, seed: int = 0) -> ValueModel:
        """A critic initialised from (a deep copy of) ``policy``'s body: it shares no parameters with it. A LoRA
        policy's critic is its base body without the adapters, fully trained (a plain transformers body, so it
        saves and loads as one)."""
        if is_peft_model(policy):
            return cls(backbone_of(copy.deepcopy(policy).unload()), seed=seed)
        return cls(copy.deepcopy(backbone_of(policy)), seed=seed)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) integer; (1, N) when packed
        position_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) padding mask, unpacked input only
        **attn_kwargs,
    ) -> torch.Tensor:
        """Values (B, T) float32, one per token. Packed input: pass ``position_ids`` and ``cu_seq_lens_q/k``,
        ``max_length_q/k`` after ``use_packed_attention(value_model)``."""
        h = hidden_states(self, input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          **attn_kwargs)  # fmt: skip
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``directory/backbone`` (transformers format) and ``directory/value_head.pt``, the head written to a
        temporary file first and renamed so a crash never leaves a half-written head behind."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.backbone.save_pretrained(os.path.join(directory, self.BACKBONE_DIR))
        path = os.path.join(directory, self.HEAD_FILE)
        tmp = f"{path}.tmp.{os.getpid()}"
        state = {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ValueModel:
        """Load what ``save_pretrained`` wrote. The attention implementation is not saved: call
        ``use_packed_attention`` again on the loaded model."""
        from transformers import AutoModel

        directory = os.fspath(directory)
        body_dir = os.path.join(directory, cls.BACKBONE_DIR)
        head_path = os.path.join(directory, cls.HEAD_FILE)
        for p in (body_dir, head_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"ValueModel.from_pretrained: {p} does not exist (expected what "
                                        "ValueModel.save_pretrained writes)")  # fmt: skip
        backbone = AutoModel.from_pretrained(body_dir, local_files_only=True)
        model = cls(backbone)
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        model.value_head.load_state_dict(state)
        return model.eval()


def score_head_of(reward_model: nn.Module) -> nn.Module:
    """The classification head of a sequence-classification model (``.score`` or ``.classifier``)."""
    for attr in ("score", "classifier"):
        head = getattr(reward_model, attr, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"reward model {type(reward_model).__name__} has no .score or .classifier head")


def score_packed(
    reward_model: nn.Module,
    input_ids: torch.Tensor,  # (1, N) integer: B sequences packed back to back
    position_ids: torch.Tensor,  # (1, N) restarting at 0 for each sequence
    cu_seqlens: torch.Tensor,  # (B+1,) int32, leading 0
    max_length: int | None = None,
) -> torch.Tensor:
    """Reward of each packed sequence, ``(B,)`` float32: one padding-free forward of the body, then the score
    head applied to the hidden state of each sequence's last token (``cu_seqlens[1:] - 1``). The model must
    have been switched with ``use_packed_attention``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be one packed row of shape (1, N), got {shape}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor (B+1,) with a leading 0, got {cu_seqlens!r}")
    if not is_packed_attention(reward_model):
        raise ValueError(
            f"score_packed needs packed attention but the reward model runs {model_attention(reward_model)!r}: "
            "call fusedrl.engine.attention.use_packed_attention(reward_model) first"
        )
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths <= 0).any()):  # host sync: an empty sequence has no last token to score
        raise ValueError(f"every packed sequence needs at least one token; cu_seqlens {cu_seqlens.tolist()}")
    if max_length is None:
        max_length = int(lengths.max())  # host sync
    cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_length, max_length_k=max_length)
    h = hidden_states(reward_model, input_ids=input_ids, position_ids=position_ids, **kw)  # (1, N, H)
    last = h[0, cu[1:].long() - 1]  # (B, H)
    head = score_head_of(reward_model)
    return head(last).squeeze(-1).float()
