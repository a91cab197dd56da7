"""SentencePiece tokenizer: `<image>` is one piece, round trips, save/load, loading an existing .model."""
import copy
import io

import numpy as np
import pytest
import sentencepiece as spm

from oneflow_jax.data import shapes_world as sw
from oneflow_jax.data import tokenizer as tokenizer_lib

OPEN_TEXT = [
    "The quick brown fox jumps over the lazy dog. <image> A photo of a dog sleeping on a couch.",
    "Pack my box with five dozen liquor jugs; then <image> show the jugs.",
    "How vexingly quick daft zebras jump! Zebras are striped animals living in Africa.",
    "Sphinx of black quartz, judge my vow. <image> <image> Two images in a row.",
] * 30


@pytest.fixture(scope="module")
def corpus():
    return [sw.generate_document("train", i).text for i in range(300)]


@pytest.fixture(scope="module")
def word_tok(corpus):
    return tokenizer_lib.train_tokenizer(corpus, 64, model_type="word")


def test_special_ids(word_tok):
    t = word_tok
    assert (t.pad_id, t.bos_id, t.eos_id, t.image_id) == (0, 1, 2, 4)
    assert len({t.pad_id, t.bos_id, t.eos_id, t.image_id}) == 4
    assert t.id_to_piece(t.image_id) == "<image>"
    assert 20 <= t.vocab_size <= 64  # closed vocabulary: every word of the grammar is one piece


def test_round_trip_with_images(word_tok, corpus):
    for text in corpus[:100]:
        ids = word_tok.encode(text)
        assert ids.count(word_tok.image_id) == text.count("<image>")
        assert word_tok.bos_id not in ids and word_tok.eos_id not in ids and word_tok.unk_id not in ids
        assert word_tok.decode(ids) == text
    # Whole words: a caption is exactly 13 tokens; `<image>` never merges with its neighbours.
    caption = "a red circle on the left and a blue square on the right"
    assert len(word_tok.encode(caption)) == 13
    assert word_tok.encode(f"{caption} <image>") == word_tok.encode(caption) + [word_tok.image_id]
    assert word_tok.encode("<image><image>") == [word_tok.image_id] * 2
    assert word_tok.decode([word_tok.bos_id] + word_tok.encode(caption) + [word_tok.eos_id, 0, 0]) == caption
    assert isinstance(word_tok.decode(np.asarray(word_tok.encode(caption), np.int32)), str)


def test_open_text_unigram_round_trip():
    tok = tokenizer_lib.train_tokenizer(OPEN_TEXT, 120, model_type="unigram")
    for text in OPEN_TEXT[:4]:
        ids = tok.encode(text)
        assert ids.count(tok.image_id) == text.count("<image>")
        assert tok.decode(ids) == text


def test_save_load_and_dir_helpers(word_tok, corpus, tmp_path):
    path = tmp_path / "sub" / "tok.model"
    tokenizer_lib.save(word_tok, str(path))
    loaded = tokenizer_lib.load(str(path))
    ckpt = tmp_path / "checkpoint_100"
    written = tokenizer_lib.save_to_dir(word_tok, str(ckpt))
    assert written.endswith("tokenizer.model")
    from_dir = tokenizer_lib.load_from_dir(str(ckpt))
    for text in corpus[:20]:
        assert loaded.encode(text) == word_tok.encode(text) == from_dir.encode(text)
    assert from_dir.vocab_size == word_tok.vocab_size
    # Grain worker processes receive copies: the state is just the model bytes.
    clone = copy.deepcopy(word_tok)
    assert clone.encode(corpus[0]) == word_tok.encode(corpus[0])
    with pytest.raises(FileNotFoundError):
        tokenizer_lib.load(str(tmp_path / "missing.model"))


def test_load_existing_model(tmp_path):
    """A .model trained elsewhere works if it defines `<image>`, PAD, BOS and EOS; otherwise a clear error."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(OPEN_TEXT), model_writer=buf, vocab_size=80,
                                   model_type="bpe", pad_id=3, bos_id=1, eos_id=2, unk_id=0,
                                   user_defined_symbols=["<image>"], minloglevel=2)
    (tmp_path / "ext.model").write_bytes(buf.getvalue())
    tok = tokenizer_lib.load(str(tmp_path / "ext.model"))
    assert tok.pad_id == 3 and tok.image_id not in (0, 1, 2, 3)
    text = "the quick dog <image> jumps"
    assert tok.decode(tok.encode(text)) == text

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(OPEN_TEXT), model_writer=buf, vocab_size=80,
                                   model_type="bpe", pad_id=3, minloglevel=2)
    (tmp_path / "no_image.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="<image>"):
        tokenizer_lib.load(str(tmp_path / "no_image.model"))


def test_bad_input(word_tok):
    with pytest.raises(TypeError):
        word_tok.encode(b"bytes")
    with pytest.raises(ValueError):
        word_tok.decode([10_000])
    with pytest.raises(ValueError):
        tokenizer_lib.train_tokenizer([], 64)


def test_only_image_id_decodes_to_a_marker(word_tok, corpus):
    """sentencepiece's word model adds a '\u2581<image>' piece beside the user-defined `<image>`: encode never emits it,
    and a sampled one must not decode to a marker that has no image (the sample CLI writes one PNG per marker)."""
    t = word_tok
    assert t.unused_ids, "expected the word model's extra <image> piece (if sentencepiece stops adding it, drop this)"
    encoded = {i for doc in corpus[:50] for i in t.encode(doc)}
    assert not encoded & set(t.unused_ids)
    for i in range(t.vocab_size):
        assert (tokenizer_lib.IMAGE_TOKEN in t.decode([i])) == (i == t.image_id), (i, t.id_to_piece(i))
