"""The tokenizer of a GGUF file, built so that it cannot silently go wrong.

A GGUF stores its vocabulary as metadata (``tokenizer.ggml.*``): the token strings, a score and
a type per token, merges for byte-level BPE (``model = "gpt2"``), the special-token ids. The
SentencePiece kind (``model = "llama"``) has no merges: llama.cpp tokenizes it by repeatedly
joining the adjacent pair whose union is in the vocabulary with the highest score. For a
SentencePiece *BPE* model that score is minus the merge rank, so the scores are the merges.

transformers' GGUF converter does not always read them so: for the Gemma architectures
(``gemma3`` ...) it builds a Unigram model from the scores, and a Unigram model maximizing a sum
of ``-rank`` scores splits words into the pieces with the highest scores, down to single
characters when those score 0. The result encodes text at one token per character (68,600
characters as 68,600 tokens), and everything downstream (calibration, evaluation, export) runs
on it without a word.

So here:

* ``read_gguf_vocab`` reads the tokenizer metadata with the ``gguf`` package;
* ``scores_are_merge_ranks`` decides whether a merge-less SentencePiece vocabulary is BPE whose
  scores are merge ranks, and ``build_spm_bpe_tokenizer`` rebuilds it as a ``tokenizers`` BPE
  (merges derived from the ranks, as llama.cpp and SentencePiece's own BPE encoder apply them);
* ``gguf_tokenizer`` picks that builder or transformers' converter, and sets the special tokens
  the GGUF names (transformers' llama converter swaps bos and eos);
* ``verify_tokenizer`` checks every converted tokenizer on a fixed English sample (tokens per
  character, encode/decode round trip, special-token ids) and raises ``InputError`` (exit 3)
  naming the file and the failed check, before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from compress.data import SAMPLE_TEXT
from compress.errors import InputError

# gguf.TokenType values (llama.cpp's llama_token_type), spelled out to keep this module's import light.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# A multi-character piece of a BPE vocabulary exists because two earlier pieces were merged into
# it, so it splits into two vocabulary pieces that each are a single character (the alphabet) or
# score higher (merged earlier). Every such piece of a BPE vocabulary does (measured: 100% for
# BPE vocabularies of 600-8,000 pieces); Unigram vocabularies, whose scores are log-probabilities,
# do for 15-49% of theirs (trained on the same text). 0.9 sits between with room for a few
# hand-added pieces typed NORMAL.
MIN_CONSTRUCTIBLE = 0.9

# Check (a), tokens per character of SAMPLE_TEXT (measured): SmolLM2's 49,152-piece byte-level
# BPE 0.21; SentencePiece BPEs trained on Python's docs 0.32 (22,579 pieces), 0.40 (2,000), 0.54
# (600); a character-level split 0.96-1.00 (transformers' Unigram reading of those same GGUFs).
# 0.6 is twice what a real vocabulary gives (0.2-0.3) and 1.6 times below character level.
MAX_TOKENS_PER_CHAR = 0.6

# Check sample: SAMPLE_TEXT, plain ASCII English prose (compress.data: calibration text is measured on it too).


@dataclass
class GGUFVocab:
    """The tokenizer metadata of one GGUF file (``tokenizer.ggml.*``); absent keys are None."""

    path: Path
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece), "gpt2" (byte-level BPE), ...
    tokens: list[str]
    scores: list[float] | None = None
    token_type: list[int] | None = None  # NORMAL, CONTROL, BYTE, ... per token
    merges: list[str] | None = None  # "left right" per merge, in rank order (gpt2 kind)
    pre: str | None = None  # tokenizer.ggml.pre: the pre-tokenizer's name (gpt2 kind)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None  # SentencePiece's dummy prefix "▁" (llama.cpp's default: on)

    def special_ids(self) -> dict[str, int]:
        """Role ("bos", "eos", "unk", "pad") -> token id, for the roles the GGUF names."""
        ids = {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}
        return {role: i for role, i in ids.items() if i is not None}

    def type_of(self, i: int) -> int:
        """The token type of id ``i`` (from token_type, else guessed: byte pieces, named specials)."""
        if self.token_type is not None:
            return self.token_type[i]
        if _BYTE_PIECE.fullmatch(self.tokens[i]):
            return BYTE
        return CONTROL if i in self.special_ids().values() else NORMAL


def read_gguf_vocab(path: Path) -> GGUFVocab:
    """Read ``tokenizer.ggml.*`` from a GGUF file (InputError when unreadable or absent)."""

    path = Path(path)
    try:
        fields = gguf.GGUFReader(path).fields
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a damaged file
        raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    def get(key: str):
        f = fields.get(f"tokenizer.ggml.{key}")
        return None if f is None else f.contents()

    tokens, model = get("tokens"), get("model")
    if not tokens or model is None:
        raise InputError(f"{path}: this GGUF holds no tokenizer (no tokenizer.ggml.tokens / tokenizer.ggml.model)")
    vocab = GGUFVocab(
        path=path, model=model, tokens=tokens, scores=get("scores"), token_type=get("token_type"),
        merges=get("merges"), pre=get("pre"), bos_id=get("bos_token_id"), eos_id=get("eos_token_id"),
        unk_id=get("unknown_token_id"), pad_id=get("padding_token_id"), add_bos=get("add_bos_token"),
        add_eos=get("add_eos_token"), add_space_prefix=get("add_space_prefix"),
    )
    for name in ("scores", "token_type"):
        n = len(getattr(vocab, name) or tokens)
        if n != len(tokens):
            raise InputError(f"{path}: tokenizer.ggml.{name} has {n:,} entries for {len(tokens):,} tokens; the file is damaged")
    return vocab


def _merge_candidates(vocab: GGUFVocab) -> tuple[dict[str, int], dict[str, float], list[str]]:
    """Normal pieces -> id and -> score, and the multi-character ones (the merge results)."""
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    ids: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        if vocab.type_of(i) == NORMAL:
            ids.setdefault(t, i)
    score = {t: float(scores[i]) for t, i in ids.items()}
    return ids, score, [t for t in ids if len(t) > 1]


def constructible_fraction(vocab: GGUFVocab) -> float:
    """Fraction of the multi-character normal pieces that split into two normal pieces each of
    which is a single character or scores strictly higher (see ``MIN_CONSTRUCTIBLE``); 0 when
    the vocabulary has no multi-character piece."""
    ids, score, multi = _merge_candidates(vocab)

    def earlier(half: str, s: float) -> bool:
        return half in ids and (len(half) == 1 or score[half] > s)

    ok = sum(any(earlier(p[:k], score[p]) and earlier(p[k:], score[p]) for k in range(1, len(p))) for p in multi)
    return ok / len(multi) if multi else 0.0


def scores_are_merge_ranks(vocab: GGUFVocab) -> bool:
    """True for a SentencePiece vocabulary with no merges whose scores are BPE merge ranks."""
    if vocab.model != "llama" or vocab.merges or not vocab.scores:
        return False
    return constructible_fraction(vocab) >= MIN_CONSTRUCTIBLE


def spm_merges_from_ranks(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges from a vocabulary ranked by score: every split of every multi-character piece
    into two vocabulary pieces is a merge, ordered by the merged piece's rank, then by the ranks
    of its halves (what ``tokenizers``' SentencePieceExtractor does with a SentencePiece BPE
    model). Several splits of one piece share its priority, as in SentencePiece's and llama.cpp's
    encoders, which join any adjacent pair whose union is the best-scoring piece."""
    ids, score, multi = _merge_candidates(vocab)
    # rank: position by score, highest first; equal scores keep id order.
    rank = {t: r for r, t in enumerate(sorted(ids, key=lambda t: (-score[t], ids[t])))}
    keyed = []
    for p in multi:
        for k in range(1, len(p)):
            left, right = p[:k], p[k:]
            if left in ids and right in ids:
                keyed.append(((rank[p], rank[left], rank[right]), (left, right)))
    keyed.sort()
    return [m for _, m in keyed]


def build_spm_bpe_tokenizer(vocab: GGUFVocab):
    """A ``PreTrainedTokenizerFast`` for a SentencePiece BPE vocabulary whose scores are merge
    ranks: BPE over the whole text with "▁" for spaces (a "▁" prepended unless the GGUF says
    ``add_space_prefix = false``), byte fallback to the ``<0xXX>`` pieces where they exist,
    control tokens special, user-defined ones matched whole, and the GGUF's special tokens and
    add_bos/add_eos. This is transformers' LlamaConverter layout for a BPE SentencePiece model."""

    prefix = vocab.add_space_prefix is not False
    types = [vocab.type_of(i) for i in range(len(vocab.tokens))]
    token_ids: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        token_ids.setdefault(t, i)  # a duplicated string keeps its first id (BPE needs a bijection)
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None and vocab.unk_id < len(vocab.tokens) else None
    model = models.BPE(token_ids, spm_merges_from_ranks(vocab), unk_token=unk, fuse_unk=True, byte_fallback=BYTE in types)
    tk = Tokenizer(model)
    # split=False: SentencePiece does not cut text at spaces, and pieces like "▁▁▁" must stay reachable.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(vocab.tokens, types) if k in (CONTROL, UNKNOWN)])
    # SentencePiece matches user-defined pieces whole before BPE; GGUF stores their spaces as
    # spaces (runs of them, "\n\n", HTML tags), so they match the raw text. A lone space would
    # cut every word off its "▁", so it stays an ordinary piece.
    user = [t for t, k in zip(vocab.tokens, types) if k == USER_DEFINED and t not in (" ", "▁")]
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    names = {f"{role}_token": vocab.tokens[i] for role, i in vocab.special_ids().items() if i < len(vocab.tokens)}
    # Unstated, llama.cpp adds a BOS and no EOS to SentencePiece text; so do we.
    add_bos = vocab.add_bos if vocab.add_bos is not None else True
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, add_bos_token=add_bos, add_eos_token=bool(vocab.add_eos),
        clean_up_tokenization_spaces=False, **names,
    )


def apply_gguf_special_tokens(tok, vocab: GGUFVocab) -> None:
    """Name the GGUF's bos/eos/unk/pad tokens on ``tok``, and its add_bos/add_eos where stated.

    transformers' GGUF llama converter takes eos from the bos id (SmolLM2's eos comes out as
    ``<|im_start|>``) and leaves pad unset; the GGUF is the authority. Ids outside the vocabulary
    are left alone for ``verify_tokenizer`` to report."""
    for role, i in vocab.special_ids().items():
        if i < len(vocab.tokens) and getattr(tok, f"{role}_token", None) != vocab.tokens[i]:
            setattr(tok, f"{role}_token", vocab.tokens[i])
    for flag in ("bos", "eos"):
        stated = getattr(vocab, f"add_{flag}")
        if stated is not None and bool(getattr(tok, f"add_{flag}_token", False)) != stated:
            setattr(tok, f"add_{flag}_token", stated)


def gguf_tokenizer(path: Path, vocab: GGUFVocab) -> tuple[object, str]:
    """The tokenizer for a GGUF file and a one-line description of its kind (not yet verified).

    A merge-less SentencePiece vocabulary whose scores are merge ranks is rebuilt here as BPE;
    everything else goes through transformers' GGUF converter. Raises whatever that converter
    raises (the caller turns it into an InputError)."""
    path = Path(path)
    if scores_are_merge_ranks(vocab):
        tok = build_spm_bpe_tokenizer(vocab)
        kind = f"SentencePiece BPE rebuilt from the merge-rank scores ({len(vocab.tokens):,} tokens)"
    else:

        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = type(tok.backend_tokenizer.model).__name__
        kind = f"{model} from transformers' GGUF converter (tokenizer.ggml.model = {vocab.model!r}, {len(vocab.tokens):,} tokens)"
    apply_gguf_special_tokens(tok, vocab)
    return tok, kind


def verify_tokenizer(tok, path: Path, vocab: GGUFVocab) -> float:
    """Check a tokenizer converted from the GGUF at ``path``; return its tokens per character.

    (a) tokens per character of ``SAMPLE_TEXT`` at most ``MAX_TOKENS_PER_CHAR``;
    (b) decoding the encoded sample gives the sample back (a leading space aside);
    (c) each special token the GGUF names (bos, eos, unk, pad) has the GGUF's id and string in
        the tokenizer, and a BOS/EOS is added to encoded text exactly when the GGUF says so.

    Raises InputError (exit 3) naming the file and every failed check with its numbers."""
    failed: list[str] = []
    ids = tok.encode(SAMPLE_TEXT, add_special_tokens=False)
    tpc = len(ids) / len(SAMPLE_TEXT)
    if tpc > MAX_TOKENS_PER_CHAR:
        why = ": the tokenizer splits text into single characters" if tpc >= 0.9 else ""
        failed.append(f"(a) {tpc:.2f} tokens per character on English text ({len(ids):,} tokens for "
                      f"{len(SAMPLE_TEXT):,} characters; a subword tokenizer gives under {MAX_TOKENS_PER_CHAR}){why}")

    back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if back.removeprefix(" ") != SAMPLE_TEXT:
        at = next((i for i, (a, b) in enumerate(zip(back.removeprefix(" "), SAMPLE_TEXT)) if a != b), None)
        at = at if at is not None else min(len(back.removeprefix(" ")), len(SAMPLE_TEXT))
        failed.append(f"(b) decoding the encoded sample does not give it back: they differ from character {at} "
                      f"({SAMPLE_TEXT[at:at + 20]!r} became {back.removeprefix(' ')[at:at + 20]!r})")

    n = len(vocab.tokens)
    for role, i in vocab.special_ids().items():
        if i >= n:
            failed.append(f"(c) the GGUF's {role} token id {i:,} is outside its {n:,}-token vocabulary")
            continue
        have = tok.convert_ids_to_tokens(i) if i < len(tok) else None
        if have != vocab.tokens[i]:
            failed.append(f"(c) id {i} is {have!r} in the tokenizer but {vocab.tokens[i]!r} ({role}) in the GGUF")
        elif getattr(tok, f"{role}_token_id", None) != i:
            failed.append(f"(c) the tokenizer's {role} token is {getattr(tok, f'{role}_token', None)!r} "
                          f"(id {getattr(tok, f'{role}_token_id', None)}), the GGUF's is {vocab.tokens[i]!r} (id {i})")
    full = tok.encode(SAMPLE_TEXT, add_special_tokens=True)
    for flag, at in (("bos", 0), ("eos", -1)):
        stated, i = getattr(vocab, f"add_{flag}"), getattr(vocab, f"{flag}_id")
        if stated is None or i is None or i >= n:
            continue
        if (full[at] == i) != stated:
            failed.append(f"(c) the GGUF says add_{flag}_token = {stated}, but the tokenizer "
                          f"{'does not add' if stated else 'adds'} {vocab.tokens[i]!r}")
    if failed:
        raise InputError(f"{path}: the tokenizer converted from this GGUF fails its checks: " + "; ".join(failed)
                         + ". Use the original Hugging Face checkpoint (with its tokenizer.json) instead of this GGUF")
    return tpc
