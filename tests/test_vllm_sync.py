"""The weights the vLLM backend pushes (engine/vllm_sync.py), without vLLM: a LoRA policy's merged weights are
peft's merge_and_unload on a copy while the trained model stays unmerged; its base weights are the model's
without adapters; the adapter-or-merged decision names why."""

from __future__ import annotations

import pytest
import torch
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.vllm_sync import adapter_limits, engine_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def lora_policy(seed=0, r=4, **kw):
    pytest.importorskip("peft")
    from fusedrl.engine.models import apply_lora

    policy = apply_lora(build_causal_lm("tiny-llama", vocab_size=64, seed=seed), r=r, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # lora_B starts at zero: give the adapters a real effect
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return policy


def test_plain_policy_is_its_state_dict():
    model = build_causal_lm("tiny-llama", vocab_size=64, seed=0)
    got = dict(engine_weights(model, merge_lora=True))
    want = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_lora_merged_and_base_weights():
    import copy

    policy = lora_policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = dict(engine_weights(policy, merge_lora=True))
    base = dict(engine_weights(policy, merge_lora=False))
    reference = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys() == base.keys()
    changed = 0
    for k, want in reference.items():
        torch.testing.assert_close(merged[k], want, rtol=1e-6, atol=1e-6, msg=k)
        changed += not torch.equal(merged[k], base[k])
    assert changed == 2 * 7, changed  # every linear layer of both decoder layers carries an adapter
    after = policy.state_dict()  # the trained model is left as it was (no merge, no copy kept)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    unmerged = copy.deepcopy(policy).unload().state_dict()
    assert all(torch.equal(base[k], unmerged[k]) for k in unmerged)


def test_adapter_limits():
    assert adapter_limits(build_causal_lm("tiny-llama", vocab_size=64)) is None
    assert adapter_limits(lora_policy(r=8)) == (8, [])
    policy = lora_policy(r=4)
    policy.base_model.model.model.norm.weight.requires_grad_(True)
    rank, reasons = adapter_limits(policy)
    assert rank == 4 and "trained tensors besides the LoRA matrices" in reasons[0] and "norm" in reasons[0]


def test_sharded_weights_are_gathered_one_by_one_and_merged():
    """A parameter that is an FSDP2 shard (anything with ``full_tensor``) is given whole, gathered when its turn
    comes; a LoRA policy so sharded is pushed merged (peft saves an adapter from full tensors only)."""
    policy = lora_policy()
    calls = []
    sharded = {n: p for n, p in policy.named_parameters() if "lora_A" in n or n.endswith("norm.weight")}
    for name, p in sharded.items():
        p.full_tensor = lambda p=p, name=name: calls.append(name) or p.data * 1  # a "gathered" full copy
    merged = dict(engine_weights(policy, merge_lora=True))
    assert sorted(calls) == sorted(n for n in sharded if "lora_A" not in n)  # lora_A is read through the delta
    assert len(merged) == len(dict(engine_weights(build_causal_lm("tiny-llama", vocab_size=64), merge_lora=True)))
    rank, reasons = adapter_limits(policy)
    assert rank == 4 and reasons == ["FSDP-sharded weights"]
