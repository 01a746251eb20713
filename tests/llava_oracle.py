"""LLaVA's own code and LLaMA's real vocabulary, as test-only oracles (tests/test_parity.py).

    oracle = llava_oracle.load()          # installs them on first use (tests/oracles/install.sh)
    oracle.tokenizer_image_token(text, tokenizer)     # LLaVA's function itself
    tok = llama_tokenizer(oracle, legacy=False)       # LLaMA's 32,000 pieces + <image> (32000)

The llava-torch package (1.2.2.post1) cannot be imported whole under the pinned transformers
(its trainer imports names transformers 5 removed), so `llava` is registered as a bare package:
`llava.mm_utils` and `llava.conversation` import unchanged, and `preprocess_v1` is compiled from
the package's own `llava/train/train.py` source (that function and the version test above it,
nothing transcribed). The vocabulary is the one npm's llama-tokenizer-js ships (LLaMA's
tokenizer.json pieces and merges, base64-encoded); as a `tokenizers` BPE with byte fallback it
is LLaMA's tokenizer, built by transformers' own `LlamaTokenizer`.
"""

from __future__ import annotations

import ast
import base64
import importlib
import os
import re
import struct
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "tests" / "oracles" / "install.sh"
CACHE = Path(os.environ.get("DALIPIPE_ORACLES", ROOT / ".oracles"))
UNREACHABLE = 3  # install.sh's exit status when PyPI or npm cannot be reached
IMAGE_SLOT_ID = 32000  # llava-hf's <image>: the first id after LLaMA's 32,000 pieces


@dataclass
class Oracle:
    tokenizer_image_token: object  # llava.mm_utils.tokenizer_image_token
    conv_templates: dict  # llava.conversation.conv_templates
    preprocess_v1: object  # llava/train/train.py preprocess_v1, as in the package
    default_conversation: types.SimpleNamespace  # what preprocess_v1 reads; set per test
    IMAGE_TOKEN_INDEX: int
    IGNORE_INDEX: int
    vocabulary_js: Path


def install() -> Path:
    """The oracle cache, installed if missing; skips only when no registry can be reached."""
    if not (CACHE / "complete").exists():
        env = {**os.environ, "PYTHON": sys.executable}
        done = subprocess.run(["bash", str(INSTALL), str(CACHE)], env=env, capture_output=True)
        message = done.stderr.decode(errors="replace").strip()
        if done.returncode == UNREACHABLE:
            pytest.skip(f"LLaVA/LLaMA oracles not installed, registry unreachable: {message}")
        if done.returncode != 0:
            raise RuntimeError(f"{INSTALL} failed (exit {done.returncode}): {message}")
    return CACHE


def load() -> Oracle:
    cache = install()
    package_dir = cache / "llava" / "llava"
    if "llava" not in sys.modules:
        # a bare package: llava/__init__.py would import the model classes, which need old
        # transformers and are not under test
        package = types.ModuleType("llava")
        package.__path__ = [str(package_dir)]
        sys.modules["llava"] = package
    if Path(sys.modules["llava"].__path__[0]) != package_dir:
        raise RuntimeError(f"another 'llava' is imported: {sys.modules['llava'].__path__}")
    mm_utils = importlib.import_module("llava.mm_utils")
    conversation = importlib.import_module("llava.conversation")
    constants = importlib.import_module("llava.constants")
    conversation_lib = types.SimpleNamespace(
        default_conversation=None, SeparatorStyle=conversation.SeparatorStyle
    )
    namespace = _compile_from(
        package_dir / "train" / "train.py",
        names={"preprocess_v1", "IS_TOKENIZER_GREATER_THAN_0_14"},
        globals_={
            "conversation_lib": conversation_lib,
            "tokenizer_image_token": mm_utils.tokenizer_image_token,
            "IGNORE_INDEX": constants.IGNORE_INDEX,
        },
    )
    return Oracle(
        tokenizer_image_token=mm_utils.tokenizer_image_token,
        conv_templates=conversation.conv_templates,
        preprocess_v1=namespace["preprocess_v1"],
        default_conversation=conversation_lib,
        IMAGE_TOKEN_INDEX=constants.IMAGE_TOKEN_INDEX,
        IGNORE_INDEX=constants.IGNORE_INDEX,
        vocabulary_js=cache / "llama-tokenizer-js" / "llama-tokenizer.js",
    )


def _compile_from(path: Path, names: set[str], globals_: dict) -> dict:
    """Run the top-level definitions `names` of a source file, as written there."""
    import tokenizers
    import torch
    import transformers
    from packaging import version

    tree = ast.parse(path.read_text(), filename=str(path))
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and {getattr(t, "id", "") for t in node.targets} & names:
            keep.append(node)
    found = {getattr(n, "name", None) or n.targets[0].id for n in keep}
    if found != names:
        raise RuntimeError(f"{path}: missing {sorted(names - found)}")
    namespace = {
        "torch": torch,
        "transformers": transformers,
        "tokenizers": tokenizers,
        "version": version,
        "Dict": dict,
        **globals_,
    }
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def llama_vocabulary(js_file: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """LLaMA's pieces (in id order) and merges (in priority order) from llama-tokenizer.js:
    the pieces base64 of '\\n'-joined UTF-8, the merges base64 of uint16 piece-id pairs."""
    source = js_file.read_text()

    def constant(name: str) -> bytes:
        match = re.search(rf'const {name} = "([A-Za-z0-9+/=]+)"', source)
        if match is None:
            raise RuntimeError(f"{js_file}: no constant {name}")
        return base64.b64decode(match.group(1))

    pieces = constant("llama_vocab_base64").decode("utf-8").split("\n")
    ids = constant("llama_merges_binary")
    pairs = struct.unpack(f"<{len(ids) // 2}H", ids)
    merges = [(pieces[a], pieces[b]) for a, b in zip(pairs[0::2], pairs[1::2])]
    return pieces, merges


def llama_tokenizer(oracle: Oracle, *, legacy: bool):
    """LLaMA's tokenizer (transformers' LlamaTokenizer over the real vocabulary) with llava-hf's
    `<image>` added as id 32000, and LLaVA's training pad (the unknown token)."""
    from transformers import LlamaTokenizer

    pieces, merges = llama_vocabulary(oracle.vocabulary_js)
    if len(pieces) != 32000:
        raise RuntimeError(f"{oracle.vocabulary_js}: {len(pieces)} pieces, expected 32000")
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.convert_tokens_to_ids("<image>") != IMAGE_SLOT_ID:
        raise RuntimeError("<image> did not get id 32000")
    return tokenizer
