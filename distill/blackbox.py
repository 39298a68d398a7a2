"""The data of black-box distillation: the student learns, by cross-entropy, the text a teacher
wrote in answer to prompts, the loss masked to the answer's tokens (as in Alpaca / Vicuna
style sequence-level distillation, Kim & Rush 2016). Only text passes from teacher to student, so
the teacher may have any architecture and any tokenizer.

* ``read_records``: teacher data from a .jsonl file (``{"prompt", "response"}`` or chat
  ``{"messages": [...]}`` ending with the assistant's answer);
* ``read_prompts``: prompts for a teacher to answer (.jsonl or .txt);
* ``teacher_responses``: the teacher answers them with transformers' ``generate``, cached on disk;
* ``encode_examples``: records -> right-padded token ids and a mask of the response tokens.

Mask convention: ``mask[i, t]`` True means token ``ids[i, t]`` is a target, predicted from the
logits at position ``t - 1``; position 0 is never a target (every prompt has at least one token).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from compress.checkpoint.load import load_source
from compress.checkpoint.source import ModelSource, cache_dir, resolve_model
from compress.data import decode_utf8
from compress.errors import InputError, UsageError
from compress.generation import model_key
from compress.utils import DiskError, atomic_write_text

TEACHER_CACHE = "teacher_responses"  # folder under cache_dir()
RECORD_FORMAT = ('each line one JSON object: {"prompt": str, "response": str}, or {"messages": [{"role": str, '
                 '"content": str}, ...]} whose last message is the assistant\'s answer')
_MARK = "@@response@@"  # stands for an answer's text when the chat template is rendered to find its end token


@dataclass
class Examples:
    """Encoded teacher data, ``N`` examples right-padded to ``L`` (the longest, at most seq_len).

    ids      (N, L) int64  prompt (through the chat template), response, end token, padding (the end token)
    mask     (N, L) bool   True on the response tokens and the end token (the targets)
    lengths  (N,)   int64  real length of each example before padding
    truncated  examples whose response was cut to fit seq_len
    dropped    examples left out because their prompt leaves no room for a response token
    """

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    truncated: int
    dropped: int


# ---------------------------------------------------------------------------------------------
# Reading records and prompts


def _json_lines(path) -> list[tuple[str, int, dict]]:
    """(``path:line``, line number, object) for each non-blank line of a .jsonl file; a line that
    is not a JSON object is a UsageError naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{p}: no such data file")
    out = []
    for i, line in enumerate(decode_utf8(p.read_bytes(), str(p)).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg}); {RECORD_FORMAT}") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{where}: a JSON {type(rec).__name__} where a JSON object is expected; {RECORD_FORMAT}")
        out.append((where, i, rec))
    return out


def _messages(value, where: str) -> list[dict]:
    """A record's ``messages`` checked and normalized to [{"role": str, "content": str}, ...]."""
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: field 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}} objects, "
                         f"got {json.dumps(value)[:80]}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"] or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: messages[{k}] must be an object with a non-empty string 'role' and a string 'content', "
                             f"got {json.dumps(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _record(rec: dict, where: str) -> dict:
    """One teacher-data line -> {"messages": prompt messages, "response": str}."""
    if "messages" in rec and ("prompt" in rec or "response" in rec):
        raise UsageError(f"{where}: the record has both 'messages' and 'prompt'/'response'; give one form. {RECORD_FORMAT}")
    if "messages" in rec:
        msgs = _messages(rec["messages"], where)
        if msgs[-1]["role"] != "assistant":
            raise UsageError(f"{where}: field 'messages' must end with the assistant's answer (role 'assistant'), "
                             f"but its last message has role {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise UsageError(f"{where}: field 'messages' holds only the assistant's answer; put the prompt's messages before it")
        prompt, response = msgs[:-1], msgs[-1]["content"]
    elif "prompt" in rec and "response" in rec:
        for f in ("prompt", "response"):
            if not isinstance(rec[f], str):
                raise UsageError(f"{where}: field {f!r} must be a string, got a JSON {type(rec[f]).__name__}")
        prompt, response = [{"role": "user", "content": rec["prompt"]}], rec["response"]
    else:
        raise UsageError(f"{where}: the record has fields {sorted(rec)}, not 'prompt' and 'response' nor 'messages'; {RECORD_FORMAT}")
    if not response.strip():
        raise UsageError(f"{where}: the response is empty; every record needs the teacher's answer (drop the line or fill it)")
    return {"messages": prompt, "response": response}


def read_records(path) -> list[dict]:
    """Records of a teacher-data .jsonl file: each line a JSON object with ``prompt`` and
    ``response`` (strings), or chat ``messages`` (a list of {role, content}; the last message must
    be role 'assistant': it is the response, the earlier ones the prompt). Blank lines skipped.
    Returns normalized records: {"messages": [...prompt messages...], "response": str} (a plain
    prompt becomes [{"role": "user", "content": prompt}]). A bad line is a UsageError naming
    ``path:line``, the field and what is expected; a missing file an InputError."""
    records = [_record(rec, where) for where, _, rec in _json_lines(path)]
    if not records:
        raise UsageError(f"{Path(path).expanduser()}: no usable record: the file has no non-blank line; {RECORD_FORMAT}")
    return records


def _prompt(rec: dict, where: str) -> list[dict]:
    """One prompt-file line -> the prompt's chat messages."""
    if "messages" in rec:
        msgs = _messages(rec["messages"], where)
        if msgs[-1]["role"] == "assistant":
            raise UsageError(f"{where}: field 'messages' ends with the assistant's message; a prompt ends with the turn the "
                             "teacher answers (drop the answer, or read the file as teacher data)")
        return msgs
    if isinstance(rec.get("prompt"), str):
        return [{"role": "user", "content": rec["prompt"]}]
    raise UsageError(f"{where}: expected a string field 'prompt' or a list 'messages' (the turns before the teacher's answer), "
                     f"got fields {sorted(rec)}")


def read_prompts(path) -> list[list[dict]]:
    """Prompts for a teacher to answer: a .jsonl file (objects with ``prompt``, or ``messages``
    whose last message is not the assistant's) or a .txt file (one prompt per non-blank line,
    stripped). Returns each as a list of chat messages."""
    p = Path(path).expanduser()
    if p.suffix == ".jsonl":
        prompts = [_prompt(rec, where) for where, _, rec in _json_lines(p)]
    elif p.suffix == ".txt":
        if not p.is_file():
            raise InputError(f"{p}: no such prompt file")
        lines = decode_utf8(p.read_bytes(), str(p)).splitlines()
        prompts = [[{"role": "user", "content": s.strip()}] for s in lines if s.strip()]
    else:
        raise UsageError(f"{p}: prompts are read from a .jsonl file (one {{\"prompt\": str}} or {{\"messages\": [...]}} per line) "
                         "or a .txt file (one prompt per line); rename or convert it")
    if not prompts:
        raise UsageError(f"{p}: no usable record: the file has no non-blank line")
    return prompts


# ---------------------------------------------------------------------------------------------
# Tokenizing


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """The prompt's token ids, ending where the answer begins: the messages through the
    tokenizer's chat template with the assistant's generation prompt where it has one (the
    template writes its own BOS), else the contents joined by newlines, then a newline, tokenized
    as ordinary text (BOS where the tokenizer adds one)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja templates raise their own errors (roles must alternate, ...)
            roles = [m["role"] for m in messages]
            raise UsageError(f"the tokenizer's chat template rejects a prompt with roles {roles} ({e}); "
                             "give the prompts in the order of turns the model's template expects") from e
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text)["input_ids"])


def _special_ids(tokenizer) -> set[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if getattr(t, "special", False)}


def end_token_id(tokenizer) -> int | None:
    """The token that ends an answer, what the student must learn to write to stop: the first
    special token the chat template writes after an assistant message's content (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>), else the EOS token, else None (a
    tokenizer with neither: answers then end without a token)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}],
                                                 tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this two-turn conversation: fall back to EOS
            text = ""
        if _MARK in text:
            special = _special_ids(tokenizer)
            after = tokenizer(text[text.rindex(_MARK) + len(_MARK):], add_special_tokens=False)["input_ids"]
            found = [i for i in after if i in special]
            if found:
                return int(found[0])
    return tokenizer.eos_token_id


def encode_examples(records: list[dict], tokenizer, seq_len: int) -> Examples:
    """Tokenize: the prompt messages through the tokenizer's chat template with
    add_generation_prompt=True where the tokenizer has a chat_template, then the response tokens
    followed by the end-of-turn / EOS token (``end_token_id``: the end token is part of the
    response, so the student learns to stop). Without a chat template: the prompt text, a
    newline, the response, EOS. ``mask`` is True exactly on the response tokens and the end token.
    A response that does not fit in ``seq_len`` is truncated (counted in ``truncated``); an
    example whose prompt leaves no room for a response token is dropped (``dropped``); none left
    is a UsageError saying how much longer seq_len must be."""
    if not records:
        raise UsageError("no teacher records to encode")
    end = end_token_id(tokenizer)
    kept, prompt_lens, truncated, shortest_dropped = [], [], 0, None
    for rec in records:
        p = encode_prompt(rec["messages"], tokenizer)
        r = list(tokenizer(rec["response"], add_special_tokens=False)["input_ids"]) + ([end] if end is not None else [])
        if len(p) >= seq_len:
            shortest_dropped = min(len(p), shortest_dropped or len(p))
            continue
        if len(p) + len(r) > seq_len:
            r, truncated = r[: seq_len - len(p)], truncated + 1
        kept.append(p + r)
        prompt_lens.append(len(p))
    if not kept:
        raise UsageError(f"seq_len={seq_len} is too short for the teacher data: every one of the {len(records)} prompts takes "
                         f"at least {shortest_dropped} tokens, leaving no room for a response token; raise seq_len by at "
                         f"least {shortest_dropped + 1 - seq_len} (to {shortest_dropped + 1}), better well beyond, or shorten the prompts")
    return _pad(kept, prompt_lens, tokenizer, truncated, len(records) - len(kept))


def _pad(seqs: list[list[int]], prompt_lens: list[int], tokenizer, truncated: int, dropped: int) -> Examples:
    """Right-pad the examples into Examples; the mask covers each example past its prompt. The
    padding is the end token (0 without one), not the tokenizer's pad token, which may lie past
    the model's embedding rows (an added token); at the right of a causal model no real token
    attends to it, and it is never a target."""
    pad = end_token_id(tokenizer) or 0  # an id the student's embedding surely has (never a target, never attended to)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    L = int(lengths.max())
    ids = torch.full((len(seqs), L), pad, dtype=torch.int64)  # (N, L)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    t = torch.arange(L)[None, :]  # (1, L)
    mask = (t >= torch.tensor(prompt_lens)[:, None]) & (t < lengths[:, None])  # (N, L)
    return Examples(ids=ids, mask=mask, lengths=lengths, truncated=truncated, dropped=dropped)


# ---------------------------------------------------------------------------------------------
# The teacher's answers


def _no_progress(done: int, total: int) -> None:
    pass


def _check_options(prompts, max_new_tokens: int, temperature: float, top_k, batch_size: int) -> None:
    bad = [(not prompts, "no prompts to answer"), (max_new_tokens < 1, f"max_new_tokens={max_new_tokens}: use at least 1"),
           (temperature < 0, f"temperature={temperature}: use 0 (greedy) or more"),
           (top_k is not None and top_k < 1, f"top_k={top_k}: use at least 1, or None for no top-k cut"),
           (batch_size < 1, f"batch_size={batch_size}: use at least 1")]
    msgs = [m for b, m in bad if b]
    if msgs:
        raise UsageError(f"teacher responses: {'; '.join(msgs)}")


def _cache_file(path: Path, prompts, options: dict) -> Path:
    """The cache file of these answers: a key of the teacher's files, the prompts and the options."""
    settings = {"model": model_key(path), "prompts": prompts, **options}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / TEACHER_CACHE / f"{key}.jsonl"


def _read_cache(cache: Path, prompts) -> list[dict] | None:
    """The cached records when the file holds one per prompt, in order; else None (regenerate)."""
    if not cache.is_file():
        return None
    try:
        records = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = len(records) == len(prompts) and all(isinstance(r, dict) and r.get("messages") == m and isinstance(r.get("response"), str)
                                               for r, m in zip(records, prompts))
    return records if ok else None


def _stop_ids(model, tokenizer) -> list[int]:
    """Every token id that ends the teacher's answer: its end-of-turn token, its tokenizer's and
    its generation config's EOS."""
    cfg = getattr(model.generation_config, "eos_token_id", None)
    ids = [end_token_id(tokenizer), tokenizer.eos_token_id, *(cfg if isinstance(cfg, list) else [cfg])]
    return sorted({int(i) for i in ids if i is not None})


def _decode(new: list[int], stops: list[int], tokenizer) -> str:
    """An answer's text: the generated tokens before the first stop token."""
    cut = next((k for k, i in enumerate(new) if i in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True)


def _answer_batch(model, tokenizer, batch: list[list[dict]], generate_kwargs: dict, stops: list[int], path) -> list[str]:
    """One batch of prompts, left-padded (generation appends on the right), answered by ``generate``."""
    rows = [encode_prompt(m, tokenizer) for m in batch]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), generate_kwargs["pad_token_id"], dtype=torch.int64)  # (B, P)
    attn = torch.zeros((len(rows), width), dtype=torch.int64)  # (B, P)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.int64)
        attn[i, width - len(r):] = 1
    dev = next(model.parameters()).device
    try:
        out = model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), **generate_kwargs)  # (B, P + new)
    except (AttributeError, NotImplementedError, TypeError) as e:
        raise UsageError(f"{path}: transformers cannot generate text with this model ({type(e).__name__}: {e}); "
                         "the teacher must be a causal language model with an LM head") from e
    return [_decode(row, stops, tokenizer) for row in out[:, width:].tolist()]


def _generate_kwargs(model, tokenizer, stops: list[int], max_new_tokens: int, temperature: float, top_k) -> dict:
    """``generate``'s options, set explicitly so the teacher's own generation config (top-p,
    repetition penalty, ...) does not change what the options and the cache key say."""
    rows = model.get_input_embeddings().num_embeddings
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None and tokenizer.pad_token_id < rows else (stops[0] if stops else 0)
    kw = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0, "num_beams": 1, "top_p": 1.0,
          "repetition_penalty": 1.0, "pad_token_id": pad, "eos_token_id": stops or None}
    if temperature > 0:
        kw.update(temperature=temperature, top_k=top_k or 0)  # generate's top_k=0: no top-k cut
    return kw


def _load_teacher(path: Path, device):
    """The teacher model (float32, eval mode) on ``device`` with its generation config (its stop
    tokens), and its tokenizer; a model without an LM head is a UsageError naming the path."""
    source = ModelSource(path)
    model = load_source(source)
    if (path / "generation_config.json").is_file():  # the model was built from config.json: its stop tokens live here
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise InputError(f"{path / 'generation_config.json'}: transformers cannot read it ({e}); fix or remove the file") from e
    if model.get_output_embeddings() is None or not hasattr(model, "generate"):
        raise UsageError(f"{path}: this {type(model).__name__} has no language-model head, so it cannot write answers; "
                         "the teacher must be a causal LM checkpoint (…ForCausalLM)")
    return model.to(device), source.tokenizer


@torch.no_grad()
def teacher_responses(teacher_path, prompts: list[list[dict]], *, max_new_tokens: int = 256, temperature: float = 0.0,
                      top_k: int | None = 50, seed: int = 0, batch_size: int = 8, log: Callable[[str], None] = print,
                      progress: Callable[[int, int], None] = _no_progress, device=None) -> list[dict]:
    """The teacher at ``teacher_path`` (a model reference: any causal LM transformers loads, with
    its own tokenizer) answers each prompt with ``model.generate`` (KV cache, stops at its
    end-of-turn / EOS tokens; temperature 0: greedy, else sampling at ``temperature`` over the
    ``top_k`` most likely tokens; left-padded batches of ``batch_size``). Deterministic for a seed
    on a given machine (torch's global generator is seeded inside a fork, and left as it was).
    ``device``: where the teacher runs (default: the GPU where there is one, else the CPU).

    Returns records like ``read_records``' ({"messages", "response"}). Cached under
    ``cache_dir()/teacher_responses/KEY.jsonl``, KEY hashing the teacher's files (``model_key``),
    the prompts and the options: a second call reads the cache."""
    _check_options(prompts, max_new_tokens, temperature, top_k, batch_size)
    path = resolve_model(teacher_path, log=log)
    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    sampling = {"top_k": top_k, "seed": seed} if temperature > 0 else {}  # greedy answers depend on neither
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size, "device": dev.type, **sampling}
    cache = _cache_file(path, prompts, options)
    if (records := _read_cache(cache, prompts)) is not None:
        log(f"teacher responses: {len(records)} answers of {path.name} from the cache ({cache})")
        return records
    how = "greedy" if temperature == 0 else f"temperature {temperature}, top-k {top_k}, seed {seed}"
    log(f"teacher responses: {path.name} answers {len(prompts)} prompts (at most {max_new_tokens} new tokens, {how}) on {dev.type}")
    model, tokenizer = _load_teacher(path, dev)
    stops = _stop_ids(model, tokenizer)
    kwargs = _generate_kwargs(model, tokenizer, stops, max_new_tokens, temperature, top_k)
    records = []
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b : b + batch_size]
            answers = _answer_batch(model, tokenizer, batch, kwargs, stops, path)
            records += [{"messages": m, "response": a} for m, a in zip(batch, answers)]
            progress(len(records), len(prompts))
    empty = sum(not r["response"].strip() for r in records)
    if empty:
        log(f"teacher responses: {empty} of {len(records)} answers are empty (the teacher stopped at once)")
    _write_cache(cache, records, log)
    return records


def _write_cache(cache: Path, records: list[dict], log: Callable[[str], None]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, "".join(json.dumps(r) + "\n" for r in records))
    except (OSError, DiskError) as e:  # a cache, not an output: a full or read-only disk costs the next run the time only
        log(f"teacher responses not cached ({e})")


@dataclass
class BlackBox:
    """Where black-box distillation's text comes from (``compress distill --teacher-data`` or
    ``--teacher MODEL --prompts FILE``): records of responses, or prompts the teacher answers."""

    teacher_data: Path | None = None
    prompts: Path | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0

    @classmethod
    def from_options(cls, teacher, teacher_data, prompts, max_new_tokens: int = 256, temperature: float = 0.0) -> BlackBox | None:
        """The CLI's options as a BlackBox (None: logit distillation, ``--teacher`` alone); a
        combination that says neither clearly is a UsageError."""
        if teacher_data is None and prompts is None:
            if teacher is None:
                raise UsageError("--teacher: give the model to learn from (logit distillation), or --teacher-data FILE.jsonl, or "
                                 "--teacher MODEL --prompts FILE (black-box)")
            return None
        if teacher_data is not None and prompts is not None:
            raise UsageError("--teacher-data and --prompts: give one (responses already written, or prompts the teacher answers)")
        if prompts is not None and teacher is None:
            raise UsageError("--prompts: the prompts need a teacher to answer them: add --teacher MODEL")
        if teacher_data is not None and teacher is not None:
            raise UsageError("--teacher-data holds the teacher's responses already; drop --teacher (or use --prompts to have it answer)")
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens: {max_new_tokens}; a response needs at least 1 token")
        if temperature < 0:
            raise UsageError(f"--response-temperature: {temperature}; use 0 (greedy) or more")
        return cls(Path(teacher_data) if teacher_data else None, Path(prompts) if prompts else None, max_new_tokens, temperature)

    def examples(self, student, teacher, seq_len: int, seed: int, hooks=None) -> Examples:
        """The records (read, or answered by ``teacher``, a ModelSource) in the student's tokens."""
        log = getattr(hooks, "log", print)
        if self.teacher_data is not None:
            records = read_records(self.teacher_data)
        else:
            progress = (lambda d, n: hooks.progress("teacher answers", d, n)) if hooks is not None else _no_progress
            records = teacher_responses(teacher.path, read_prompts(self.prompts), max_new_tokens=self.max_new_tokens,
                                        temperature=self.temperature, seed=seed, log=log, progress=progress)
        ex = encode_examples(records, student.tokenizer, seq_len)
        if ex.truncated or ex.dropped:
            log(f"black-box data: {ex.truncated} response(s) cut to calibration.seq_len={seq_len} tokens, {ex.dropped} example(s) "
                "dropped (the prompt alone fills seq_len)")
        return ex

    def describe(self) -> dict:
        if self.teacher_data is not None:
            return {"teacher_data": str(self.teacher_data)}
        return {"prompts": str(self.prompts), "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}
