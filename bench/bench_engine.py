"""End-to-end PPO step benchmark: rollout, score, advantages and update of one ``PPOTrainer.step`` on a tiny
preset and on the ~100M-parameter ``llama-100m``, time per phase, tokens/s and peak memory.

    python bench/bench_engine.py                       # GPU if present (bf16), else CPU (fp32)
    python bench/bench_engine.py --device cpu --quick  # tiny preset only, a few steps (smoke test)
    python bench/bench_engine.py --presets llama-100m --steps 10 --new-tokens 128

Providers: ``fusedrl[triton]`` (the fused kernels; CUDA only) and ``fusedrl[torch]`` (the same trainer
on the PyTorch reference ops), so the kernels' share of a whole step is visible. Every step runs the full
PPO pipeline: critic (GAE), frozen reference, KL in the reward. Writes bench/results/engine-<cpu|cuda>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusedrl.engine.models import PRESETS, build_causal_lm
from fusedrl.engine.tokenizer import DEFAULT_CHARS, SPECIAL_TOKENS, build_char_tokenizer
from fusedrl.engine.trainer import PPOConfig, PPOTrainer

from bench.common import write_results

PHASES = ("rollout", "score", "advantages", "update")


def tokenizer_for(vocab_size: int):
    """A character tokenizer with exactly ``vocab_size`` ids (code points from U+4E00 past the default
    characters), so that every id a random-weight model samples decodes to something. The UTF-16 surrogates
    (U+D800..U+DFFF, reached past a ~35K vocabulary) are skipped: the tokenizers library cannot encode them."""
    extra = vocab_size - len(SPECIAL_TOKENS) - len(DEFAULT_CHARS)
    if extra < 0:
        return build_char_tokenizer()
    code_points = (c for c in range(0x4E00, 0x110000) if not 0xD800 <= c < 0xE000)
    return build_char_tokenizer(DEFAULT_CHARS + "".join(chr(next(code_points)) for _ in range(extra)))


def length_reward(prompts, completions):
    """Cheap and non-constant, so the advantages are not all zero."""
    return [float(len(set(c))) for c in completions]


def _quantile(sorted_ms: list[float], f: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(f * (len(sorted_ms) - 1) + 0.5))]


def run_case(preset: str, device: str, dtype: torch.dtype, backend: str, *, prompts_per_step: int,
             samples: int, prompt_len: int, new_tokens: int, steps: int) -> list[dict]:  # fmt: skip
    vocab = PRESETS[preset].fields["vocab_size"]
    tok = tokenizer_for(vocab)
    policy = build_causal_lm(preset, vocab_size=len(tok), seed=0, dtype=dtype).to(device)
    cfg = PPOConfig(
        prompts_per_step=prompts_per_step, samples_per_prompt=samples, max_new_tokens=new_tokens,
        advantage_estimator="gae", ppo_epochs=1, num_minibatches=1, max_tokens_per_microbatch=max(
            4096, prompt_len + new_tokens), backend=backend, progress=False, learning_rate=1e-6,
        critic_learning_rate=1e-6,
    )  # fmt: skip
    trainer = PPOTrainer(policy, tok, length_reward, cfg)
    g = torch.Generator().manual_seed(0)
    chars = DEFAULT_CHARS.replace(" ", "")
    prompts = ["".join(chars[i] for i in torch.randint(len(chars), (prompt_len,), generator=g).tolist())
               for _ in range(prompts_per_step)]  # fmt: skip
    torch.manual_seed(0)
    trainer.step(prompts)  # warm-up: allocator, kernel compilation / autotuning
    rows = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append(trainer.step(prompts))
    n_params = sum(p.numel() for p in policy.parameters())
    shape = f"{preset} ({n_params / 1e6:.1f}M) B={prompts_per_step * samples} P={prompt_len} R<={new_tokens}"
    records = []
    for phase in (*PHASES, "step"):
        key = f"perf/{phase}_s" if phase != "step" else "perf/step_s"
        ms = sorted(r[key] * 1e3 for r in rows)
        rec = {"op": "ppo_step", "shape": shape, "dtype": str(dtype).replace("torch.", ""),
               "provider": f"fusedrl[{backend}]", "pass": phase, "median_ms": statistics.median(ms),
               "p20_ms": _quantile(ms, 0.2), "p80_ms": _quantile(ms, 0.8)}  # fmt: skip
        if phase == "step":
            rec["tokens_per_s"] = statistics.median(r["perf/tokens_per_s"] for r in rows)
            rec["peak_mem_gb"] = max(r["perf/peak_mem_gb"] for r in rows)
            rec["response_len"] = statistics.mean(r["rollout/response_len"] for r in rows)
        records.append(rec)
    del trainer, policy
    if device == "cuda":
        torch.cuda.empty_cache()
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--presets", default="tiny-llama,llama-100m", help="comma-separated preset names")
    ap.add_argument("--quick", action="store_true", help="tiny preset only, 2 measured steps")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per case (default 5 GPU, 3 CPU)")
    ap.add_argument("--prompts-per-step", type=int, default=None)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="max_new_tokens (default 128 GPU, 16 CPU)")
    args = ap.parse_args(argv)
    device = args.device
    gpu = device == "cuda"
    presets = ["tiny-llama"] if args.quick else args.presets.split(",")
    steps = args.steps or (2 if args.quick else 5 if gpu else 3)
    new_tokens = args.new_tokens or (128 if gpu else 16)
    prompts_per_step = args.prompts_per_step or (16 if gpu else 2)
    dtype = torch.bfloat16 if gpu else torch.float32
    backends = ["triton", "torch"] if gpu else ["torch"]
    records = []
    t0 = time.perf_counter()
    for preset in presets:
        for backend in backends:
            recs = run_case(preset, device, dtype, backend, prompts_per_step=prompts_per_step,
                            samples=args.samples_per_prompt, prompt_len=args.prompt_len, new_tokens=new_tokens,
                            steps=steps)  # fmt: skip
            step = recs[-1]
            print(f"{preset:>12} {backend:>6}: step {step['median_ms']:.1f} ms, {step['tokens_per_s']:.0f} tokens/s, "
                  f"peak {step['peak_mem_gb']:.2f} GB", flush=True)  # fmt: skip
            records += recs
    write_results("engine", device, records, extra={
        "steps": steps, "max_new_tokens": new_tokens, "prompts_per_step": prompts_per_step,
        "samples_per_prompt": args.samples_per_prompt, "prompt_len": args.prompt_len,
        "wall_s": time.perf_counter() - t0,
        "note": "perf/peak_mem_gb is the process RSS peak on CPU and max_memory_allocated on CUDA",
    })  # fmt: skip


if __name__ == "__main__":
    main()
