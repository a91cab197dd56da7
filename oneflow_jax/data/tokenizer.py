"""SentencePiece tokenizer with `<image>` as a single piece and fixed PAD/BOS/EOS/UNK ids.

Ids: PAD = 0, BOS = 1, EOS = 2, UNK = 3, `<image>` = 4, then the learned pieces. `encode` never adds BOS/EOS (the
objectives add what they need). Text is split on the literal `<image>` marker and each text segment is encoded on its
own, so an image is always exactly one id and never merges with neighbouring whitespace; `decode` joins segments and
markers with single spaces (`"a <image> b"` round-trips exactly; `"a<image>b"` decodes as `"a <image> b"`).

The model is held as serialized bytes (`model_proto`), so a `Tokenizer` is cheap to copy into Grain worker processes
and to store next to checkpoints (`save_to_dir` / `find_in_dir` + `load`). Hugging Face `tokenizer.json` files
(Llama 3) load through `load` too, as data/hf_tokenizer.py's HFTokenizer with the same interface.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

IMAGE_TOKEN = "<image>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_FILENAME = "tokenizer.model"


class Tokenizer:
    """Thin wrapper over a SentencePiece model; see the module docstring for conventions."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        sp = self._sp
        self.vocab_size, self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            sp.get_piece_size(), sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
        self.image_id = self._sp.piece_to_id(IMAGE_TOKEN)
        if self.image_id == self._sp.unk_id() or self._sp.id_to_piece(self.image_id) != IMAGE_TOKEN:
            raise ValueError(f"tokenizer model has no {IMAGE_TOKEN!r} piece; train it with train_tokenizer() or add "
                             f"{IMAGE_TOKEN!r} to user_defined_symbols")
        for name, value in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)):
            if value < 0:
                raise ValueError(f"tokenizer model has no {name} id (set {name}_id when training it)")
        is_word_start = np.zeros(self.vocab_size, bool)
        for i in range(self.vocab_size):
            is_word_start[i] = self._sp.id_to_piece(i).startswith("\u2581")
        is_word_start[self.image_id] = True
        self._word_start = is_word_start
        # Pieces other than image_id that spell `<image>` (sentencepiece's word model adds '\u2581<image>' next to the
        # user-defined symbol). `encode` never emits them; a model can still sample them, so samplers ban them and
        # `decode` shows them as unknown instead of a marker without an image.
        self.unused_ids = tuple(i for i in range(self.vocab_size)
                                if i != self.image_id and IMAGE_TOKEN in self._sp.id_to_piece(i))

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def word_start(self) -> np.ndarray:
        """bool [vocab]: the piece starts a new word (or is `<image>`): where truncation may cut a document."""
        return self._word_start

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # -- text <-> ids
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; every literal `<image>` becomes `image_id`. No BOS/EOS."""
        return encode_with_markers(text, self._sp.encode, self.image_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; PAD/BOS/EOS are dropped, `image_id` becomes ` <image> `, unused ids decode as unknown."""
        return decode_with_markers(ids, self._sp.decode, self.image_id, {self.pad_id, self.bos_id, self.eos_id},
                                   self.vocab_size, remap=dict.fromkeys(self.unused_ids, self.unk_id))

    # -- Grain worker processes receive a copy through cloudpickle: ship the model bytes, rebuild the processor.
    def __getstate__(self):
        return {"model_proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, image_id={self.image_id})"


def encode_with_markers(text: str, encode_segment, image_id: int) -> list[int]:
    """Ids of `text` (no BOS/EOS): each text segment between `<image>` markers encoded on its own by
    `encode_segment`, each marker exactly `image_id` (shared by the SentencePiece and Hugging Face tokenizers)."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects str, got {type(text).__name__}")
    ids: list[int] = []
    for i, segment in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(image_id)
        segment = segment.strip()
        if segment:
            ids.extend(encode_segment(segment))
    return ids


def decode_with_markers(ids, decode_segment, image_id: int, drop, vocab_size: int, remap=None) -> str:
    """Text of `ids`: ids in `remap` replaced first, ids in `drop` skipped, the runs between `image_id`s decoded by
    `decode_segment` and joined with ` <image> ` markers by single spaces."""
    parts: list[str] = []
    segment: list[int] = []
    remap = remap or {}

    def flush():
        if segment:
            text = decode_segment(segment).strip()
            if text:
                parts.append(text)
            segment.clear()

    for i in np.asarray(ids, np.int64).reshape(-1).tolist():
        i = remap.get(i, i)
        if i == image_id:
            flush()
            parts.append(IMAGE_TOKEN)
        elif i not in drop:
            if not 0 <= i < vocab_size:
                raise ValueError(f"token id {i} out of range [0, {vocab_size})")
            segment.append(i)
    flush()
    return " ".join(parts)


def train_tokenizer(corpus_iter: Iterable[str], vocab_size: int, out_path: str | None = None, *,
                    model_type: str = "unigram", character_coverage: float = 1.0,
                    max_sentences: int = 2_000_000, seed: int = 0, **spm_kwargs) -> Tokenizer:
    """Trains a SentencePiece model on `corpus_iter` (documents; `<image>` markers are stripped from the text).

    `vocab_size` is an upper bound (`hard_vocab_limit=False`): a small closed corpus may yield fewer pieces, and the
    returned tokenizer's `vocab_size` is the real one. `model_type='word'` keeps whole words (shapes-world);
    'unigram' / 'bpe' suit open text. Deterministic for a given corpus and `seed` (sentence sampling), so hosts
    that train independently agree. Writes the model to `out_path` when given.
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")

    def sentences():
        for doc in corpus_iter:
            for segment in str(doc).split(IMAGE_TOKEN):
                segment = " ".join(segment.split())
                if segment:
                    yield segment

    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, user_defined_symbols=[IMAGE_TOKEN],
            hard_vocab_limit=False, character_coverage=character_coverage, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, minloglevel=2, **spm_kwargs)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed ({e}); is the corpus empty?") from e
    tok = Tokenizer(buf.getvalue())
    if out_path is not None:
        save(tok, out_path)
    return tok


def save(tokenizer: Tokenizer, path: str) -> None:
    """Writes the `.model` file atomically (temp file + rename), creating parent directories."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(tokenizer.model_proto)
    tmp.replace(path)


def load(path: str, image_token: str | None = None):
    """Loads a tokenizer file: a SentencePiece `.model` (it must define `<image>`, PAD, BOS and EOS), a run's
    `tokenizer.hf.json`, or a Hugging Face `tokenizer.json` (data/hf_tokenizer.py; `image_token` names the token
    `<image>` maps to, None: an added `<image>`)."""
    from oneflow_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer model at {path}")
    data = path.read_bytes()
    if path.suffix == ".json":
        if path.name == hf_tokenizer.FILENAME:
            return hf_tokenizer.HFTokenizer(data)
        return hf_tokenizer.from_tokenizer_json(os.fspath(path), image_token)
    try:
        return Tokenizer(data)
    except RuntimeError:              # sentencepiece cannot parse it
        raise ValueError(f"{path} is not a SentencePiece model (nor a tokenizer.json)") from None


def find_in_dir(directory: str) -> str | None:
    """The tokenizer file a run directory holds (`tokenizer.model` or `tokenizer.hf.json`), None if neither."""
    from oneflow_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    for name in (MODEL_FILENAME, hf_tokenizer.FILENAME):
        path = epath.Path(directory) / name
        if path.exists():
            return os.fspath(path)
    return None


def save_to_dir(tokenizer, directory: str) -> str:
    """Stores the tokenizer in `directory` (e.g. a run directory) as `tokenizer.model` (SentencePiece) or
    `tokenizer.hf.json`; returns the path."""
    path = epath.Path(directory) / getattr(tokenizer, "filename", MODEL_FILENAME)
    save(tokenizer, path)
    return str(path)


def load_from_dir(directory: str):
    """Loads the tokenizer stored by `save_to_dir(…, directory)`."""
    path = find_in_dir(directory)
    if path is None:
        raise FileNotFoundError(f"no tokenizer ({MODEL_FILENAME} or tokenizer.hf.json) in {directory}")
    return load(path)
