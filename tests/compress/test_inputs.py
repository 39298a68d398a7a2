"""Bad inputs refused before any model work, naming the input and what is wrong, writing nothing:
calibration data that is not text (exit 2), windows longer than the model's positions (exit 2),
a truncated GGUF file (exit 3)."""

from __future__ import annotations

import glob
import json
import os
import random
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import make_tokenizer, save_tiny
from typer.testing import CliRunner

from compress.checkpoint.source import (
    ModelSource,
    cache_dir,
    check_gguf,
    position_limit,
)
from compress.cli import app
from compress.data import (
    MAX_TOKENS_PER_CHAR_RATIO,
    SAMPLE_TEXT,
    calibration_tokens,
    load_texts,
    pydoc_topics,
    tokenize,
)
from compress.errors import InputError, UsageError
from compress.recipe import load_recipe

runner = CliRunner()
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "llama", "llama")


def _words(r) -> str:
    return " ".join(r.output.split())


def _quantize(model, out, *extra):
    return runner.invoke(app, ["quantize", str(model), "-o", str(out), "--method", "gptq", "--samples", "4", "--seq-len", "32",
                               "--no-eval", *extra])


def _only(folder: Path, *names: str) -> None:
    """Nothing but ``names`` in ``folder``: no export, no hidden .partial or work folder."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# --- calibration text that is not text -------------------------------------------------------------


def test_random_bytes_exit_2_naming_the_file_and_byte_and_write_nothing(tiny, tmp_path):
    cal = tmp_path / "cal.txt"
    cal.write_bytes(random.Random(0).randbytes(100_000))  # as 100 kB of /dev/urandom
    r = _quantize(tiny, tmp_path / "o", "--data", str(cal))
    assert r.exit_code == 2, r.output
    text = _words(r)
    assert "cal.txt" in text and "not UTF-8 text: at byte 0 (line 1)" in text and "--no-text-check" in text
    _only(tmp_path, "cal.txt")


def test_no_text_check_calibrates_on_it_anyway(tiny, tmp_path):
    cal = tmp_path / "cal.txt"
    cal.write_bytes(random.Random(0).randbytes(100_000))
    r = _quantize(tiny, tmp_path / "o", "--data", str(cal), "--no-text-check")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "config.json").is_file()
    assert "check_text: false" in (tmp_path / "o" / "recipe.yaml").read_text()


def test_control_characters_exit_2_through_the_cli(tiny, tmp_path):
    cal = tmp_path / "cal.txt"
    cal.write_bytes((SAMPLE_TEXT * 40).encode("utf-16-le"))  # ASCII as UTF-16 without a BOM: valid UTF-8, half NULs
    r = _quantize(tiny, tmp_path / "o", "--data", str(cal))
    assert r.exit_code == 2, r.output
    text = _words(r)
    assert "cal.txt: not text: 50% of its" in text and "control or replacement characters (U+0000" in text
    _only(tmp_path, "cal.txt")


def test_invalid_utf8_names_the_byte_and_line_in_txt_and_jsonl(tmp_path):
    latin1 = "A first line.\nLe café est très bon.\n".encode("latin-1")
    (tmp_path / "a.txt").write_bytes(latin1)
    with pytest.raises(UsageError, match=r"a\.txt: not UTF-8 text: at byte 20 \(line 2\), e9 20 65 73 is not UTF-8") as e:
        load_texts(str(tmp_path / "a.txt"), strict=True)
    assert e.value.exit_code == 2 and "--no-text-check" in str(e.value)
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "fine"}\n' + json.dumps({"text": "x"}).encode()[:-2] + b'\xff"}\n')
    with pytest.raises(UsageError, match=r"b\.jsonl: not UTF-8 text: at byte 28 \(line 2\), ff 22 7d 0a is not UTF-8 \(invalid start byte\), and 1 place in"):
        load_texts(str(tmp_path / "b.jsonl"), strict=True)
    (tmp_path / "c.txt").write_bytes("some text".encode("utf-16"))
    with pytest.raises(UsageError, match="UTF-16 byte-order mark"):
        load_texts(str(tmp_path / "c.txt"), strict=True)
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\rthree\n")  # newlines as read_text gives them, as before
    assert load_texts(str(tmp_path / "crlf.txt"), strict=True) == [(tmp_path / "crlf.txt").read_text()] == ["one\ntwo\nthree\n"]
    # not strict (evaluation data, --no-text-check): undecodable bytes become U+FFFD, as before
    assert load_texts(str(tmp_path / "a.txt")) == [latin1.decode("utf-8", errors="replace")]
    assert load_texts(str(tmp_path / "b.jsonl"))[1] == "x\ufffd"


def test_replacement_characters_and_parquet_records_are_checked(tmp_path):
    tok = make_tokenizer()
    lossy = random.Random(1).randbytes(20_000).decode("utf-8", errors="replace")  # a file once decoded leniently
    with pytest.raises(UsageError, match=r"lossy\.txt: not text: \d\d% of its [\d,]+ characters .*U\+FFFD ×") as e:
        calibration_tokens([lossy], tok, "lossy.txt")
    assert e.value.exit_code == 2
    assert len(calibration_tokens([lossy], tok, "lossy.txt", check=False)) > 0
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good text " * 50, "\x00\x01\x02" * 400]}), tmp_path / "d.parquet")
    with pytest.raises(UsageError, match="d.parquet: not text: .*U\\+0000"):
        calibration_tokens(load_texts(str(tmp_path / "d.parquet"), strict=True), tok, str(tmp_path / "d.parquet"))
    pq.write_table(pa.table({"text": [b"caf\xe9"]}), tmp_path / "e.parquet")  # a binary column
    with pytest.raises(UsageError, match=r"e\.parquet: row 0: not UTF-8 text: at byte 3"):
        load_texts(str(tmp_path / "e.parquet"), strict=True)


@pytest.fixture(scope="module")
def bpe4k():
    """A 4,000-piece byte-level BPE trained on Python's docs: 0.35 tokens per character on English."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(pydoc_topics("calibration"), trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _random_chars(lo: int, hi: int, n: int = 5000) -> str:
    rng = random.Random(0)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def _python_sources(n: int = 40) -> list[str]:
    return [Path(f).read_text(encoding="utf-8") for f in sorted(glob.glob(str(STDLIB / "*.py")))[:n]]


def test_tokens_per_character_refuses_random_characters_and_passes_code_and_docs(bpe4k):
    for name, texts in (("builtin:pydoc", load_texts("builtin:pydoc", strict=True)), ("stdlib", _python_sources()),
                        ("sample", [SAMPLE_TEXT * 3])):
        assert len(calibration_tokens(texts, bpe4k, name)) > 0
    rand = _random_chars(0x20000, 0x2A6DF)  # random CJK extension B characters (4 UTF-8 bytes each)
    with pytest.raises(UsageError, match=r"rand\.txt: does not read as text to the model's tokenizer: [\d.]+ tokens per character, "
                                         r"1\d\.\d times its 0\.3\d on English") as e:
        calibration_tokens([rand], bpe4k, "rand.txt")
    assert e.value.exit_code == 2 and "--no-text-check" in str(e.value)
    assert len(calibration_tokens([rand], bpe4k, "rand.txt", check=False)) > 0
    assert calibration_tokens([SAMPLE_TEXT], bpe4k, "x").tolist() == tokenize([SAMPLE_TEXT], bpe4k).tolist()


def _demo_tokenizer():
    path = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("the demo checkpoint is not cached (compress demo-model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _other_languages() -> dict[str, str]:
    """Prose in other languages shipped on this machine: CPython's CJK test texts, vim's tutor."""
    out = {Path(f).name: Path(f).read_text(encoding="utf-8") for f in glob.glob(str(STDLIB / "test" / "cjkencodings" / "*-utf8.txt"))}
    out |= {Path(f).name: Path(f).read_text(encoding="utf-8") for f in glob.glob("/usr/share/vim/vim*/tutor/tutor.*.utf-8")}
    return out


def test_real_text_passes_and_random_text_fails_with_a_real_tokenizer():
    """With SmolLM2's tokenizer (49,152 pieces): Python sources, Python's docs, prose in other
    languages pass; random characters and random bytes do not."""
    tok = _demo_tokenizer()
    samples = {"stdlib": "\n\n".join(_python_sources()), "pydoc": "\n\n".join(load_texts("builtin:pydoc"))} | _other_languages()
    assert len(samples) >= 3
    for name, text in samples.items():
        calibration_tokens([text], tok, name)
    cjk = "\n".join(t for n, t in _other_languages().items() if n.startswith(("big5", "gb", "euc_jp", "shift_jis", "cp949", "euc_kr")))
    if cjk:
        ids = len(tok(cjk).input_ids)
        english = len(tok.encode(SAMPLE_TEXT, add_special_tokens=False)) / len(SAMPLE_TEXT)
        assert 3 < ids / len(cjk) / english < MAX_TOKENS_PER_CHAR_RATIO  # far from English, still text
    for lo, hi in ((0x4E00, 0x9FFF), (0x20, 0xD7FF)):  # random CJK, random BMP characters
        with pytest.raises(UsageError, match="tokens per character"):
            calibration_tokens([_random_chars(lo, hi)], tok, "rand")
    with pytest.raises(UsageError, match="not text"):
        calibration_tokens([os.urandom(100_000).decode("utf-8", errors="replace")], tok, "urandom")


def test_check_text_is_a_recipe_field_outside_the_fingerprint_and_a_flag_of_calibrating_commands():
    on, off = load_recipe({}), load_recipe({"calibration": {"check_text": False}})
    assert on.calibration.check_text and not off.calibration.check_text
    assert on.fingerprint() == off.fingerprint()
    for command in ("quantize", "prune", "lowrank", "distill"):
        r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--no-text-check" in r.output, command


# --- seq_len beyond the model's positions ------------------------------------------------------------


def test_calibration_seq_len_beyond_max_position_embeddings_exit_2_before_any_work(tiny, tmp_path, monkeypatch):
    import compress.data as data

    def no_data(*a, **k):
        raise AssertionError("calibration data was read")

    monkeypatch.setattr(data, "load_texts", no_data)  # where the calibration set is read
    r = runner.invoke(app, ["quantize", str(tiny), "-o", str(tmp_path / "o"), "--method", "gptq", "--seq-len", "2049", "--no-eval"])
    assert r.exit_code == 2, r.output
    text = _words(r)
    assert "calibration.seq_len = 2,049" in text and "2,048 positions" in text and "max_position_embeddings" in text
    _only(tmp_path)


def test_eval_seq_len_beyond_n_positions_exit_2_in_run_and_eval(tmp_path):
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")  # n_positions 256
    recipe = {"model": str(gpt2), "passes": [{"rtn": {"bits": 4}}], "calibration": {"seq_len": 256, "samples": 2},
              "eval": {"perplexity": {"seq_len": 300}}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    r = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    text = _words(r)
    assert "eval.perplexity.seq_len = 300" in text and "256 positions" in text and "n_positions" in text
    assert "calibration.seq_len" not in text
    r = runner.invoke(app, ["eval", str(gpt2), "--seq-len", "257"])
    assert r.exit_code == 2 and "eval.perplexity.seq_len = 257" in _words(r)
    _only(tmp_path, "gpt2", "r.yaml")


def test_distill_checks_seq_len_and_text_before_training(tiny, tmp_path):
    base = ["distill", str(tiny), "--teacher", str(tiny), "-o", str(tmp_path / "d"), "--samples", "4"]
    r = runner.invoke(app, [*base, "--seq-len", "4096", "--no-eval"])
    assert r.exit_code == 2 and "calibration.seq_len = 4,096: longer than the 2,048 positions" in _words(r)
    cal = tmp_path / "cal.txt"
    cal.write_bytes(random.Random(0).randbytes(100_000))
    r = runner.invoke(app, [*base, "--seq-len", "32", "--data", str(cal), "--no-eval"])
    assert r.exit_code == 2 and "cal.txt: not UTF-8 text" in _words(r)
    _only(tmp_path, "cal.txt")


def test_position_limits():
    from transformers import AutoConfig

    assert position_limit(AutoConfig.for_model("gpt2", n_positions=256)) == (256, "n_positions")
    assert position_limit(AutoConfig.for_model("mistral", max_position_embeddings=8192, sliding_window=4096)) == (8192, "max_position_embeddings")
    assert position_limit(AutoConfig.for_model("bloom")) is None  # ALiBi: no position table
    yarn = AutoConfig.for_model("llama", max_position_embeddings=32768,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert position_limit(yarn)[0] == 131072 and "yarn RoPE scaling factor 4" in position_limit(yarn)[1]
    llama31 = AutoConfig.for_model("llama", max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    assert position_limit(llama31) == (131072, "max_position_embeddings")


def test_seq_len_at_the_limit_passes(tiny):
    src = ModelSource(tiny)
    src.check_seq_len({"calibration.seq_len": 2048, "eval.perplexity.seq_len": 2048})
    with pytest.raises(UsageError, match=r"calibration\.seq_len = 4,096 and eval\.perplexity\.seq_len = 2,049: longer than the 2,048"):
        src.check_seq_len({"calibration.seq_len": 4096, "eval.perplexity.seq_len": 2049})


# --- truncated GGUF ----------------------------------------------------------------------------------


def _gguf(path: Path) -> Path:
    """A small GGUF: metadata, two float tensors and a Q8_0 one."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_token_list([f"t{i}" for i in range(300)])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((300, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, np.float16))
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(rng.standard_normal((128, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf_names_the_bytes_listed_and_present(tmp_path):
    whole = _gguf(tmp_path / "whole.gguf")
    check_gguf(whole)
    reader = gguf.GGUFReader(whole)
    start, need = reader.data_offset, max(t.data_offset + t.n_bytes for t in reader.tensors) - reader.data_offset
    data = whole.read_bytes()
    for cut in (3, len(data) // 2):
        f = tmp_path / "cut.gguf"
        f.write_bytes(data[:-cut])
        with pytest.raises(InputError) as e:
            check_gguf(f)
        assert e.value.exit_code == 3
        assert str(e.value) == (f"{f}: truncated: the header lists {need:,} bytes of tensors, the file has "
                                f"{len(data) - cut - start:,} after its {start:,}-byte header; download it again")
    f.write_bytes(data[:start // 2])
    with pytest.raises(InputError, match=f"truncated: the file ends inside its header, at byte {start // 2:,}; download it again"):
        check_gguf(f)
    f.write_bytes(b"not a gguf at all")
    check_gguf(f)  # not a GGUF: left to the GGUF reader's own message


@pytest.mark.parametrize("cut", ["few", "half"])
def test_truncated_gguf_exit_3_through_the_cli_and_nothing_written(tmp_path, monkeypatch, cut):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    f = _gguf(tmp_path / "model.gguf")
    data = f.read_bytes()
    f.write_bytes(data[:-5] if cut == "few" else data[: len(data) // 2])
    r = _quantize(f, tmp_path / "o")
    assert r.exit_code == 3, r.output
    text = _words(r)
    assert "model.gguf: truncated: the header lists" in text and "download it again" in text
    _only(tmp_path, "model.gguf")
