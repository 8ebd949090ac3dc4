"""The embedded qwen3.5-tiny: small, loadable by transformers, and a real language model."""

import json

import torch
import transformers

from qwen_mobile.checkpoint import EMBEDDED_MODEL, load
from qwen_mobile.corpus import load_corpus, split_corpus
from qwen_mobile.evaluate import perplexity, unigram_perplexity
from qwen_mobile.generate import load_tokenizer

MAX_BYTES = 8 * 1024 * 1024
HELD_OUT_TOKENS = 8192  # a slice of the held-out split keeps the test quick


def test_fits_in_8_mb_and_is_bf16_in_hf_layout():
    files = {p.name: p for p in EMBEDDED_MODEL.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert name in files
    assert sum(p.stat().st_size for p in files.values()) <= MAX_BYTES
    config = json.loads(files["config.json"].read_text())
    assert config["model_type"] == "qwen3_5_text" and config["tie_word_embeddings"] is True
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]
    assert config["linear_num_value_heads"] == 2 * config["linear_num_key_heads"]
    model = load().model
    assert model.embed_tokens.weight.dtype == torch.float32  # loaded up from bf16 storage
    assert transformers.AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL) is not None


def test_tokenizer_carries_qwen_special_tokens_and_chat_template():
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert 4096 <= len(tokenizer) <= 8192
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_held_out_perplexity_is_far_below_unigram():
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    train, held_out = split_corpus(load_corpus())
    eval_tokens = tokenizer.encode(held_out, add_special_tokens=False)[:HELD_OUT_TOKENS]
    model_ppl = perplexity(load().model, eval_tokens)
    unigram_ppl = unigram_perplexity(tokenizer.encode(train, add_special_tokens=False), eval_tokens, len(tokenizer))
    assert model_ppl < unigram_ppl / 4, (model_ppl, unigram_ppl)
