"""The demo apps' engine-independent Java core (android_demo/core), compiled and tested with the
JDK and JUnit 5 that .ci/run installs: the tokenizer against `tokenizers`, the generation loop
replaying the Python runner's logits, the chat format against the Jinja template."""

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "android_demo" / "core" / "run_tests.sh"


def test_the_java_core_passes_its_junit_tests():
    assert shutil.which("javac"), "no JDK: apt-get install -y openjdk-17-jdk-headless junit5 (see .ci/run)"
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert summary.startswith("java core:") and " 0 failed" in summary, summary
