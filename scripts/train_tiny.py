#!/usr/bin/env python
"""Build "qwen3.5-tiny", the project's embedded default model.

A ~3.5M-parameter model with the real Qwen3.5 text architecture (gated
DeltaNet linear attention interleaved with gated full attention), trained from
scratch on the training split of calibration/tinyshakespeare.txt with a 4096-
entry byte-level BPE tokenizer. It is small enough to ship inside the package
and to exercise every export backend end to end in tests, while still
producing recognisable text.

The script is seeded and single-process; rerunning it with the same flags on
the same software versions reproduces the model. It writes into --out:

    config.json, generation_config.json, model.safetensors (bf16),
    tokenizer.json, tokenizer_config.json, training_report.json

Usage (from the repository root):

    python scripts/train_tiny.py
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
# Lets the script run as a plain file without the package being installed.
sys.path.insert(0, str(REPO_ROOT))

from qwen_mobile.corpus import load_corpus, split_corpus  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "qwen_mobile" / "assets" / "qwen3.5-tiny"

VOCAB_SIZE = 4096
# Ids 0, 1, 2 are fixed: Qwen-style chat formatting and the exporters rely on them.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_ID, IM_START_ID, IM_END_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]

REPORT_FILE = "training_report.json"

SAMPLE_PROMPTS = ["ROMEO:\n", "First Citizen:\n"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=1234)
    # The training split is only ~308K tokens and this model memorises it quickly: in a
    # 1600-step run the held-out perplexity bottomed out near step 400 (~5 epochs) and had
    # tripled by step 1000. So the budget is capped by overfitting, not by wall time
    # (one step of 16 x 256 tokens takes ~1.2 s on 2 CPU cores).
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=100, help="log held-out loss every N steps (0: never)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_tokenizer(train_text: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any UTF-8 input is encodable even if unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([train_text], trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, token
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def model_config() -> transformers.Qwen3_5TextConfig:
    return transformers.Qwen3_5TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=192,
        intermediate_size=320,
        num_hidden_layers=8,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        attention_bias=False,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=48,
        linear_conv_kernel_dim=4,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # 64 * 0.25 = 16 rotary dims -> 8 frequencies, split 3/3/2 over the (t, h, w) mrope axes.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
        bos_token_id=None,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay from --lr down to --min-lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    # Decay only matrices (incl. the tied embedding and conv kernels); norms, A_log and
    # dt_bias are scale/gate parameters that weight decay would pull toward meaningless values.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )


def windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Consecutive, non-overlapping windows of ``seq_len`` tokens (the last may be shorter)."""
    return [w for w in ids.split(seq_len) if len(w) >= 2]


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Summed next-token NLL over held-out windows, and the number of predicted tokens.

    Each window is scored on its own, so its first token is context only.
    """
    model.eval()
    total, count = 0.0, 0
    for window in windows(ids, seq_len):
        logits = model(input_ids=window[None]).logits[0].float()
        total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    return total, count


def unigram_nll(train_ids: torch.Tensor, heldout_ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Add-one-smoothed unigram NLL on exactly the positions ``heldout_nll`` scores."""
    counts = torch.bincount(train_ids, minlength=VOCAB_SIZE).double()
    log_probs = torch.log((counts + 1.0) / (counts.sum() + VOCAB_SIZE))
    targets = torch.cat([w[1:] for w in windows(heldout_ids, seq_len)])
    return -log_probs[targets].sum().item(), len(targets)


def train(model: torch.nn.Module, train_ids: torch.Tensor, heldout_ids: torch.Tensor, args) -> dict:
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    max_start = len(train_ids) - args.seq_len - 1
    tokens_per_step = args.batch_size * args.seq_len
    recent_losses: list[float] = []
    heldout_curve = []
    start = last_log = time.time()

    for step in range(args.steps):
        model.train()
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])
        inputs, targets = batch[:, :-1], batch[:, 1:]

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        recent_losses = (recent_losses + [loss.item()])[-50:]

        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            now = time.time()
            steps_since = done % args.log_every or args.log_every
            log(
                f"step {done:5d}/{args.steps}  loss {loss.item():.4f}  lr {lr_at(step, args):.2e}  "
                f"{steps_since * tokens_per_step / (now - last_log):,.0f} tok/s  elapsed {now - start:,.0f}s"
            )
            last_log = now
        if args.eval_every and (done % args.eval_every == 0 or done == args.steps):
            nll, count = heldout_nll(model, heldout_ids, args.seq_len)
            heldout_curve.append({"step": done, "loss": nll / count, "ppl": math.exp(nll / count)})
            log(f"step {done:5d}  held-out loss {nll / count:.4f}  ppl {math.exp(nll / count):.1f}")
            last_log = time.time()

    return {
        "final_train_loss": loss.item(),
        "final_train_loss_mean_last_50": sum(recent_losses) / len(recent_losses),
        "train_wall_time_s": time.time() - start,
        "heldout_curve_during_training": heldout_curve,
    }


def save_model(model: transformers.PreTrainedModel, out: Path) -> None:
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[IM_END_ID, PAD_ID], pad_token_id=PAD_ID, do_sample=False
    )
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    stray = sorted(p.name for p in out.iterdir() if p.name not in [*MODEL_FILES, REPORT_FILE])
    assert not stray, f"save_pretrained wrote unexpected files: {stray}"


def evaluate(out: Path, train_ids: torch.Tensor, heldout_text: str, heldout_ids: torch.Tensor, args) -> dict:
    """Score the model exactly as shipped: reload the bf16 files from disk, upcast to fp32."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_text", config["model_type"]
    assert config["architectures"] == ["Qwen3_5ForCausalLM"], config["architectures"]

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", repr(prompt)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert prompt_ids[0] == IM_START_ID and prompt_ids.count(IM_END_ID) == 1, prompt_ids
    paragraph = heldout_text[:2000]
    assert tokenizer.decode(tokenizer(paragraph)["input_ids"]) == paragraph

    assert tokenizer(heldout_text, verbose=False)["input_ids"] == heldout_ids.tolist()
    model_total, count = heldout_nll(model, heldout_ids, args.seq_len)
    unigram_total, unigram_count = unigram_nll(train_ids, heldout_ids, args.seq_len)
    assert unigram_count == count

    samples = {}
    for text in SAMPLE_PROMPTS:
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=100, do_sample=False)
        samples[text] = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])

    return {
        "heldout_tokens_scored": count,
        "heldout_perplexity": math.exp(model_total / count),
        "unigram_baseline_perplexity": math.exp(unigram_total / count),
        "greedy_samples": samples,
    }


def main() -> None:
    args = parse_args()
    wall_start = time.time()
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    train_text, heldout_text = split_corpus(load_corpus())
    tokenizer = train_tokenizer(train_text)
    save_tokenizer(tokenizer, args.out)
    train_ids = torch.tensor(tokenizer.encode(train_text).ids)
    heldout_ids = torch.tensor(tokenizer.encode(heldout_text).ids)
    log(f"train split: {len(train_text):,} chars -> {len(train_ids):,} tokens; held-out: {len(heldout_ids):,} tokens")

    model = transformers.Qwen3_5ForCausalLM(model_config())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params:,}")

    training = train(model, train_ids, heldout_ids, args)
    save_model(model, args.out)
    saved_bytes = sum((args.out / name).stat().st_size for name in MODEL_FILES)
    assert saved_bytes <= 8_000_000, saved_bytes

    log("evaluating the saved model")
    evaluation = evaluate(args.out, train_ids, heldout_text, heldout_ids, args)
    report = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_tokens": len(train_ids),
        "lr": args.lr,
        "min_lr": args.min_lr,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "threads": args.threads,
        "parameter_count": n_params,
        "saved_dir_bytes": saved_bytes,
        **training,
        **evaluation,
        "total_wall_time_s": time.time() - wall_start,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (args.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(json.dumps({k: v for k, v in report.items() if k != "heldout_curve_during_training"}, indent=2))


if __name__ == "__main__":
    main()
