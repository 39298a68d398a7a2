"""The data side of black-box distillation: reading teacher records and prompts, encoding them
with the response mask, and the teacher's answers (against transformers' own ``generate``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from compress.distill import blackbox
from compress.distill.blackbox import (
    encode_examples,
    encode_prompt,
    end_token_id,
    read_prompts,
    read_records,
    teacher_responses,
)
from conftest import make_tokenizer, save_tiny

from compress.errors import InputError, UsageError

EOS = "<|endoftext|>"
END = "<|end|>"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
RECORDS = [
    {"messages": [{"role": "user", "content": "What is a list?"}], "response": "A mutable sequence of objects."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define a tuple, please."}],
     "response": " An immutable sequence.\nIt can be hashed."},
    {"messages": [{"role": "user", "content": "x"}], "response": "Yes"},
]


def _tokenizer(template: bool):
    """The tests' tiny BPE tokenizer with an EOS token; ``template``: also a chat template whose
    turns end with <|end|>, a special token other than EOS."""
    tok = make_tokenizer()
    tok.add_special_tokens({"eos_token": EOS})
    if template:
        tok.add_special_tokens({"additional_special_tokens": [END]})
        tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(template=False)


@pytest.fixture(scope="module")
def chat_tok():
    return _tokenizer(template=True)


def _prompt_text(messages, tok) -> str:
    """What the prompt should read as, written independently of encode_prompt."""
    if tok.chat_template:
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages) + "<|assistant|>"
    return "\n".join(m["content"] for m in messages) + "\n"


# ---------------------------------------------------------------------------------------------
# encode_examples


@pytest.mark.parametrize("template", [False, True])
def test_the_mask_is_exactly_the_response_and_its_end_token(template, plain_tok, chat_tok):
    tok = chat_tok if template else plain_tok
    ex = encode_examples(RECORDS, tok, seq_len=512)
    end = END if template else EOS
    assert end_token_id(tok) == tok.convert_tokens_to_ids(end)
    assert ex.ids.dtype == torch.int64 and ex.mask.dtype == torch.bool and ex.lengths.dtype == torch.int64
    assert ex.ids.shape == ex.mask.shape == (len(RECORDS), int(ex.lengths.max()))
    assert (ex.truncated, ex.dropped) == (0, 0)
    for i, rec in enumerate(RECORDS):
        n = int(ex.lengths[i])
        ids, mask = ex.ids[i, :n], ex.mask[i, :n]
        assert tok.decode(ids[mask], skip_special_tokens=False) == rec["response"] + end
        # the targets are one block at the end of the example; everything before is the prompt
        first = int(mask.nonzero()[0])
        assert mask[first:].all() and not mask[:first].any() and first > 0
        assert tok.decode(ids[:first], skip_special_tokens=False) == _prompt_text(rec["messages"], tok)
        assert int(mask.sum()) == len(tok(rec["response"], add_special_tokens=False)["input_ids"]) + 1
        assert not ex.mask[i, n:].any()  # padding is never a target
    assert not ex.mask[:, 0].any()  # every target has a position before it to be predicted from


def test_prompt_tokens_are_never_targets_even_when_they_repeat_the_response(chat_tok):
    rec = {"messages": [{"role": "user", "content": "say: the same words"}, {"role": "assistant", "content": "the same words"},
                        {"role": "user", "content": "again"}], "response": "the same words"}
    ex = encode_examples([rec], chat_tok, seq_len=512)
    p = len(encode_prompt(rec["messages"], chat_tok))
    assert not ex.mask[0, :p].any() and ex.mask[0, p:].all()
    assert chat_tok.decode(ex.ids[0, ex.mask[0]], skip_special_tokens=False) == "the same words" + END


def test_without_a_chat_template_or_eos_no_end_token_is_added():
    tok = make_tokenizer()  # no template, no EOS
    assert end_token_id(tok) is None
    ex = encode_examples(RECORDS[:1], tok, seq_len=512)
    assert tok.decode(ex.ids[0, ex.mask[0]]) == RECORDS[0]["response"]


def test_a_response_too_long_is_truncated_to_seq_len(plain_tok):
    long = {"messages": [{"role": "user", "content": "Tell me."}], "response": "word " * 200}
    p = len(encode_prompt(long["messages"], plain_tok))
    seq_len = p + 10
    ex = encode_examples([long, RECORDS[2]], plain_tok, seq_len=seq_len)
    assert ex.truncated == 1 and ex.dropped == 0
    assert int(ex.lengths[0]) == seq_len == ex.ids.shape[1]
    assert int(ex.mask[0].sum()) == 10
    cut = plain_tok.decode(ex.ids[0, ex.mask[0]], skip_special_tokens=False)
    assert long["response"].startswith(cut) and EOS not in cut  # the end token went with the cut
    # the short example is whole, padded to the long one
    assert plain_tok.decode(ex.ids[1, ex.mask[1]], skip_special_tokens=False) == "Yes" + EOS
    assert int(ex.lengths[1]) < seq_len


def test_an_example_whose_prompt_fills_seq_len_is_dropped(plain_tok):
    big = {"messages": [{"role": "user", "content": "many words " * 40}], "response": "ok"}
    short = RECORDS[2]
    seq_len = len(encode_prompt(short["messages"], plain_tok)) + 5
    assert len(encode_prompt(big["messages"], plain_tok)) >= seq_len
    ex = encode_examples([big, short, big], plain_tok, seq_len=seq_len)
    assert (ex.dropped, ex.truncated) == (2, 0) and ex.ids.shape[0] == 1
    assert plain_tok.decode(ex.ids[0, ex.mask[0]], skip_special_tokens=False) == "Yes" + EOS


def test_nothing_left_after_dropping_says_how_much_longer_seq_len_must_be(plain_tok):
    recs = [RECORDS[0], RECORDS[2]]
    shortest = min(len(encode_prompt(r["messages"], plain_tok)) for r in recs)
    seq_len = shortest - 2
    with pytest.raises(UsageError, match=rf"seq_len={seq_len} is too short.*by at least 3 \(to {shortest + 1}\)"):
        encode_examples(recs, plain_tok, seq_len=seq_len)
    assert encode_examples(recs, plain_tok, seq_len=shortest + 1).ids.shape[0] >= 1  # the number it gives is enough


# ---------------------------------------------------------------------------------------------
# read_records / read_prompts


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_read_records_reads_both_forms_and_skips_blank_lines(tmp_path):
    f = _write(tmp_path / "d.jsonl", [
        {"prompt": "Hi?", "response": "Hello."},
        "",
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A", "extra": 1}]},
    ])
    assert read_records(f) == [
        {"messages": [{"role": "user", "content": "Hi?"}], "response": "Hello."},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "response": "A"},
    ]


@pytest.mark.parametrize("bad, what", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "JSON list where a JSON object"),
    ({"prompt": "p"}, r"fields \['prompt'\], not 'prompt' and 'response'"),
    ({"prompt": "p", "response": "  "}, "response is empty"),
    ({"prompt": "p", "response": 3}, "'response' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "must end with the assistant's answer"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "only the assistant's answer"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, r"messages\[0\] must be an object"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt": "p"}, "both"),
])
def test_read_records_names_the_bad_line_and_field(tmp_path, bad, what):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "", bad, {"prompt": "c", "response": "d"}])
    with pytest.raises(UsageError, match=rf"d\.jsonl:3: .*{what}"):
        read_records(f)


def test_read_records_empty_or_missing_file(tmp_path):
    with pytest.raises(UsageError, match=r"empty\.jsonl: no usable record"):
        read_records(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(InputError, match="nope.jsonl: no such"):
        read_records(tmp_path / "nope.jsonl")


def test_read_prompts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\n  Second one  \n")
    assert read_prompts(txt) == [[{"role": "user", "content": "First prompt"}], [{"role": "user", "content": "Second one"}]]
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    js = _write(tmp_path / "p.jsonl", [{"prompt": "A"}, {"messages": conv}])
    assert read_prompts(js) == [[{"role": "user", "content": "A"}], conv]


def test_read_prompts_rejects_answers_unknown_suffixes_and_empty_files(tmp_path):
    js = _write(tmp_path / "p.jsonl", [{"prompt": "A"}, {"prompt": "B"},
                                       {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    with pytest.raises(UsageError, match=r"p\.jsonl:3: field 'messages' ends with the assistant's message"):
        read_prompts(js)
    with pytest.raises(UsageError, match=r"p\.jsonl:1: expected a string field 'prompt'"):
        read_prompts(_write(tmp_path / "p.jsonl", [{"text": "A"}]))
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(UsageError, match=r"p\.csv: prompts are read from a \.jsonl file"):
        read_prompts(tmp_path / "p.csv")
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(UsageError, match=r"e\.txt: no usable record"):
        read_prompts(tmp_path / "e.txt")
    with pytest.raises(InputError):
        read_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------
# teacher_responses (a tiny random qwen2

PROMPTS = [[{"role": "user", "content": "The class statement"}], [{"role": "user", "content": "A"}],
           [{"role": "user", "content": "Built-in functions and the import system of modules"}]]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random qwen2 (untied head: its greedy answers vary, where the tied tiny llama repeats
    its last token); its tokenizer has no chat template and no EOS, its generation config no EOS."""
    return save_tiny(tmp_path_factory.mktemp("teacher") / "qwen2", "qwen2")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _hf_greedy(path, prompts, new_tokens: int, **generate_kw) -> list[list[int]]:
    """transformers' own greedy generate, one unpadded prompt at a time: the new tokens, the EOS
    that stopped it included."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for m in prompts:
        ids = tok(m[0]["content"] + "\n", return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, **generate_kw)[0, ids.shape[1]:]
        out.append(new.tolist())
    return out


def test_greedy_answers_equal_transformers_greedy_generate(teacher, cache):
    calls = []
    recs = teacher_responses(teacher, PROMPTS, max_new_tokens=6, batch_size=2, log=lambda m: None,
                             progress=lambda d, t: calls.append((d, t)), device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    assert transformers.GenerationConfig.from_pretrained(teacher).eos_token_id is None  # every answer is 6 tokens
    expected = [tok.decode(t) for t in _hf_greedy(teacher, PROMPTS, 6)]
    assert len(set(expected)) == len(PROMPTS)  # answers that tell the prompts apart
    assert [r["response"] for r in recs] == expected  # left-padded batches answer as single prompts do
    assert [r["messages"] for r in recs] == PROMPTS
    assert calls == [(2, 3), (3, 3)]


def test_answers_stop_at_the_teachers_eos(teacher, tmp_path, cache):
    teacher = shutil.copytree(teacher, tmp_path / "eos_teacher")
    greedy = _hf_greedy(teacher, PROMPTS[:1], 8)[0]
    k = next(k for k in range(1, len(greedy)) if greedy[k] not in greedy[:k])  # a token first written at step k
    gen = json.loads((teacher / "generation_config.json").read_text())
    (teacher / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": greedy[k]}))
    recs = teacher_responses(teacher, PROMPTS, max_new_tokens=8, batch_size=3, log=lambda m: None, device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    assert recs[0]["response"] == tok.decode(greedy[:k])
    stopped = _hf_greedy(teacher, PROMPTS, 8, eos_token_id=greedy[k])
    assert [r["response"] for r in recs] == [tok.decode([t for t in s if t != greedy[k]]) for s in stopped]


def test_sampling_is_deterministic_for_a_seed_and_leaves_torch_rng_alone(teacher, tmp_path, monkeypatch):
    def run(seed, where):
        monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / where))
        return [r["response"] for r in teacher_responses(teacher, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=50,
                                                         seed=seed, batch_size=2, log=lambda m: None, device="cpu")]

    state = torch.get_rng_state()
    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert a == b  # two cold runs, the same answers
    assert a != c
    assert torch.equal(torch.get_rng_state(), state)


def test_answers_are_cached_and_a_second_call_does_not_generate(teacher, cache, monkeypatch):
    logs = []
    first = teacher_responses(teacher, PROMPTS, max_new_tokens=4, log=logs.append, device="cpu")
    files = list((cache / "teacher_responses").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == len(PROMPTS)

    def boom(*a, **k):
        raise AssertionError("generate called on a cached run")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", boom)
    logs.clear()
    assert teacher_responses(teacher, PROMPTS, max_new_tokens=4, log=logs.append, device="cpu") == first
    assert any("from the cache" in m for m in logs)
    with pytest.raises(AssertionError, match="generate called"):  # other options: another key, generated again
        teacher_responses(teacher, PROMPTS, max_new_tokens=5, log=logs.append, device="cpu")
    with pytest.raises(AssertionError, match="generate called"):  # other prompts likewise
        teacher_responses(teacher, PROMPTS[:2], max_new_tokens=4, log=logs.append, device="cpu")


def test_a_teacher_without_an_lm_head_is_a_usage_error_naming_it(teacher, cache, monkeypatch):
    monkeypatch.setattr(blackbox, "load_source", lambda source: transformers.AutoModel.from_config(source.config).eval())
    with pytest.raises(UsageError, match=rf"{teacher}: this Qwen2Model has no language-model head"):
        teacher_responses(teacher, PROMPTS, max_new_tokens=2, log=lambda m: None, device="cpu")


def test_a_teacher_with_another_tokenizer_teaches_through_text(teacher, cache):
    import pydoc_data.topics as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    text = [T.topics[k] for k in sorted(T.topics)[-30:]]
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    student = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=None)
    student.add_special_tokens({"eos_token": "</s>"})
    student.add_special_tokens({"additional_special_tokens": ["<|turn_end|>"]})
    student.chat_template = TEMPLATE.replace("<|end|>", "<|turn_end|>")
    teacher_tok = transformers.AutoTokenizer.from_pretrained(teacher)
    assert student.get_vocab() != teacher_tok.get_vocab()

    recs = teacher_responses(teacher, PROMPTS, max_new_tokens=6, log=lambda m: None, device="cpu")
    ex = encode_examples(recs, student, seq_len=256)
    assert ex.dropped == 0 and ex.truncated == 0
    assert int(ex.ids.max()) < len(student)
    for i, r in enumerate(recs):
        assert student.decode(ex.ids[i, ex.mask[i]], skip_special_tokens=False) == r["response"] + "<|turn_end|>"
