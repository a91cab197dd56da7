"""Hugging Face `tokenizer.json` tokenizers (e.g. Llama 3's byte-level BPE, 128,256 ids) behind the interface of
data/tokenizer.py's SentencePiece `Tokenizer`: the same ids attributes, encode / decode, word starts and pickling.

`from_tokenizer_json(path, image_token)` reads a user's file: BOS / EOS / PAD come from the `tokenizer_config.json`
beside it (its `bos_token` / `eos_token` / `pad_token`) or else from well-known names (Llama 3: `<|begin_of_text|>`,
`<|end_of_text|>`, `<|finetune_right_pad_id|>`); `<image>` maps to `image_token` (a named reserved special token,
e.g. Llama 3's `<|reserved_special_token_0|>`, so the vocabulary keeps its size) or, when none is named, to an added
`<image>` special token (one id past the file's vocabulary: the embedding rows grow by one).

The run keeps one self-contained file, `tokenizer.hf.json` ({format, tokenizer: the tokenizer.json object, the
special ids}); `model_proto` is its bytes, as for SentencePiece.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from oneflow_jax.data import tokenizer as tokenizer_lib

IMAGE_TOKEN = tokenizer_lib.IMAGE_TOKEN
FILENAME = "tokenizer.hf.json"
FORMAT = "oneflow_jax/hf_tokenizer/1"
KNOWN = {  # special role -> names tried in order when tokenizer_config.json does not say
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>"),
    "pad": ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>"),
}
WORD_START = ("\u0120", "\u2581")           # byte-level BPE's 'Ġ' (a leading space), SentencePiece's '▁'


class HFTokenizer:
    """A `tokenizers.Tokenizer` with OneFlow's conventions: `encode` never adds BOS/EOS, each `<image>` is one id."""

    filename = FILENAME

    def __init__(self, model_proto: bytes):
        import tokenizers  # pylint: disable=g-import-not-at-top
        spec = json.loads(model_proto)
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        self._proto = bytes(model_proto)
        self._tok = tokenizers.Tokenizer.from_str(json.dumps(spec["tokenizer"]))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id, self.image_id = (int(spec[k]) for k in ("bos", "eos", "pad", "image"))
        self.unk_id = self.pad_id          # byte-level BPE has no unknown token; unused ids decode as nothing
        specials = {int(t["id"]) for t in spec["tokenizer"].get("added_tokens", []) if t.get("special")}
        self.unused_ids = tuple(sorted(specials - {self.bos_id, self.eos_id, self.pad_id, self.image_id}))
        starts = np.zeros(self.vocab_size, bool)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i) or ""
            starts[i] = piece.startswith(WORD_START) or i in specials
        self._word_start = starts

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def word_start(self) -> np.ndarray:
        return self._word_start

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; every literal `<image>` becomes `image_id`. No BOS/EOS."""
        return tokenizer_lib.encode_with_markers(
            text, lambda seg: self._tok.encode(seg, add_special_tokens=False).ids, self.image_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; PAD/BOS/EOS and unused special ids are dropped, `image_id` becomes ` <image> `."""
        return tokenizer_lib.decode_with_markers(
            ids, lambda seg: self._tok.decode(seg, skip_special_tokens=False), self.image_id,
            {self.pad_id, self.bos_id, self.eos_id, *self.unused_ids}, self.vocab_size)

    def __getstate__(self):
        return {"model_proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, image_id={self.image_id})"


def _config_token(value) -> str | None:
    """A tokenizer_config.json special-token entry: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def from_tokenizer_json(path: str, image_token: str | None = None) -> HFTokenizer:
    """A user's `tokenizer.json` with OneFlow's special ids (see the module docstring); ValueError with one line
    for a file that cannot be used."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
        tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # pylint: disable=broad-except  (the Rust side raises its own Exception)
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]})") from None
    named = {}
    cfg_path = os.path.join(os.path.dirname(os.fspath(path)), "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        named = {role: _config_token(cfg.get(f"{role}_token")) for role in KNOWN}
    ids = {}
    for role, names in KNOWN.items():
        for name in ([named[role]] if named.get(role) else []) + list(names):
            if tok.token_to_id(name) is not None:
                ids[role] = tok.token_to_id(name)
                break
    for role in ("bos", "eos"):
        if role not in ids:
            raise ValueError(f"{path}: no {role.upper()} token (tried {', '.join(KNOWN[role])} and "
                             f"tokenizer_config.json's {role}_token)")
    if image_token:
        if tok.token_to_id(image_token) is None:
            raise ValueError(f"{path} has no token {image_token!r} (config.data.image_token) to use as <image>")
        ids["image"] = tok.token_to_id(image_token)
    else:
        if tok.token_to_id(IMAGE_TOKEN) is None:
            tok.add_special_tokens([tokenizers.AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        ids["image"] = tok.token_to_id(IMAGE_TOKEN)
    if "pad" not in ids:          # none in the file: a reserved special token nobody else uses, else an added one
        spare = [t for t in tok.get_added_tokens_decoder().values()
                 if "reserved" in t.content and tok.token_to_id(t.content) not in ids.values()]
        if spare:
            ids["pad"] = tok.token_to_id(spare[-1].content)
        else:
            tok.add_special_tokens([tokenizers.AddedToken("<pad>", special=True, normalized=False)])
            ids["pad"] = tok.token_to_id("<pad>")
    if len(set(ids.values())) < 4:
        raise ValueError(f"{path}: BOS, EOS, PAD and <image> need four different ids, got {ids}")
    spec = dict(format=FORMAT, tokenizer=json.loads(tok.to_str()), source=os.path.basename(os.fspath(path)),
                image_token=image_token or IMAGE_TOKEN, **ids)
    return HFTokenizer(json.dumps(spec, sort_keys=True).encode())
