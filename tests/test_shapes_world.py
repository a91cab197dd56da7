"""shapes-world: renders, captions, held-out rule and judge follow the spec; the tfds builder writes ArrayRecord."""
import collections
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from oneflow_jax.data import datasets
from oneflow_jax.data import shapes_world as sw

WHITE = np.array(sw.BACKGROUND, np.uint8)
SIZES = {"circle": ({10, 11, 12}, {10, 11, 12}), "square": ({10, 11, 12}, {10, 11, 12}),
         "triangle": ({11, 12}, {10, 11, 12})}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An empty TFDS_DATA_DIR (not conftest's prepared copy): these tests build the dataset themselves."""
    path = str(tmp_path_factory.mktemp("tfds_empty"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", path)
        yield path


@pytest.fixture(scope="module")
def docs():
    return [sw.generate_document(split, i) for split in ("train", "eval") for i in range(300)]


def test_images_obey_spec(docs):
    for doc in docs:
        assert doc.images.dtype == np.uint8 and doc.images.shape[1:] == (32, 32, 3)
        for img, spec in zip(doc.images, doc.specs):
            colored = np.any(img != WHITE, axis=-1)
            for half, obj in enumerate((spec.left, spec.right)):
                region = np.zeros_like(colored)
                region[:, 16 * half:16 * half + 16] = True
                ys, xs = np.nonzero(colored & region)
                # Entirely inside its half with >= 1 px margin to the half's borders and the image border.
                assert xs.min() >= 16 * half + 1 and xs.max() <= 16 * half + 14
                assert ys.min() >= 1 and ys.max() <= 30
                # Flat fill with the exact colour; bounding box within the spec's size range.
                assert {tuple(c) for c in img[ys, xs]} == {sw.RGB[obj.color]}
                widths, heights = SIZES[obj.shape]
                assert xs.max() - xs.min() + 1 in widths and ys.max() - ys.min() + 1 in heights
                if obj.shape != "triangle":
                    assert xs.max() - xs.min() == ys.max() - ys.min()
            # No colour other than white and the palette anywhere.
            assert {tuple(c) for c in img.reshape(-1, 3)} <= {sw.BACKGROUND, *sw.RGB.values()}


def test_triangle_points_up_and_circle_is_round():
    tri = sw.shape_mask("triangle", 12, 11)
    assert tri[-1].all() and tri[0].sum() <= 2  # full base at the bottom, apex at the top
    circle = sw.shape_mask("circle", 12, 12)
    assert abs(circle.mean() - np.pi / 4) < 0.05 and not circle[0, 0]
    assert sw.shape_mask("square", 10, 10).all()


def test_captions_and_documents(docs):
    kinds = collections.Counter(d.kind for d in docs)
    assert set(kinds) == set(sw.KINDS) and min(kinds.values()) > 0.25 * len(docs)
    for doc in docs:
        captions = [sw.caption(s) for s in doc.specs]
        if doc.kind == "generation":
            assert doc.text == f"{captions[0]} <image>"
        elif doc.kind == "understanding":
            assert doc.text == f"<image> {captions[0]}"
        else:
            assert len(doc.specs) in (2, 3)
            assert doc.text == " then ".join(f"{c} <image>" for c in captions)
        for cap, spec in zip(captions, doc.specs):
            assert sw.parse_caption(cap) == spec.attributes
        pairs = sw.document_pairs(doc.text)
        assert [sw.parse_caption(c) for c, _ in pairs] == [s.attributes for s in doc.specs]
        assert [i for _, i in pairs] == list(range(len(doc.specs)))
    assert sw.caption(docs[0].specs[0]).startswith("a ") and "  " not in docs[0].text


def test_parse_caption_is_exact():
    good = "a red circle on the left and a blue square on the right"
    assert sw.parse_caption(good) == ("red", "circle", "blue", "square")
    for bad in (good + ".", "A" + good[1:], good.replace(" and ", "  and "), " " + good, good + " <image>",
                "a purple circle on the left and a blue square on the right", ""):
        assert sw.parse_caption(bad) is None


def test_held_out_rule(docs):
    held = sw.held_out_pairs()
    assert len(held) == 9 and len(sw.seen_pairs()) == 135
    red_circle, red_square, green_triangle = (sw.ObjectSpec("red", "circle"), sw.ObjectSpec("red", "square"),
                                              sw.ObjectSpec("green", "triangle"))
    assert sw.object_index(green_triangle) == 5 and sw.object_index(sw.ObjectSpec("yellow", "triangle")) == 11
    assert sw.is_held_out(sw.ImageSpec(red_circle, red_circle))            # 12*0 + 0 = 0
    assert sw.is_held_out(sw.ImageSpec(red_square, green_triangle))        # 12*1 + 5 = 17
    assert not sw.is_held_out(sw.ImageSpec(red_square, red_circle))        # 12
    for spec in held:
        assert (12 * sw.object_index(spec.left) + sw.object_index(spec.right)) % 17 == 0
    train = [s for d in docs[:300] for s in d.specs]
    evals = [s for d in docs[300:] for s in d.specs]
    assert not any(sw.is_held_out(s) for s in train)
    assert 0.3 < np.mean([sw.is_held_out(s) for s in evals]) < 0.7


def test_deterministic_from_seed():
    a, b = sw.generate_document("train", 17), sw.generate_document("train", 17)
    assert a.text == b.text and np.array_equal(a.images, b.images)
    c = sw.generate_document("train", 17, sw.GeneratorConfig(seed=1))
    assert not (a.text == c.text and np.array_equal(a.images, c.images))


def test_judge_on_clean_renders(docs):
    results = [sw.judge_image(img) == spec.attributes for d in docs for img, spec in zip(d.images, d.specs)]
    assert len(results) > 500 and np.mean(results) >= 0.99
    assert sw.judge_image(np.full((32, 32, 3), 255, np.uint8)) == (None, None, None, None)


def test_judge_tolerates_noise(docs):
    rng = np.random.default_rng(0)
    imgs = [(img, spec) for d in docs[:100] for img, spec in zip(d.images, d.specs)]
    ok = []
    for img, spec in imgs:
        noisy = np.clip(img.astype(np.int16) + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
        ok.append(sw.judge_image(noisy) == spec.attributes)
    assert np.mean(ok) >= 0.95


def test_builder_writes_array_record(data_dir):
    builder = tfds.builder("shapes_world", num_train=120, num_eval=40, seed=3)
    builder.download_and_prepare()
    assert builder.data_dir.startswith(data_dir)
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    files = datasets.split_filepaths(builder, "train")
    assert files and all(".array_record" in os.path.basename(f) and os.path.exists(f) for f in files)
    source = grain.sources.ArrayRecordDataSource(files)
    assert len(source) == 120 and isinstance(source[0], bytes)
    # Same (seed, split, index) -> same records, whatever the shuffled file order.
    texts = sorted(datasets.iter_texts(builder, "train"))
    assert texts == sorted(sw.generate_document("train", i, sw.GeneratorConfig(seed=3)).text for i in range(120))

    for split in ("train", "eval"):
        records = datasets.load_records("shapes_world", split, data_dir, num_train=120, num_eval=40, seed=3)
        assert len(records) == (120 if split == "train" else 40)
        flags = []
        for rec in records:
            assert rec["kind"] in sw.KINDS and rec["images"].shape[1:] == (32, 32, 3)
            caps = [sw.parse_caption(c) for c, _ in sw.document_pairs(rec["text"])]
            assert caps == rec["attributes"]
            assert [sw.judge_image(im) for im in rec["images"]] == rec["attributes"]
            held = [sw.is_held_out(sw.ImageSpec(sw.ObjectSpec(*a[:2]), sw.ObjectSpec(*a[2:])))
                    for a in rec["attributes"]]
            assert list(rec["image_held_out"]) == held and rec["held_out"] == any(held)
            flags += held
        assert (sum(flags) == 0) if split == "train" else (sum(flags) > 0)


def test_ensure_prepared_reuses(data_dir):
    b1 = datasets.ensure_prepared("shapes_world", num_train=30, num_eval=10)
    mtime = os.path.getmtime(datasets.split_filepaths(b1, "train")[0])
    b2 = datasets.ensure_prepared("shapes_world", num_train=30, num_eval=10)
    assert b2.data_dir == b1.data_dir and os.path.getmtime(datasets.split_filepaths(b2, "train")[0]) == mtime
    assert datasets.shapes_world_config().name == "default"
    assert datasets.shapes_world_config(num_train=30, num_eval=10).name != "default"
