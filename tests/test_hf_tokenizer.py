"""Hugging Face tokenizer.json support (data/hf_tokenizer.py): a small byte-level BPE with Llama-3-style special
tokens, trained offline here, behaves as the SentencePiece tokenizer does. Train and sample with a tokenizer.json run in
test_import_llama.py (a reserved special token as `<image>`) and test_real_data.py (the walk-through)."""
from __future__ import annotations

import copy
import json

import pytest

from oneflow_jax.data import hf_tokenizer
from oneflow_jax.data import shapes_world as sw
from oneflow_jax.data import tokenizer as tokenizer_lib

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """tokenizer.json (byte-level BPE over shapes-world text) + tokenizer_config.json, as a Llama 3 directory has."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("hf_tok")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [sw.generate_document("train", i).text.replace("<image>", " ") for i in range(300)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                         "eos_token": {"content": "<|end_of_text|>"}}))
    return d


def test_reserved_token_as_image_and_the_sentencepiece_conventions(tok_dir, tmp_path):
    plain = json.loads((tok_dir / "tokenizer.json").read_text())
    tok = tokenizer_lib.load(str(tok_dir / "tokenizer.json"), "<|reserved_special_token_0|>")
    assert tok.vocab_size == len(plain["model"]["vocab"])                        # nothing added
    assert (tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2) and tok.pad_id == 5   # spare reserved token
    assert tok.unused_ids == (3, 4)
    text = "a red circle on the left and a blue square on the right <image> then more"
    ids = tok.encode(text)
    assert ids.count(tok.image_id) == 1 and tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, 3]) == text     # specials and unused dropped
    assert tok.encode("<image>") == [tok.image_id] and tok.encode("") == []
    for i in ids:                                     # where truncation may cut: before a word ('Ġ') or an image
        assert bool(tok.word_start[i]) == (tok.id_to_piece(i).startswith("\u0120") or i == tok.image_id)
    assert sum(tok.word_start[i] for i in ids) >= 10
    clone = copy.deepcopy(tok)                       # through __getstate__ / __setstate__, as Grain's workers copy it
    assert clone.model_proto == tok.model_proto and clone.encode(text) == ids
    path = tokenizer_lib.save_to_dir(tok, str(tmp_path))
    assert path.endswith(hf_tokenizer.FILENAME) and tokenizer_lib.find_in_dir(str(tmp_path)) == path
    again = tokenizer_lib.load_from_dir(str(tmp_path))
    assert again.model_proto == tok.model_proto and again.encode(text) == ids


def test_image_token_added_when_none_is_named(tok_dir):
    base = json.loads((tok_dir / "tokenizer.json").read_text())
    tok = tokenizer_lib.load(str(tok_dir / "tokenizer.json"))
    assert tok.image_id == len(base["model"]["vocab"]) and tok.vocab_size == tok.image_id + 1
    assert tok.id_to_piece(tok.image_id) == "<image>"
    assert tok.decode(tok.encode("a <image> b")) == "a <image> b"


def test_unusable_files_are_one_clear_error(tok_dir, tmp_path):
    plain = json.loads((tok_dir / "tokenizer.json").read_text())
    plain["added_tokens"] = [t for t in plain["added_tokens"] if "begin_of_text" not in t["content"]]
    plain["model"]["vocab"].pop("<|begin_of_text|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(plain))
    with pytest.raises(ValueError, match="no BOS token"):
        tokenizer_lib.load(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no token '<|nope|>'"):
        tokenizer_lib.load(str(tok_dir / "tokenizer.json"), "<|nope|>")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        tokenizer_lib.load(str(tmp_path / "bad.json"))
