"""Small working tokenizers shaped like FLUX.1-dev's, learned from a corpus: `tokenizer/` (CLIP's byte-level BPE:
vocab.json + merges.txt) and `tokenizer_2/` (T5's Unigram as tokenizer.json). The demo model ships a pair made
from its prompt words (flux_core.demo.build); the tests make theirs from a sentence corpus (tests/tiny_text.py).

    write_clip_tokenizer(folder / "tokenizer", corpus)
    write_t5_tokenizer(folder / "tokenizer_2", t5_pieces(corpus), model_max_length=32)

Both keep the real tokenizers' conventions the models rely on: CLIP's 256 byte characters first, the merges, then
<|startoftext|> and <|endoftext|> last (the highest id, where FLUX's CLIP pools); T5's <pad> 0, </s> 1, <unk> 2.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

CLIP_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
T5_SPECIAL = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-"


def byte_chars() -> list[str]:
    """The byte-level alphabet of CLIP's, GPT-2's and Qwen's BPE: printable Latin-1 bytes stand for themselves, the
    others get code points 256+."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _merge(seq: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def clip_bpe(corpus: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of a CLIP BPE learned on `corpus` (whitespace-separated words) until every word is one
    token: 256 byte chars, the same with </w>, one token per merge (most frequent pair first), then
    <|startoftext|>, <|endoftext|>. Words outside the corpus still tokenize (into smaller pieces)."""
    words = Counter(corpus.split())
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while True:
        pairs = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        seqs = {w: _merge(seq, best) for w, seq in seqs.items()}
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, tuple(merges)


def t5_pieces(corpus: str) -> list[tuple[str, float]]:
    """A T5 Unigram vocabulary: <pad> 0, </s> 1, <unk> 2 (as T5's), "▁", the corpus's words whole, single chars."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -5.0) for w in dict.fromkeys(corpus.split())]
    pieces += [(c, -8.0) for c in T5_CHARACTERS]
    return pieces


def write_clip_tokenizer(folder: Path, corpus: str) -> Path:
    """`folder` as FLUX.1-dev's tokenizer/: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe(corpus)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(CLIP_SPECIAL))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **CLIP_SPECIAL, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True}))
    return folder


def write_t5_tokenizer(folder: Path, pieces: list[tuple[str, float]], model_max_length: int = 512) -> Path:
    """`folder` as FLUX.1-dev's tokenizer_2/, with a tokenizer.json (a Unigram over `pieces`, "▁" word starts, </s>
    appended). model_max_length: the prompt length the model was trained with (FLUX.1: 512), which FluxCore pads
    T5 prompts to unless told otherwise."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps(T5_SPECIAL))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **T5_SPECIAL, "tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0}))
    return folder
