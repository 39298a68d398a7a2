"""The lm-eval bridge, the shipped offline tasks, the evaluation cache (tiny models)."""

import json
import time

import pytest
import torch
from compress.eval import taskdata
from compress.eval.harness import SHIPPED, hub_reachable, resolve_tasks

from compress.data import pydoc_topics
from compress.errors import InputError, UsageError


pytestmark = pytest.mark.usefixtures("private_cache")  # $COMPRESS_CACHE per test


def test_lastword_items_are_paragraph_endings_of_the_eval_split():
    items = taskdata.lastword_records()
    assert len(items) >= 100
    eval_text = " ".join(" ".join(t.split()) for t in pydoc_topics("eval"))
    for it in items:
        word = it["target"]
        assert word.startswith(" ") and word[1:].isalpha() and len(word) >= 4
        assert len(it["context"].split()) >= taskdata.MIN_WORDS - 1
        assert (it["context"] + word) in eval_text  # context + target is the start of a real paragraph ending
    assert items == taskdata.lastword_records()  # deterministic


def test_data_files_are_written_to_the_cache(tmp_path):
    p = taskdata.data_file("pydoc_ppl")
    assert p.is_relative_to(tmp_path / "cache")
    rows = [json.loads(l) for l in p.read_text().splitlines()]
    assert [r["text"] for r in rows] == [r["text"] for r in taskdata.ppl_records()]
    ds = taskdata.dataset("pydoc_lastword")["test"]
    assert len(ds) == len(taskdata.lastword_records()) and set(ds.column_names) == {"context", "target"}


def test_resolve_tasks_names_files_and_folders(tmp_path):
    refs = resolve_tasks(list(SHIPPED) + ["hellaswag"])
    assert [r.name for r in refs] == [*SHIPPED, "hellaswag"]
    assert refs[0].folder.name == "tasks" and refs[2].folder is None
    folder = tmp_path / "mytasks"
    folder.mkdir()
    (folder / "a.yaml").write_text("task: my_a\ndataset_path: json\noutput_type: loglikelihood\n")
    (folder / "b.yml").write_text("task: my_b\ncustom_dataset: !function x.y\n")
    assert [r.name for r in resolve_tasks([str(folder)])] == ["my_a", "my_b"]
    one = resolve_tasks([str(folder / "a.yaml")])
    assert one[0].name == "my_a" and one[0].folder == folder.resolve()
    (folder / "a.yaml").write_text("task: my_a\ndataset_path: json\noutput_type: loglikelihood_rolling\n")
    assert resolve_tasks([str(folder / "a.yaml")])[0].digest != one[0].digest  # an edited file is a new cache key
    with pytest.raises(InputError, match="no such task file"):
        resolve_tasks([str(tmp_path / "nope.yaml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no task YAML"):
        resolve_tasks([str(tmp_path / "empty")])
    (tmp_path / "bad.yaml").write_text("just: a mapping\n")
    with pytest.raises(UsageError, match="task:"):
        resolve_tasks([str(tmp_path / "bad.yaml")])


def test_shipped_tasks_run_on_an_in_memory_model(tiny_llama):
    """lm-eval's HFLM on our loaded model: metrics with the right directions, limit respected, seeded."""
    from compress.eval.harness import run_tasks

    from compress.checkpoint.load import load

    model = load(tiny_llama, log=lambda m: None, dtype=torch.float32)
    tok = model.compress_source.tokenizer
    res = run_tasks(model, tok, resolve_tasks(list(SHIPPED)), limit=3, quiet=True)
    ppl, lw = res["pydoc_ppl"], res["pydoc_lastword"]
    assert ppl["samples"] == lw["samples"] == 3
    assert set(ppl["metrics"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert not any(ppl["higher_is_better"].values()) and lw["higher_is_better"] == {"acc": True}
    assert ppl["metrics"]["byte_perplexity"] > 1 and 0 <= lw["metrics"]["acc"] <= 1
    # bits per byte is log2 of the byte perplexity
    import math
    assert ppl["metrics"]["bits_per_byte"] == pytest.approx(math.log2(ppl["metrics"]["byte_perplexity"]), rel=1e-6)
    again = run_tasks(model, tok, resolve_tasks(["pydoc_ppl"]), limit=3, quiet=True)
    assert again["pydoc_ppl"]["metrics"] == ppl["metrics"]


def test_unreachable_task_data_fails_fast_with_how_to_use_a_local_copy(tiny_llama, tmp_path):
    """A task whose dataset lives on the hub: without the hub, InputError at once, not retries."""
    from compress.eval.harness import run_tasks

    from compress.checkpoint.load import load

    if hub_reachable():
        pytest.skip("the hub is reachable from here")
    f = tmp_path / "hub_task.yaml"
    f.write_text("task: hub_lambada\ndataset_path: EleutherAI/lambada_openai\ndataset_name: default\noutput_type: loglikelihood\n"
                 "test_split: test\ndoc_to_text: \"{{text}}\"\ndoc_to_target: \" x\"\nmetric_list:\n  - metric: acc\n")
    model = load(tiny_llama, log=lambda m: None, dtype=torch.float32)
    t0 = time.time()
    with pytest.raises(InputError) as e:
        run_tasks(model, model.compress_source.tokenizer, resolve_tasks([str(f)]), limit=2, quiet=True)
    assert time.time() - t0 < 15  # datasets' own retries take ~25 s per file
    msg = str(e.value)
    assert "hub_lambada" in msg and "could not be reached" in msg and "--task-file" in msg


def test_local_task_file_with_a_jsonl_dataset(tiny_llama, tmp_path):
    """A user's own task YAML over a local data file (the documented way to use a local copy)."""
    from compress.eval.harness import run_tasks

    from compress.checkpoint.load import load

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"q": f"The number {i} is", "a": " small"}) + "\n" for i in range(4)))
    f = tmp_path / "mine.yaml"
    f.write_text(f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\noutput_type: loglikelihood\n"
                 "test_split: test\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\nmetric_list:\n  - metric: acc\n")
    model = load(tiny_llama, log=lambda m: None, dtype=torch.float32)
    res = run_tasks(model, model.compress_source.tokenizer, resolve_tasks([str(f)]), quiet=True)
    assert res["mine"]["samples"] == 4 and set(res["mine"]["metrics"]) == {"acc"}
