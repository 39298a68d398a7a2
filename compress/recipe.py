"""The recipe: one YAML file is one reproducible job (model, calibration, passes, eval, export).

Every field has a default. ``--set a.b=c`` overrides a field before validation (list items by
index: ``passes.0.gptq.bits=3``; values are parsed as YAML, so ``true``, ``64`` and ``[a, b]``
mean what they look like). Validation errors name the field path and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import InputError, UsageError

# The embedded default job (`compress run` with no recipe): the demo model, GPTQ W4 with group
# 64 (576, the demo's hidden size, is not a multiple of 128), evaluated before and after.
DEFAULT_RECIPE: dict = {
    "model": "demo",
    "passes": [{"gptq": {"bits": 4, "group_size": 64, "symmetric": True}}],
    "export": {"path": "out/demo-gptq-w4g64"},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateConfig(_Strict):
    """How ``calibration.data: generated`` samples (compress.generation): the first token drawn
    uniformly from the vocabulary, then the model's own distribution."""

    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_k: int | None = Field(50, ge=1)  # draw among the k most likely tokens; null: all
    greedy_after: int | None = Field(None, ge=1)  # the most likely token once this many are written
    greedy_first: int = Field(0, ge=0)  # the most likely token until this many are written (LLM-QAT's hybrid)
    batch_size: int = Field(16, ge=1)  # sequences generated together


class CalibrationConfig(_Strict):
    # builtin corpus, a .txt/.jsonl/.parquet file, a hub dataset, or `generated`: samples × seq_len
    # tokens the model writes itself (data-free, LLM-QAT; compress.generation)
    data: str = "builtin:pydoc"
    generate: GenerateConfig = GenerateConfig()
    samples: int = Field(128, ge=0)  # 0: data-free (only for passes that need no statistics)
    seq_len: int = Field(512, ge=8)
    sampling: Literal["even", "random"] = "even"  # even: evenly spaced windows (seed-free)
    text_field: str = "text"  # the field/column holding text in .jsonl/.parquet/hub data
    batch_size: int = Field(8, ge=1)  # samples per forward pass of a block
    sequential: bool = True  # calibrate q/k/v, o, gate/up, down in turn on compressed inputs
    # windows the report's per-layer output error is measured on where no pass needs XᵀX itself
    # (wanda, magnitude, rtn; its cost is a layer forward per token); null: all, 0: none
    error_samples: int | None = Field(16, ge=0)
    # keep down_proj's calibration inputs to propagate each finished block without running
    # gate/up again: ~15% faster (demo), + tokens × intermediate × 4 bytes (0.4 GB on the demo)
    keep_mlp_inputs: bool = False
    # calibrate each block on the outputs of the already compressed blocks before it (false: on
    # the uncompressed model's, every layer compressed in isolation; for comparison)
    propagate: bool = True
    # refuse data that is not text (invalid UTF-8, control or replacement characters, far more
    # tokens per character than the tokenizer gives on English; compress.data); false: use it as it is
    check_text: bool = True


class PerplexityConfig(_Strict):
    data: str = "builtin:pydoc"  # its evaluation split; any text file is used whole
    seq_len: int = Field(512, ge=8)
    max_windows: int | None = Field(None, ge=1)  # cap for quick runs; None = the whole text
    batch_size: int = Field(1, ge=1)  # windows per forward; logits are (batch, seq_len, vocab) floats
    # one decoder block in memory at a time (compress.eval.layerwise: same result, memory flat in
    # the depth); auto: when the whole model in float32 would not fit in the memory available
    layerwise: Literal["auto"] | bool = "auto"


def _fraction(v):
    """``5%`` -> 0.05; numbers stay as they are."""
    if isinstance(v, str):
        t = v.strip()
        try:
            return float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise ValueError(f"{v!r} is not a number or a percentage (e.g. 0.05 or 5%)") from None
    return v


class GatesConfig(_Strict):
    """Quality gates: each compares a metric of the model with the baseline's, same protocol.

    Values are fractions or percentages (``5%`` = 0.05). A gate that matches no evaluated metric
    fails (so a typo never passes silently)."""

    # relative increase allowed on every perplexity metric (perplexity, */word_perplexity,
    # */byte_perplexity): model / baseline - 1 <= this
    max_ppl_increase: float | None = Field(None, ge=0)
    # model / baseline for higher-is-better metrics, baseline / model for lower-is-better ones;
    # one number for every metric, or per metric name: {acc: 0.97, perplexity: 0.95}
    min_recovery: float | dict[str, float] | None = None
    # absolute drop allowed (in the worse direction), per metric name: {acc: 0.02}, or one
    # number for every higher-is-better metric
    max_drop: float | dict[str, float] | None = None

    @field_validator("max_ppl_increase", mode="before")
    @classmethod
    def _pct(cls, v, info):
        return _fraction(v)

    @field_validator("min_recovery", "max_drop", mode="before")
    @classmethod
    def _pct_map(cls, v, info):
        if isinstance(v, dict):
            return {str(k): _fraction(x) for k, x in v.items()}
        return _fraction(v)

    @field_validator("min_recovery", "max_drop")
    @classmethod
    def _ranges(cls, v, info):
        items = v.items() if isinstance(v, dict) else [("", v)] if v is not None else []
        for k, x in items:
            where = f" for {k!r}" if k else ""
            if info.field_name == "min_recovery" and not 0 < x <= 1:
                raise ValueError(f"{x}{where}: a recovery ratio is between 0 and 1 (e.g. 0.97 or 97%)")
            if info.field_name == "max_drop" and x < 0:
                raise ValueError(f"{x}{where}: an allowed drop is >= 0 (e.g. 0.02 or 2%)")
        return v

    def active(self) -> bool:
        return any(v is not None for v in (self.max_ppl_increase, self.min_recovery, self.max_drop))


class EvalConfig(_Strict):
    perplexity: PerplexityConfig | None = Field(default_factory=PerplexityConfig)  # null: skip
    baseline: bool = True  # also evaluate the uncompressed model, same data and protocol
    # lm-eval tasks: names lm-eval knows (its own, or the shipped offline ones: pydoc_ppl,
    # pydoc_lastword), task YAML files, or folders of them
    tasks: list[str] = Field(default_factory=list)
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own default (0 for ours)
    limit: int | None = Field(None, ge=1)  # at most this many examples per task; None = all
    batch_size: int = Field(1, ge=1)  # lm-eval wrapper batch size (requests per forward)
    max_length: int | None = Field(None, ge=16)  # context cap for lm-eval; None = the model's
    cache: bool = True  # reuse results of an unchanged model, task and settings (cache dir)
    gates: GatesConfig = Field(default_factory=GatesConfig)

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):  # `--set eval.tasks=a,b`
            return [t.strip() for t in v.split(",") if t.strip()]
        return v


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_bytes(size: int | str) -> int:
    """``export.max_shard_size`` in bytes: an int, or a number and a unit as transformers writes
    them ("5GB" = 5·10^9, "2GiB" = 2·2^30, "500MB", "1.5GB")."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]) if m and not isinstance(size, bool) else 0
    if n <= 0:
        raise ValueError(f"{size!r} is not a size: give a positive number of bytes or a number and a unit (500MB, 4GB, 2GiB)")
    return n


class ExportConfig(_Strict):
    path: str | None = None  # the output folder; required by `run`
    # compressed-tensors (vLLM, transformers, compress.load) or gguf (llama.cpp: OUT/model.gguf)
    format: Literal["compressed-tensors", "gguf"] = "compressed-tensors"
    # gguf: the llama.cpp type or mix (q4_0, q4_k_m, ...; compress.checkpoint.gguf.TYPES): the
    # quantization passes solve on its grids, tensor by tensor as llama.cpp's mix assigns them
    type: str | None = None
    overwrite: bool = False  # replace an existing folder at `path`
    # low-rank layers: factored stores B and A (smaller and faster; compress.load rebuilds them);
    # merged multiplies them back into dense weights any tool loads (no size or speed gain)
    lowrank: Literal["factored", "merged"] = "factored"
    # bytes of tensors per safetensors shard, as transformers' save_pretrained(max_shard_size=...):
    # "4GB" (10^9 bytes), "500MB", "2GiB" (2^30) or a number of bytes; a tensor larger than that
    # gets a shard of its own. 4GB: a 1-3B model stays one file, larger ones split into files a
    # download or upload can retry one at a time, and the export folder holds about one shard more
    # than the export while it is written (see compress.checkpoint.export)
    max_shard_size: int | str = "4GB"
    # the runtime the export is for: vllm (GPU), vllm-cpu, transformers, compress (compress.load);
    # None: no restriction. Each pass checks that what it stores loads there, before any work
    # (exit 2 naming the scheme and what works instead); the rules are the module types'
    # (compress.modules.TARGETS), verified by tests/vllm and tests/checkpoint/test_transformers_load.py
    target: Literal["vllm", "vllm-cpu", "transformers", "compress"] | None = None

    @field_validator("type")
    @classmethod
    def _type(cls, v):
        if v is None:
            return v
        from compress.checkpoint.gguf import TYPES

        t = str(v).strip().lower()
        if t not in TYPES:
            raise ValueError(f"{v!r} is not a GGUF type compress writes; use one of {', '.join(TYPES)}")
        return t

    @model_validator(mode="after")
    def _gguf(self):
        if self.format == "gguf" and self.type is None:
            raise ValueError("format gguf needs a type (export.type or --gguf TYPE), e.g. q4_k_m")
        if self.type is not None and self.format != "gguf":
            self.format = "gguf"  # a type implies the format
        if self.format == "gguf" and self.target is not None:
            raise ValueError(f"target {self.target} names a compressed-tensors runtime; a GGUF export is for llama.cpp (drop --target)")
        return self

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v):
        size_bytes(v)  # a bad size is refused here, naming the field
        return v

    def shard_bytes(self) -> int:
        return size_bytes(self.max_shard_size)


class ReportConfig(_Strict):
    # each layer's error in the report: output (‖X(Ŵ−W)ᵀ‖²/‖XWᵀ‖² on calibration inputs; needs
    # calibration), weight (‖Ŵ−W‖²/‖W‖², no data), auto: output where a pass calibrates anyway,
    # else weight (a data-free recipe such as RTN or RTN W8A8 then reads no calibration data)
    layer_error: Literal["auto", "output", "weight"] = "auto"


class Recipe(_Strict):
    model: str = "demo"  # a folder, a .gguf file, a hub id, or `demo` (SmolLM2-135M-Instruct)
    seed: int = 0
    # where the engine computes: auto (the first CUDA device if any, else the CPU), cpu, cuda,
    # cuda:N; under torchrun each rank takes the GPU of its LOCAL_RANK (compress.engine.dist)
    device: str = "auto"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    passes: list[dict[str, dict[str, Any]]] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain data (saved with every result)."""
        out = self.model_dump(mode="json")
        out["passes"] = [{name: cfg.model_dump(mode="json")} for name, cfg in self.pass_configs()]
        return out

    def pass_configs(self) -> list[tuple[str, BaseModel]]:
        from compress.passes import get_pass

        out, errors = [], []
        for i, item in enumerate(self.passes):  # every bad pass is named, not only the first
            if len(item) != 1:
                errors.append(f"passes.{i}: each pass is one `name: {{options}}` item, got keys {list(item)}")
                continue
            (name, opts), = item.items()
            try:
                cls = get_pass(name, where=f"passes.{i}")
                out.append((name, cls.Config.model_validate(opts or {})))
            except UsageError as e:
                errors.append(str(e))
            except ValidationError as e:
                errors.append(_format_validation(e, f"passes.{i}.{name}"))
        if len(errors) == 1:
            raise UsageError(errors[0])
        if errors:
            raise UsageError("invalid recipe: " + "; ".join(m.removeprefix("invalid recipe: ") for m in errors))
        return out

    def seq_lens(self) -> dict[str, int]:
        """The window lengths the job feeds the model, by recipe field (those it uses)."""
        out = {"calibration.seq_len": self.calibration.seq_len} if self.calibration.samples > 0 else {}
        if self.eval.perplexity is not None:
            out["eval.perplexity.seq_len"] = self.eval.perplexity.seq_len
        return out

    def fingerprint(self, passes: int | None = None) -> str:
        """Hash of what determines the compressed weights (not eval or export settings);
        ``passes``: of the first that many passes only."""
        r = self.resolved()
        r["calibration"].pop("check_text")  # a check, not an input: the same data gives the same weights
        key = {k: r[k] for k in ("model", "seed", "calibration", "passes")}
        if passes is not None:
            key["passes"] = key["passes"][:passes]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _format_validation(e: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        where = ".".join(x for x in (prefix, loc) if x)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `compress run --help` lists the recipe format)"
        lines.append(f"{where or 'recipe'}: {msg}")
    return "invalid recipe: " + "; ".join(lines)


def apply_override(data: dict, assignment: str) -> None:
    """``a.b.0.c=value`` into the raw recipe dict (creating mappings on the way)."""
    if "=" not in assignment:
        raise UsageError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set calibration.samples=32")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UsageError(f"--set {key}: {'.'.join(parts[:i]) or 'list'} has no item {part} (it has {len(node)})")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]


def load_recipe(source: str | Path | dict | None = None, overrides: list[str] = ()) -> Recipe:
    """Read (a path, a dict, or None for all defaults), apply ``--set`` overrides, validate."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        p = Path(source)
        if not p.is_file():
            raise InputError(f"{p}: no such recipe file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{p}: a recipe is a YAML mapping (model:, calibration:, passes:, ...)")
    for a in overrides:
        apply_override(data, a)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UsageError(_format_validation(e)) from None
    recipe.pass_configs()  # validate pass names and options now, not halfway through a run
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)


# ---------------------------------------------------------------- method presets
# `compress quantize|prune|lowrank --method NAME` builds the passes of one row of METHODS: each
# pass takes the command's options it names (an option given as None is left to the pass's
# default) plus fixed values of its own. The rows of a command, in order, are its --method
# choices; their help text is the option's help.

_WEIGHTS = ("bits", "group_size", "symmetric")  # the weight format of the int quantizers
_GPTQ_ORDER = ("act_order", "static_groups", "objective", "outliers", "weak_columns")
# the last quantizer of a method also quantizes the token embedding and lm_head (--embeddings) and
# the Linears' inputs (--activations: W8A8, WnA8) and the KV cache where compress.load runs it (--kv-cache)
_EMB = ("embeddings", "activations", "kv_cache")
_PRUNE = ("sparsity", "pattern", "allocation", "owl_lambda", "owl_m")
_LOWRANK = ("reduction", "allocation", "rank")
# int8 weights per channel and int8 activations per token: --bits/--group-size/--asym do not apply
_W8A8 = {"bits": 8, "group_size": -1, "symmetric": True, "activations": {"bits": 8, "dynamic": True}}


@dataclass(frozen=True)
class PresetPass:
    name: str  # the pass (a key of compress.passes' registry)
    takes: tuple[str, ...] = ()  # the command-line options it takes, by recipe field name
    fixed: dict = field(default_factory=dict)  # values the method sets whatever the options say


@dataclass(frozen=True)
class Method:
    command: str  # the command that offers it: quantize, prune or lowrank
    passes: tuple[PresetPass, ...]
    help: str = ""  # its line in --method's help (beside the name)


def _lowrank(method: str, help: str) -> Method:
    return Method("lowrank", (PresetPass("lowrank", _LOWRANK, {"method": method}),), help)


METHODS: dict[str, Method] = {
    "gptq": Method("quantize", (PresetPass("gptq", _WEIGHTS + _GPTQ_ORDER + _EMB),)),
    "rtn": Method("quantize", (PresetPass("rtn", _WEIGHTS + _EMB),)),
    "awq": Method("quantize", (PresetPass("awq", _WEIGHTS + _EMB),), "AWQ scaling + clipping, then RTN"),
    "awq+gptq": Method("quantize", (PresetPass("awq", _WEIGHTS), PresetPass("gptq", _WEIGHTS + _GPTQ_ORDER + _EMB)),
                       "AWQ scaling + clipping, then GPTQ"),
    "smoothquant": Method("quantize", (PresetPass("smoothquant", ("alpha",)), PresetPass("gptq", _GPTQ_ORDER + _EMB, _W8A8)),
                          "SmoothQuant then GPTQ W8A8: int8 weights per channel, int8 activations per token; "
                          "--bits/--group-size/--asym do not apply"),
    "w8a8": Method("quantize", (PresetPass("gptq", _GPTQ_ORDER + _EMB, _W8A8),), "GPTQ W8A8 without smoothing"),
    "sparsegpt": Method("prune", (PresetPass("sparsegpt", _PRUNE),), "masked second-order reconstruction"),
    "wanda": Method("prune", (PresetPass("wanda", _PRUNE),), "|w|·‖x‖ scores, no update"),
    "magnitude": Method("prune", (PresetPass("magnitude", _PRUNE),), "|w|, no data"),
    "whitened": _lowrank("whitened", "SVD of W·chol(XᵀX): the least output error, SVD-LLM"),
    "asvd": _lowrank("asvd", "W scaled by mean|x|"),
    "svd": _lowrank("svd", "plain, weights only"),
}


def methods_of(command: str) -> list[str]:
    """The --method choices of ``command``, in table order."""
    return [name for name, m in METHODS.items() if m.command == command]


def method_help(command: str) -> str:
    """``--method``'s help: each choice with what it does."""
    items = [f"{n} ({METHODS[n].help})" if METHODS[n].help else n for n in methods_of(command)]
    return ", ".join(items[:-1]) + " or " + items[-1] + "."


def get_method(command: str, name: str) -> Method:
    if name not in methods_of(command):
        raise UsageError(f"--method {name!r}: choose one of {', '.join(methods_of(command))}")
    return METHODS[name]


def method_passes(command: str, name: str, options: dict[str, Any], ignore: list[str] | None = None) -> list[dict]:
    """The recipe's ``passes`` for ``compress COMMAND --method NAME``: each pass of the row with
    the options it takes and its fixed values; ``ignore``: layers left alone besides lm_head."""
    out = []
    for p in get_method(command, name).passes:
        opts = {k: options[k] for k in p.takes if options.get(k) is not None}
        opts.update(copy.deepcopy(p.fixed))
        if ignore:
            opts["ignore"] = ["lm_head", *ignore]
        out.append({p.name: opts})
    return out
