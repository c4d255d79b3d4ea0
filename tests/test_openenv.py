"""A real OpenEnv environment server (openenv-core) end to end: the server runs on 127.0.0.1 for the test's
duration, the trainer plays episodes against it through ``openenv_adapter`` and trains a step on them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from fusedrl.engine.models import build_causal_lm
from fusedrl.engine.tokenizer import build_char_tokenizer
from fusedrl.engine.trainer import PPOConfig, PPOTrainer

pytest.importorskip("openenv.core")
from fusedrl.engine.openenv_adapter import openenv_environment  # noqa: E402

PROMPTS = ["ab", "hello"]


@pytest.fixture
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("openenv_server.py")), str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, "the OpenEnv server exited"
            assert time.monotonic() < deadline, "the OpenEnv server did not start within 60 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_openenv_server_episodes_train_a_step(server):
    tok = build_char_tokenizer()
    cfg = PPOConfig(advantage_estimator="reinforce++", max_turns=3, max_new_tokens=4, prompts_per_step=2,
                    samples_per_prompt=2, rollout_backend="hf", progress=False)  # fmt: skip
    torch.manual_seed(0)
    policy = build_causal_lm("tiny-llama", vocab_size=len(tok), seed=0)
    trainer = PPOTrainer(policy, tok, None, cfg, environment_factory=openenv_environment(server))
    before = [p.detach().clone() for p in policy.parameters()]
    m = trainer.step(PROMPTS)
    # Every episode: two policy turns, the server's observation between them, ended by the server (done).
    assert m["episode/turns"] == 2.0 and m["episode/truncated_frac"] == 0.0
    ok = tok.encode(" ok ", add_special_tokens=False)
    buf = trainer.buffer
    offsets, tokens, mask = np.asarray(buf.offsets()), np.asarray(buf.tokens()), np.asarray(buf.response_mask())
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        prompt = tok.encode(PROMPTS[i // 2], add_special_tokens=False)
        m_i, t_i = mask[a:b], tokens[a:b]
        env = np.flatnonzero(m_i == 0)
        env = env[env >= len(prompt)].tolist()  # the observation after the first turn
        assert env and t_i[env].tolist() == ok and m_i[env[-1] + 1] == 1, i
    # The server's reward: the reset row's prompt length (the row reached the server) plus the two turns; they
    # differ between prompts, so reinforce++'s batch baseline leaves a gradient.
    assert m["rollout/reward_mean"] == pytest.approx(np.mean([len(p) + 2 for p in PROMPTS]))
    assert np.isfinite(m["loss/policy"]) and m["policy/grad_norm"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, policy.parameters()))
