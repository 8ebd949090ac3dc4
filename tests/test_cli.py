"""The CLI as a user meets it: exit codes, one-line errors on stderr, clean stdout."""

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qwen_mobile.cli import app

runner = CliRunner()


def run_cli(*args):
    """The installed entry point in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "qwen_mobile", *args], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result, *fragments):
    assert result.exit_code if hasattr(result, "exit_code") else result.returncode
    stderr = result.stderr.strip()
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_info_json_on_the_embedded_model():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"]["linear_attention"] == 6 and summary["layers"]["full_attention"] == 2
    assert summary["layers"]["pattern"] == "LLLFLLLF"
    assert summary["tied_embeddings"] is True
    assert summary["recurrent_state_bytes_per_sequence"] > 0


def test_info_reports_skipped_vision_tower(random_checkpoints):
    result = runner.invoke(app, ["info", str(random_checkpoints["multimodal"][0])])
    assert result.exit_code == 0, result.output
    assert "vision tower" in result.stdout


def test_generate_prints_only_the_continuation():
    result = run_cli("generate", "--prompt", "ROMEO:\n", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and not result.stdout.startswith("ROMEO:")
    # the speed goes to stderr, after the text: "ROMEO:\n" is 3 tokens, 12 new tokens take 12 decode steps
    assert re.search(r"prompt: 3 tokens in [\d.]+ s \([\d.]+ tokens/s\); decode: 12 steps, [\d.]+ tokens/s", result.stderr)


def test_generate_greedy_is_deterministic_and_sampling_differs():
    greedy = [runner.invoke(app, ["generate", "-p", "KING:", "-n", "16"]).stdout for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = {runner.invoke(app, ["generate", "-p", "KING:", "-n", "16", "--temperature", "1.5",
                                   "--seed", str(seed)]).stdout for seed in range(3)}
    assert len(sampled) > 1


def test_chat_prompt_uses_the_template():
    result = runner.invoke(app, ["generate", "-p", "Speak", "-n", "4", "--chat"])
    assert result.exit_code == 0, result.output


def test_prompt_longer_than_context_is_a_one_line_error():
    result = run_cli("generate", "--prompt", "word " * 100, "--max-context", "16")
    assert result.returncode == 2
    assert_one_line_error(result, "--prompt", "--max-context")


def test_unknown_backend_names_the_flag():
    result = run_cli("export", "--backend", "onnx")
    assert result.returncode == 2
    assert_one_line_error(result, "--backend", "onnx")


@pytest.mark.parametrize("args,fragment", [
    (["info", "/nonexistent/model"], "/nonexistent/model"),
    (["fixture", "--shape", "70b", "--out", "unused"], "--shape"),
])
def test_bad_input_is_a_one_line_error(args, fragment):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert_one_line_error(result, fragment)


def test_bad_config_through_the_cli(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    result = run_cli("info", str(tmp_path))
    assert result.returncode == 2
    assert_one_line_error(result, "config.json", "model_type")
