"""`compress distill` beyond logit distillation on calibration text, end to end on tiny models:
black-box (from a teacher's responses, any vocabulary), on-policy (GKD), a streamed corpus with
a token budget, and calibration data the model writes itself; and their bad input."""

import json

import pytest
from conftest import save_tiny
from test_distill_run import tiny, w3  # noqa: F401  (module fixtures)
from typer.testing import CliRunner

from compress.cli import app
from compress.data import load_texts

runner = CliRunner()
FAST = ["--samples", "8", "--seq-len", "64", "--set", "eval_every=2", "--set", "grad_accum=2", "--lr", "1e-3"]


pytestmark = pytest.mark.usefixtures("private_cache")  # $COMPRESS_CACHE per test


def _records(path, n=12):
    """Prompt/response records written from the builtin calibration text's topics."""
    texts = load_texts("builtin:pydoc")[:n]
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"prompt": "Explain: " + t[:40], "response": t[40:200]}) + "\n")
    return path


def _other_tokenizer():
    """A byte-level BPE of the tiny models' size trained on other text (other tokens, other ids)."""
    import pydoc_data.topics as T
    from conftest import VOCAB
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([T.topics[k] for k in sorted(T.topics)[-40:]],
                            trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None)


def _report(out):
    return json.loads((out / "report.json").read_text())


def _invoke(args):
    r = runner.invoke(app, args)
    return r


def test_black_box_from_teacher_data_trains_on_the_responses(w3, tmp_path):  # noqa: F811
    out = tmp_path / "bb"
    r = _invoke(["distill", str(w3), "--teacher-data", str(_records(tmp_path / "t.jsonl")), "-o", str(out), *FAST,
                 "--steps", "6", "--train", "scales", "--no-eval"])
    assert r.exit_code == 0, r.output
    d = _report(out)["distill"]
    assert d["teacher"] == "black-box" and d["heldout_measure"] == "response_nll"
    assert d["examples"]["train"] + d["examples"]["heldout"] == 12 and d["examples"]["response_tokens"] > 0
    assert d["heldout_kl_best"] < d["heldout_kl_start"]  # the held-out responses' cross-entropy went down
    assert d["tokens"] > 0 and d["steps"] == 6


def test_a_teacher_of_another_vocabulary_works_in_black_box_mode_and_is_refused_in_logit_mode(w3, tmp_path):  # noqa: F811
    other = save_tiny(tmp_path / "qwen2", "qwen2")
    _other_tokenizer().save_pretrained(other)  # the same size, other merges: another vocabulary
    r = _invoke(["distill", str(w3), "--teacher", str(other), "-o", str(tmp_path / "logit"), *FAST, "--no-eval"])
    assert r.exit_code == 2 and "black-box" in r.output and "--prompts" in r.output
    assert not (tmp_path / "logit").exists()
    (tmp_path / "p.txt").write_text("The class statement\nBuilt-in functions\nThe import system\nModules and packages\n")
    out = tmp_path / "bb"
    r = _invoke(["distill", str(w3), "--teacher", str(other), "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "16",
                 "-o", str(out), *FAST, "--steps", "2", "--no-eval"])
    assert r.exit_code == 0, r.output
    assert _report(out)["distill"]["examples"]["train"] == 3


@pytest.mark.parametrize("content, where", [("\n\n", "no usable record"), ('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n', ":2")])
def test_bad_teacher_data_exits_2_naming_the_file_and_writes_nothing(w3, tmp_path, content, where):  # noqa: F811
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    r = _invoke(["distill", str(w3), "--teacher-data", str(f), "-o", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2 and "bad.jsonl" in r.output and where in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, msg", [(["--prompts", "p.txt"], "add --teacher"), (["--teacher-data", "a", "--prompts", "b"], "give one"),
                                       (["--teacher-data", "t.jsonl", "--on-policy", "0.5"], "on_policy")])
def test_black_box_option_mistakes_exit_2(w3, tmp_path, args, msg):  # noqa: F811
    _records(tmp_path / "t.jsonl")
    r = _invoke(["distill", str(w3), *[str(tmp_path / a) if a.endswith((".txt", ".jsonl")) else a for a in args],
                 "-o", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2 and msg in r.output, r.output


def test_on_policy_distillation_runs_through_the_cli(tiny, w3, tmp_path):  # noqa: F811
    out = tmp_path / "gkd"
    r = _invoke(["distill", str(w3), "--teacher", str(tiny), "-o", str(out), *FAST, "--steps", "2", "--on-policy", "0.5",
                 "--loss", "jsd", "--set", "on_policy_tokens=16", "--no-eval"])
    assert r.exit_code == 0, r.output
    d = _report(out)["distill"]
    assert d["on_policy"] == 0.5 and d["steps"] == 2


def test_a_streamed_corpus_with_a_token_budget(tiny, w3, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(load_texts("builtin:pydoc")[:60]))
    out = tmp_path / "stream"
    r = _invoke(["distill", str(w3), "--teacher", str(tiny), "-o", str(out), *FAST, "--stream", str(corpus), "--tokens", "1000",
                 "--set", "heldout_windows=2", "--no-eval"])
    assert r.exit_code == 0, r.output
    d = _report(out)["distill"]
    assert d["stopped"] == "tokens" and 1000 <= d["tokens"] < 1000 + 2 * 64 * 2  # stopped at the step that crossed the budget
    assert d["windows"]["train"] == "streamed" and d["windows"]["heldout"] == 2
    r = _invoke(["distill", str(w3), "--teacher", str(tiny), "-o", str(tmp_path / "o2"), *FAST, "--stream", str(corpus)])
    assert r.exit_code == 2 and "distill.steps or distill.tokens" in r.output


def test_generated_calibration_data_distills(tiny, w3, tmp_path):  # noqa: F811
    out = tmp_path / "gen"
    r = _invoke(["distill", str(w3), "--teacher", str(tiny), "-o", str(out), *FAST, "--data", "generated", "--steps", "2", "--no-eval"])
    assert r.exit_code == 0, r.output
    assert _report(out)["settings"]["calibration"]["data"] == "generated"
