"""The GPT-2 tokenizer, built offline from the BPE ranks that ship in ``openai-whisper``'s sdist.

``whisper/assets/gpt2.tiktoken`` (MIT) lists every GPT-2 token as base64 bytes with its rank (its
id). A byte-level BPE tokenizer needs merges as well: the merge that creates a token is found by
running BPE on the token's bytes with only lower-ranked tokens allowed, which leaves exactly two
parts. The result is a Hugging Face fast tokenizer with GPT-2's ids (``" Mary"`` = 5335,
``" John"`` = 1757, ``<|endoftext|>`` = 50256), cached in ``$CIRCUITFIND_CACHE/tokenizers/gpt2``.
"""

from __future__ import annotations

import base64
import tarfile
import tempfile
from pathlib import Path

from circuitfind.errors import ModelNotFoundError
from circuitfind.models.fetch import cache_root, pip_download, replace_dir

WHISPER_SDIST = "openai-whisper==20250625"
RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
END_OF_TEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """``token bytes -> rank`` from a ``.tiktoken`` file."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE of ``token`` using only merges ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges, in rank order, that reproduce ``ranks``."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer(ranks: dict[bytes, int]):
    """A ``PreTrainedTokenizerFast`` for GPT-2 from its ranks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_unicode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT})
    fast.pad_token = END_OF_TEXT
    return fast


def tokenizer_dir() -> Path:
    return cache_root() / "tokenizers" / "gpt2"


def gpt2_tokenizer(fetch_if_missing: bool = True):
    """The offline GPT-2 tokenizer (built once from the whisper sdist, then loaded from the cache)."""
    from transformers import PreTrainedTokenizerFast

    folder = tokenizer_dir()
    if not (folder / "tokenizer.json").is_file():
        if not fetch_if_missing:
            raise ModelNotFoundError("the GPT-2 tokenizer is not built: run `circuitfind models fetch gpt2-tokenizer`")
        fetch_gpt2_tokenizer()
    return PreTrainedTokenizerFast.from_pretrained(folder)


def fetch_gpt2_tokenizer(log=print) -> Path:
    """Download the whisper sdist (``pip download --no-binary``), extract the ranks, build and cache."""
    folder = tokenizer_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gpt2-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"gpt2-tokenizer: pip download --no-deps --no-binary :all: {WHISPER_SDIST}")
        sdist = pip_download(WHISPER_SDIST, tmp / "sdist", binary=False)
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(RANKS_MEMBER))
            ranks_path = tmp / "gpt2.tiktoken"
            ranks_path.write_bytes(tar.extractfile(member).read())
        tokenizer = build_tokenizer(read_ranks(ranks_path))
        out = tmp / "tokenizer"
        tokenizer.save_pretrained(out)
        replace_dir(out, folder)
    log(f"gpt2-tokenizer: written to {folder}")
    return folder
