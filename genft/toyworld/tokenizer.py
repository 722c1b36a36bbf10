"""A CLIP BPE tokenizer built locally from the world's vocabulary, so every world word is exactly one token."""
from __future__ import annotations

import json
from pathlib import Path

from .data import vocabulary

MODEL_MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_EOW = "</w>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (copied from openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE: repeatedly merge the adjacent pair with the lowest rank, as CLIP's tokenizer does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        best, i = min(pairs)
        if best == float("inf"):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level base vocabulary plus merges that turn every world word into a single token.

    Merges are appended (lowest priority last) until each word encodes to one token; appending never
    changes how an already-finished word encodes, because its own earlier merges always win.
    """
    words = vocabulary() if words is None else words
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [b + _EOW for b in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while True:
            symbols = _apply_bpe(list(word[:-1]) + [word[-1] + _EOW], ranks)
            if len(symbols) == 1:
                break
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            merged = pair[0] + pair[1]
            if merged not in vocab_list:
                vocab_list.append(merged)
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json so CLIPTokenizer.from_pretrained(directory) works."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2 (genft toyworld)"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def build_tokenizer(directory: str | Path):
    """Write the tokenizer files into `directory` and load them through transformers' CLIPTokenizer."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory)
    tok = CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=MODEL_MAX_LENGTH, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )
    tok.save_pretrained(str(directory))
    return tok
