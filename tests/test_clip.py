"""Flax CLIP (oneflow_jax.evals.clip) vs transformers' CLIPModel: tiny random-weight checkpoints written with
save_pretrained and a tiny CLIP BPE tokenizer (tokenizer.json written by transformers' CLIPTokenizer). Network parity
(quick_gelu with the legacy eos_token_id == 2 argmax pooling, gelu with first-<|endoftext|> pooling), the pooling
position, per-pair CLIP scores, sharded vs one device, preprocessing vs HF's PIL processor, and loading errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from oneflow_jax.cli import UserError
from oneflow_jax.convert import safetensors_io
from oneflow_jax.evals import clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CONTEXT = 16                                   # max_position_embeddings of the tiny text tower
CAPTIONS = ["a cat", "the cat sat on a mat", "dog", "a red cat at the door",
            "cats and hats and bats and rats and mats and gnats"]          # the last one is truncated to CONTEXT


def write_tokenizer(directory):
    """A CLIP BPE over letters with two merges; <|startoftext|>, <|endoftext|> last (the highest ids, as in CLIP)."""
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(LETTERS)})
    for token in ("at</w>", "cat</w>", clip.BOS_TOKEN, clip.EOS_TOKEN):
        vocab[token] = len(vocab)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\na t</w>\nc at</w>\n")
    transformers.CLIPTokenizer.from_pretrained(directory).save_pretrained(directory)
    return len(vocab)


def make_checkpoint(directory, tokenizer_dir, vocab_size, act, eos_token_id, seed):
    eos = vocab_size - 1
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, hidden_act=act,
                         bos_token_id=eos - 1, eos_token_id=eos_token_id, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=16)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():                   # perturb every tensor so LayerNorms / biases are not at their 1 / 0 init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), directory)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (torch model, directory)}: 'quick_gelu' with the legacy eos_token_id 2, 'gelu' with the real id."""
    root = tmp_path_factory.mktemp("clip")
    vocab_size = write_tokenizer(str(root / "tokenizer"))
    out = {}
    for seed, (act, eos) in enumerate((("quick_gelu", 2), ("gelu", vocab_size - 1))):
        d = str(root / act)
        out[act] = make_checkpoint(d, str(root / "tokenizer"), vocab_size, act, eos, seed), d
    return out


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def torch_features(model, pixels_nhwc=None, ids=None, mask=None):
    """CLIPModel.get_*_features as numpy (transformers 5 returns an output whose pooler_output is projected)."""
    with torch.no_grad():
        if pixels_nhwc is not None:
            out = model.get_image_features(pixel_values=torch.from_numpy(np.array(pixels_nhwc).transpose(0, 3, 1, 2)))
        else:
            out = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                          attention_mask=torch.from_numpy(mask).long())
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_network_parity(checkpoints, act):
    model, d = checkpoints[act]
    cfg, params, tokenizer = clip.load(d)
    assert cfg.text.hidden_act == cfg.vision.hidden_act == act and cfg.projection_dim == 16
    eos = 2 if act == "quick_gelu" else tokenizer.token_to_id(clip.EOS_TOKEN)
    assert cfg.text.eos_token_id == model.text_model.eos_token_id == eos
    pixels = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    ids, mask = clip.tokenize(tokenizer, CAPTIONS, CONTEXT)
    flax_clip = clip.CLIP(cfg)
    image = flax_clip.apply({"params": params}, pixels, method=clip.CLIP.get_image_features)
    text = flax_clip.apply({"params": params}, ids, mask, method=clip.CLIP.get_text_features)
    logits = flax_clip.apply({"params": params}, pixels, ids, mask)
    with torch.no_grad():
        want_logits = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits_per_image.numpy()
    errors = {"image": rel_err(image, torch_features(model, pixels)),
              "text": rel_err(text, torch_features(model, ids=ids, mask=mask)),
              "logits_per_image": rel_err(logits, want_logits)}
    print(f"\n{act} relative errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert logits.shape == (3, len(CAPTIONS)) and max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_tokens_and_pooling_position(checkpoints, act):
    """Our ids equal HF's CLIPTokenizer (max_length padding, truncation keeping <|endoftext|>), and the pooled state is
    transformers' pooler_output: last_hidden_state at our eos_positions, for captions of different lengths."""
    model, d = checkpoints[act]
    cfg, _, tokenizer = clip.load(d)
    ids, mask = clip.tokenize(tokenizer, CAPTIONS, CONTEXT)
    hf = transformers.CLIPTokenizer.from_pretrained(d)(CAPTIONS, padding="max_length", max_length=CONTEXT,
                                                       truncation=True)
    np.testing.assert_array_equal(ids, hf["input_ids"])
    np.testing.assert_array_equal(mask, hf["attention_mask"])
    lengths = mask.sum(1)
    assert len(set(lengths)) == len(CAPTIONS) and lengths[-1] == CONTEXT             # all differ; the last is cut
    positions = np.asarray(clip.eos_positions(ids, cfg.text.eos_token_id))
    np.testing.assert_array_equal(positions, lengths - 1)                           # the closing <|endoftext|>
    with torch.no_grad():
        out = model.text_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    hidden, pooled = out.last_hidden_state.numpy(), out.pooler_output.numpy()
    np.testing.assert_array_equal(hidden[np.arange(len(ids)), positions], pooled)
    for i, p in enumerate(positions):                    # and no other position matches (random weights differ)
        others = np.delete(hidden[i], p, axis=0)
        assert np.abs(others - pooled[i]).max(axis=1).min() > 1e-3


def test_scores_per_pair_match_torch(checkpoints):
    model, d = checkpoints["quick_gelu"]
    scorer = clip.ClipScorer.from_pretrained(d, batch_size=8)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(CAPTIONS), 40, 36, 3), dtype=np.uint8)    # portrait: resize + crop
    pixels = clip.preprocess(images, 32)
    torch_image = torch_features(model, pixels)
    ids, mask = clip.tokenize(scorer.tokenizer, CAPTIONS, CONTEXT)
    torch_text = torch_features(model, ids=ids, mask=mask)
    for order in (np.arange(len(CAPTIONS)), rng.permutation(len(CAPTIONS))):        # matching, then shuffled pairs
        got = scorer.score(images, [CAPTIONS[i] for i in order])
        a, b = torch_image, torch_text[order]
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert got.shape == (len(CAPTIONS),) and got.dtype == np.float32
        np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), atol=2e-3)
    # float images in [0, 1] are the same images as uint8 / 255
    np.testing.assert_allclose(scorer.image_embeddings(images.astype(np.float32) / 255),
                               scorer.image_embeddings(images), rtol=1e-5, atol=1e-6)
    assert np.all(clip.clip_score(-torch_image, torch_image) == 0)                  # negative cosine clamps to 0


def test_sharded_equals_one_device(checkpoints):
    assert jax.local_device_count() == 8, "conftest.py sets 8 fake CPU devices"
    _, d = checkpoints["gelu"]
    cfg, params, tokenizer = clip.load(d)
    sharded = clip.ClipScorer(cfg, params, tokenizer, batch_size=8)
    single = clip.ClipScorer(cfg, params, tokenizer, batch_size=8, devices=jax.local_devices()[:1])
    n = 11                                                          # one full chunk of 8, then 3 padded to 8
    images = np.random.default_rng(2).integers(0, 256, (n, 37, 45, 3), dtype=np.uint8)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    got_image, got_text = sharded.image_embeddings(images), sharded.text_embeddings(captions)
    assert got_image.shape == got_text.shape == (n, 16)
    np.testing.assert_allclose(got_image, single.image_embeddings(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_text, single.text_embeddings(captions), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded.score(images, captions), single.score(images, captions), atol=1e-4)
    assert sharded.image_embeddings(images[:0]).shape == (0, 16)


def test_preprocess_close_to_hf_pil_processor():
    """Same geometry and normalisation as CLIPImageProcessor (PIL backend); only the bicubic kernels differ."""
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    yy, xx = np.mgrid[0:48, 0:41] / 48.0                             # smooth landscape-ish image, odd width
    image = np.stack([np.sin(3 * xx + 1), np.cos(4 * yy), np.sin(2 * (xx + yy))], -1) * 100 + 128
    image = image.astype(np.uint8)
    want = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"])[0].transpose(1, 2, 0)
    got = np.asarray(clip.preprocess(image[None], 32))[0]
    diff = np.abs(got - want)
    print(f"\npreprocess vs CLIPImageProcessorPil: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
    assert got.shape == want.shape == (32, 32, 3) and diff.mean() < 0.02 and diff.max() < 0.1


def test_missing_files_are_one_line_user_errors(checkpoints, tmp_path):
    _, d = checkpoints["gelu"]
    cases = {}
    with pytest.raises(UserError) as e:
        clip.load(str(tmp_path / "nowhere"))
    cases["nowhere"] = str(e.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(os.path.join(d, "config.json"), partial)
    with pytest.raises(UserError) as e:
        clip.load(str(partial))
    cases["model.safetensors"] = str(e.value)
    shutil.copy(os.path.join(d, "model.safetensors"), partial)
    with pytest.raises(UserError) as e:
        clip.load(str(partial))
    cases["tokenizer.json"] = str(e.value)
    for needle, message in cases.items():
        assert "\n" not in message and needle in message and "huggingface" in message, message
    shutil.copy(os.path.join(os.path.dirname(d), "tokenizer", "vocab.json"), partial)
    with pytest.raises(UserError, match="AutoTokenizer.*save_pretrained"):           # how to write tokenizer.json
        clip.load(str(partial))


def test_wrong_tensors_are_named(checkpoints):
    _, d = checkpoints["gelu"]
    cfg, _, _ = clip.load(d)
    tensors, _ = safetensors_io.load_file(os.path.join(d, "model.safetensors"))
    tensors = dict(tensors)
    del tensors["vision_model.pre_layrnorm.weight"]
    tensors["text_projection.weight"] = tensors["text_projection.weight"].T
    tensors["text_model.embeddings.position_ids"] = np.arange(CONTEXT)[None]      # older checkpoints: ignored
    with pytest.raises(safetensors_io.SafetensorsError) as e:
        clip.convert_hf_state(tensors, cfg)
    assert "vision_model.pre_layrnorm.weight" in str(e.value) and "text_projection.weight" in str(e.value)
    assert "position_ids" not in str(e.value)
