"""Caption metrics users report, computed by pycocoevalcap's scorers (the COCO caption evaluation code): BLEU-1..4,
METEOR, ROUGE-L and CIDEr-D of candidate captions against reference captions.

    refs = load_references("refs.jsonl")          # {key: [caption, ...]}: COCO-style JSONL or a COCO annotations JSON
    scores = score({k: [c] for k, c in ...}, refs) # {"BLEU-4": ..., "CIDEr": ..., "tokenizer": ..., "unavailable": {...}}

* Tokenisation is COCO's: the Stanford PTB tokenizer that pycocoevalcap ships (Java), lowercased, punctuation tokens
  dropped. Without `java` on PATH, `python_ptb_tokenize` stands in: lowercase, PTB's splitting of punctuation,
  brackets and common contractions, the same punctuation dropped. It matches PTB on plain captions
  (tests/test_caption_metrics.py) but not on every corner of English, so its scores say `"tokenizer": "python"`.
* METEOR runs the METEOR 1.5 jar in pycocoevalcap (Java); without Java it is left out and named in `unavailable`.
* SPICE is not computed: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use, and nothing
  here downloads at run time.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence

from etils import epath

from oneflow_jax.cli import UserError

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: tokens dropped after tokenising
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";"}
_CONTRACTIONS = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)$")
_INNER = re.compile(r"(--|[!?;\"()\[\]{}])")                     # split wherever they stand in a word
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}   # lowercased PTB


def _ptb_words(chunk: str) -> list[str]:
    """One whitespace-separated chunk -> PTB-like tokens: quotes and brackets peeled off both ends, a final period
    split unless the word is an abbreviation (`u.s.`), `,` / `:` split at the ends only (`3:30`, `1,000` stay)."""
    lead, trail = [], []
    while chunk and chunk[0] in "\"'`([{":
        n = 2 if chunk[:2] in ("``", "''") else 1
        lead.append(chunk[:n])
        chunk = chunk[n:]
    while chunk:
        if chunk.endswith("..."):
            trail.insert(0, "...")
            chunk = chunk[:-3]
        elif chunk[-1] in "\"')]}!?,;:`":
            trail.insert(0, chunk[-1])
            chunk = chunk[:-1]
        elif chunk[-1] == "." and "." not in chunk[:-1]:
            trail.insert(0, ".")
            chunk = chunk[:-1]
        else:
            break
    inner = []
    for word in _INNER.sub(r" \1 ", chunk).split():
        m = _CONTRACTIONS.search(word)
        inner += [word[:m.start()], m.group(1)] if m and m.start() else [word]
    return lead + inner + trail


def _pycocoevalcap():
    try:
        import pycocoevalcap  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        raise UserError("caption metrics need pycocoevalcap: pip install 'oneflow_jax[metrics]'") from None


def java_available() -> bool:
    return shutil.which("java") is not None


def python_ptb_tokenize(caption: str) -> str:
    """The PTB tokenisation's effect on a plain caption, without Java (see the module docstring)."""
    tokens = [_BRACKETS.get(t, t) for chunk in caption.lower().split() for t in _ptb_words(chunk)]
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and t != '"')


def tokenize(captions: Mapping[object, Sequence[str]], use_java: bool | None = None) -> tuple[dict, str]:
    """{key: [caption]} -> ({key: [tokenised caption]}, which tokenizer ran)."""
    use_java = java_available() if use_java is None else use_java
    if use_java:
        _pycocoevalcap()
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top
        nested = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(nested), "ptb"
    return {k: [python_ptb_tokenize(c) for c in v] for k, v in captions.items()}, "python"


def score(candidates: Mapping[object, Sequence[str]], references: Mapping[object, Sequence[str]],
          use_java: bool | None = None) -> dict:
    """Corpus scores of one candidate per key against its references (keys of `candidates` must be in
    `references`). BLEU-n and ROUGE-L are in [0, 1], CIDEr(-D) in [0, 10] (COCO papers print it x100)."""
    _pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
    from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
    from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
    missing = [k for k in candidates if k not in references or not references[k]]
    if missing:
        raise UserError(f"{len(missing)} candidate(s) have no reference caption, e.g. {missing[0]!r}")
    if not candidates:
        raise UserError("no captions to score")
    bad = [k for k, v in candidates.items() if len(v) != 1]
    if bad:
        raise UserError(f"one candidate caption per key, got {len(candidates[bad[0]])} for {bad[0]!r}")
    use_java = java_available() if use_java is None else use_java
    keys = list(candidates)
    res, tokenizer = tokenize({k: candidates[k] for k in keys}, use_java)
    gts, _ = tokenize({k: references[k] for k in keys}, use_java)
    res = {k: [c if c else "<empty>"] for k, (c,) in res.items()}      # scorers assert one non-empty string each
    out: dict = {"n": len(keys), "tokenizer": tokenizer, "unavailable": {}}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
        meteor = Meteor()                 # a java process, ended when the scorer is collected
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        del meteor
    else:
        out["unavailable"]["METEOR"] = "needs java (the METEOR 1.5 jar ships with pycocoevalcap)"
    out["unavailable"]["SPICE"] = "needs Stanford CoreNLP models that pycocoevalcap downloads on first use"
    return out


def load_references(path: str) -> dict[str, list[str]]:
    """{image key: [reference captions]} from COCO-style JSONL lines `{"image": KEY, "captions": [...]}` (or a single
    `"caption"`), or a COCO annotations JSON (`images` with `id` / `file_name`, `annotations` with `image_id` /
    `caption`; keyed by file_name). Bad lines are one-line errors naming the line."""
    path = epath.Path(path)
    if not path.exists():
        raise UserError(f"references file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            coco = json.loads(text)
            names = {im["id"]: im.get("file_name", str(im["id"])) for im in coco["images"]}
            out: dict[str, list[str]] = {}
            for ann in coco["annotations"]:
                out.setdefault(names[ann["image_id"]], []).append(str(ann["caption"]))
            return out
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a COCO annotations file ({type(e).__name__}: {e})") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions = row["captions"] if "captions" in row else [row["caption"]]
            if not isinstance(captions, list) or not captions:
                raise ValueError("captions must be a non-empty list")
            out.setdefault(str(row["image"]), []).extend(str(c) for c in captions)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} line {n}: expected {{\"image\": ..., \"captions\": [...]}} ({e})") from None
    if not out:
        raise UserError(f"{path} holds no references")
    return out
