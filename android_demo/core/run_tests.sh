#!/usr/bin/env bash
# The engine-independent Java core (android_demo/core): compile with javac, run the JUnit 5 tests
# with the console launcher. Needs a JDK 17 and JUnit 5 (Debian: apt-get install -y
# openjdk-17-jdk-headless junit5); JUNIT_CONSOLE may name another junit-platform-console-standalone jar.
# Exits non-zero when a test fails or none ran; the golden files are testdata/goldens
# (regenerate with scripts/app_goldens.py).
set -euo pipefail
cd "$(dirname "$0")"

JUNIT_CONSOLE="${JUNIT_CONSOLE:-/usr/share/java/junit-platform-console-standalone.jar}"
if [[ ! -f "$JUNIT_CONSOLE" ]]; then
    echo "run_tests.sh: $JUNIT_CONSOLE not found (apt-get install -y junit5)" >&2
    exit 2
fi
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT

javac -Xlint:all -Werror --release 17 -encoding UTF-8 -d "$build/main" $(find src/main/java -name '*.java')
javac -Xlint:all,-try -Werror --release 17 -encoding UTF-8 -d "$build/test" -cp "$build/main:$JUNIT_CONSOLE" \
    $(find src/test/java -name '*.java')

set +e
java -Dqwenmobile.testdata=testdata -jar "$JUNIT_CONSOLE" \
    --class-path "$build/main:$build/test" --scan-class-path --fail-if-no-tests \
    --disable-banner --disable-ansi-colors --details=tree --details-theme=ascii 2>&1 | tee "$build/out.txt"
status=${PIPESTATUS[0]}
set -e
passed=$(sed -n 's/.*\[ *\([0-9]*\) tests successful *\].*/\1/p' "$build/out.txt")
failed=$(sed -n 's/.*\[ *\([0-9]*\) tests failed *\].*/\1/p' "$build/out.txt")
echo "java core: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
