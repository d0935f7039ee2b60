"""``rljax sft|reward|ppo|dpo|grpo|rloo``: the trainers from the command line.

    rljax sft --model_name_or_path DIR --dataset_name data.jsonl --learning_rate 1e-4 --max_steps 100
    rljax dpo --config dpo.yaml --beta 0.2
    rljax ppo --model_name_or_path sft_dir --reward_model rm_dir --dataset_name prompts.jsonl --steps 256
    rljax grpo --model_name_or_path sft_dir --dataset_name prompts.jsonl --reward_funcs my_rewards.exact_match
    rljax rloo --model_name_or_path sft_dir --dataset_name prompts.jsonl --reward_model rm_dir --rloo_k 4
    python -m rljax reward --help

Every field of the subcommand's config dataclass (``SFTConfig``, ``RewardConfig``,
``PPOConfig``, ``DPOConfig``: TRL's / HF TrainingArguments' names and defaults) is a flag of
the same name, plus the model/data arguments below. ``--config FILE.yaml`` supplies
defaults (flat ``name: value`` keys, the same names as the flags); flags on the command line
win; an unknown YAML key is an error listing the valid ones. ``--help`` lists every flag with
its default (YAML values included) and documentation. Booleans take ``--packing`` /
``--no_packing`` or HF's ``--packing True``.

Model and data (every subcommand):
  --model_name_or_path  local HF checkpoint directory or hub id (hub ids need internet)
  --dataset_name        a ``datasets.save_to_disk`` directory, a .json / .jsonl / .csv / .parquet
                        file (read by ``datasets.load_dataset("json"|"csv"|"parquet", data_files=...)``;
                        a .json file may hold ``{"train": [...], "test": [...]}``), a directory of such
                        files named by split (train.jsonl, test.jsonl), or a hub dataset id
  --tokenizer_name      tokenizer directory / hub id (default: the model's)
  --dataset_train_split / --dataset_test_split  splits to train on / evaluate on (when present)

Columns: sft ``text`` (or ``--dataset_text_field``); reward ``chosen`` / ``rejected`` texts
(optional ``prompt``) or TRL's tokenized ``input_ids_chosen``...; dpo ``prompt`` / ``chosen`` /
``rejected``; ppo a text column (``--dataset_text_field``, default ``text``) whose first
``--max_prompt_length`` tokens are the queries; grpo / rloo a ``prompt`` column (or
``--dataset_prompt_field``) of texts, the other columns passed to the reward functions.

GRPO and RLOO run the ``GRPOTrainer`` / ``RLOOTrainer`` shells (``GRPOConfig`` /
``RLOOConfig`` flags, later TRL's names): each step one jitted rollout (generate + log-probs)
and one jitted update; the rewards are Python functions on the decoded texts
(``--reward_funcs pkg.module.function ...``, TRL's ``reward_func(prompts, completions,
completion_ids, **columns)``) and/or a sequence-score checkpoint (``--reward_model DIR``).
Metrics go to ``output_dir/metrics.jsonl`` (plus ``--report_to``); checkpoints to
``output_dir/checkpoint-<step>/`` (every ``--save_steps`` steps and at the end, as sft); the final
policy to ``--output_dir``. For a JAX reward, ``rljax.grpo.make_train`` / ``rljax.rloo.make_train`` run
the whole loop as one compiled ``lax.scan`` instead.

PPO uses the functional core (``rljax.ppo_train.make_train``), not the ``PPOTrainer`` shell:
the reward is a reward-model checkpoint (``--reward_model DIR``, a sequence-score model such
as ``rljax reward`` writes, sharing the policy's tokenizer) applied as a JAX function, so
``--steps_per_call`` PPO iterations (rollout -> reward -> update) run as ONE compiled
``lax.scan`` with no Python between them. Metrics go to stdout and ``output_dir/metrics.jsonl``
(plus TensorBoard / W&B with ``--log_with``); sample generations to ``samples.md``.

``--resume_from_checkpoint DIR`` continues a run: for sft/reward/dpo/grpo/rloo a
``checkpoint-<step>`` directory written every ``--save_steps`` updates (grpo/rloo: steps, i.e.
generation batches) or the output_dir holding them (the newest intact one); for ppo the
``checkpoints`` directory (or the output_dir holding it) written every ``--save_steps``
iterations. The final model is saved (HF format, with the tokenizer) to ``--output_dir``.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "parse", "COMMANDS", "ModelDataArguments", "OnlineScriptArguments", "PPOScriptArguments",
           "load_dataset_splits"]


# --------------------------------------------------------------------------
# Script arguments (besides the trainer configs)
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ModelDataArguments:
    """What to train and on which data."""

    model_name_or_path: Optional[str] = None
    """Local HF checkpoint directory (config.json + safetensors) or hub id of the model to train."""
    dataset_name: Optional[str] = None
    """A datasets.save_to_disk directory, a .json/.jsonl/.csv/.parquet file (or a directory of them named by split), or a hub dataset id."""
    tokenizer_name: Optional[str] = None
    """Tokenizer directory or hub id (default: model_name_or_path)."""
    dataset_train_split: str = "train"
    """Split to train on (for datasets with splits)."""
    dataset_test_split: Optional[str] = "test"
    """Split to evaluate on at the end of training, when the dataset has it (None: no evaluation)."""
    config: Optional[str] = None
    """YAML file of flag defaults (keys are these flag names); flags given on the command line win."""


@dataclasses.dataclass
class PPOScriptArguments(ModelDataArguments):
    """PPO run options that PPOConfig does not have (generation, prompts, output, checkpoints)."""

    output_dir: str = "runs/ppo"
    """Where metrics.jsonl, samples.md, checkpoints/ and the final policy (HF format) go."""
    overwrite_output_dir: bool = False
    """Allow a fresh run to delete the checkpoints of an earlier run in output_dir."""
    resume_from_checkpoint: Optional[str] = None
    """Continue from the newest checkpoint in this checkpoints/ directory (or output_dir holding one)."""
    dataset_text_field: str = "text"
    """Dataset column whose text starts the queries."""
    max_prompt_length: int = 8
    """Query length in tokens: the first max_prompt_length tokens of each text."""
    max_new_tokens: int = 16
    """Response length in tokens (sampling stops early at eos)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Top-k filter (0: off, as TRL's examples)."""
    top_p: float = 1.0
    """Nucleus filter (1.0: off)."""
    reward_label_index: Optional[int] = None
    """Logit of the reward model used as the score (None: the only one of a num_labels=1 model)."""
    steps_per_call: int = 4
    """PPO iterations per compiled call (one lax.scan); metrics are logged per iteration after each call."""
    save_steps: int = 0
    """Checkpoint the whole PPO state every N iterations (0: only at the end)."""
    sample_every: int = 4
    """Log a table of query/response/reward samples every N iterations."""


@dataclasses.dataclass
class OnlineScriptArguments(ModelDataArguments):
    """GRPO / RLOO run options that GRPOConfig / RLOOConfig do not have (rewards, prompts)."""

    reward_funcs: Optional[List[str]] = None
    """Python reward functions on decoded texts, as import paths (pkg.module.function or pkg.module:function) called
    as TRL's reward_func(prompts, completions, completion_ids, **columns) -> list of floats (None: not applicable)."""
    reward_model: Optional[str] = None
    """A sequence-score checkpoint (e.g. the output_dir of `rljax reward`, sharing the policy's tokenizer): its
    score of prompt + completion is one more reward function."""
    reward_label_index: Optional[int] = None
    """Logit of the reward model used as the score (None: the only one of a num_labels=1 model)."""
    dataset_prompt_field: str = "prompt"
    """Dataset column holding the prompt texts (the other columns are passed to the reward functions)."""


# Documentation of config fields whose classes carry none (shown by --help).
FIELD_DOCS = {
    "dataset_text_field": "Dataset column holding the training text (default: 'text' when the dataset has it).",
    "packing": "Pack several examples into each max_seq_length sequence (TRL's ConstantLengthDataset).",
    "max_seq_length": "Truncate / pack sequences to this many tokens (None: min(model_max_length, 1024)).",
    "num_of_sequences": "Packing: examples buffered per packing round.",
    "chars_per_token": "Packing: characters per token used to size the buffer.",
    "dataset_batch_size": "Examples tokenized per batch.",
    "neftune_noise_alpha": "NEFTune embedding-noise scale (None: off).",
    "append_concat_token": "Packing: put eos between packed examples.",
    "add_special_tokens": "Let the tokenizer add its special tokens.",
    "pad_to_multiple_of": "Pad batches to a multiple of this length (fewer compiled shapes).",
    "max_length": "Maximum tokens of a sequence (prompt + completion).",
    "beta": "DPO temperature: strength of the implicit KL constraint to the reference.",
    "label_smoothing": "Conservative DPO: assumed probability that a preference label is flipped (sigmoid loss).",
    "loss_type": "DPO loss: sigmoid, hinge, ipo or kto_pair.",
    "label_pad_token_id": "Label id ignored by the loss.",
    "padding_value": "Padding id of input_ids (None: the tokenizer's pad token).",
    "truncation_mode": "Which end of a too-long prompt to keep: keep_end or keep_start.",
    "max_prompt_length": "Maximum prompt tokens.",
    "max_target_length": "Encoder-decoder models only (unused).",
    "disable_dropout": "Turn dropout off in the policy.",
    "generate_during_eval": "Not supported (TRL logs samples to W&B with it).",
    "precompute_ref_log_probs": "Compute the reference log-probs once over the dataset before training.",
    "reference_free": "Ignore the reference model (a uniform reference).",
}


# --------------------------------------------------------------------------
# Building the flat flag dataclass of a subcommand
# --------------------------------------------------------------------------


def _attribute_docs(cls: type) -> Dict[str, str]:
    """``{field: docstring}`` from the string literals that follow field definitions
    (through the MRO; the subclass wins). Fields a config generates from an algorithm's settings
    (``rljax.trainers.online.fields_from``) take their text from the settings class."""
    docs: Dict[str, str] = {}
    for klass in [*getattr(cls, "__fields_from__", ()), *reversed(cls.__mro__)]:
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(
                    nxt.value.value, str
                ):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _suppressed(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Annotated and any("Suppress" in repr(m) for m in hint.__metadata__)


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    hint: Any
    default: Any
    doc: str
    owner: str  # "config" | "script"


def _flag_fields(config_cls: type, script_cls: type) -> List[_Field]:
    out: List[_Field] = []
    seen: Dict[str, str] = {}
    for owner, cls in (("script", script_cls), ("config", config_cls)):
        hints = typing.get_type_hints(cls, include_extras=True)
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if not f.init or _suppressed(hints[f.name]):
                continue
            if f.name in seen:
                raise TypeError(f"{script_cls.__name__} and {config_cls.__name__} both define {f.name!r}.")
            seen[f.name] = owner
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = dataclasses.MISSING
            doc = docs.get(f.name) or FIELD_DOCS.get(f.name, "")
            out.append(_Field(f.name, hints[f.name], default, doc, owner))
    return out


def _flat_class(command: str, fields: Sequence[_Field]) -> type:
    import tyro

    spec = []
    for f in fields:
        hint = typing.Annotated[f.hint, tyro.conf.arg(help=f.doc or None)]
        if isinstance(f.default, (dict, list)):
            value = f.default
            spec.append((f.name, hint, dataclasses.field(default_factory=lambda v=value: type(v)(v))))
        elif f.default is dataclasses.MISSING:
            spec.append((f.name, hint))
        else:
            spec.append((f.name, hint, dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass(f"rljax_{command}_flags", spec)


# --------------------------------------------------------------------------
# YAML defaults and argv normalisation
# --------------------------------------------------------------------------


def _base_type(hint: Any) -> Any:
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    return hint


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string: turn strings into the field's number/bool type."""
    base = _base_type(hint)
    if not isinstance(value, str):
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if value.lower() in ("none", "null", "~"):
        return None
    try:
        if base is float:
            return float(value)
        if base is int:
            return int(value)
        if base is bool:
            if value.lower() in ("true", "yes", "1", "on"):
                return True
            if value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
    except ValueError:
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {getattr(base, '__name__', base)}.") from None
    return value


def read_yaml_config(path: str, fields: Sequence[_Field], command: str) -> Dict[str, Any]:
    """Flat ``{flag: value}`` from a YAML file, checked against the subcommand's flags."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file.")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of flag names to values, got {type(data).__name__}.")
    by_name = {f.name: f for f in fields}
    unknown = sorted(str(k) for k in data if k not in by_name or k == "config")
    if unknown:
        valid = sorted(n for n in by_name if n != "config")
        raise ValueError(
            f"Unknown key(s) {unknown} in {path} for `rljax {command}`. Valid keys: {', '.join(valid)}."
        )
    return {k: _coerce(v, by_name[k].hint, k) for k, v in data.items()}


def _pop_config_path(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    rest, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _normalise_bools(argv: List[str], fields: Sequence[_Field]) -> List[str]:
    """HF style ``--packing True`` / ``--packing=false`` -> tyro's ``--packing`` / ``--no_packing``."""
    bools = {f.name for f in fields if _base_type(f.hint) is bool and typing.get_origin(f.hint) is not typing.Union}
    bools |= {f.name for f in fields if f.hint is bool}
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, _, inline = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in bools:
            value = inline if inline else (argv[i + 1] if i + 1 < len(argv) and argv[i + 1].lower() in _TRUE + _FALSE else None)
            if value is not None:
                out.append(f"--{name}" if value.lower() in _TRUE else f"--no_{name}")
                i += 1 if inline else 2
                continue
        out.append(a)
        i += 1
    return out


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    summary: str
    config: Callable[[], type]
    script: type
    run: Callable[[Any, Any], Dict[str, Any]]


def parse(command: str, argv: Sequence[str] = (), defaults: Optional[Dict[str, Any]] = None):
    """``(config, script_args)`` of ``rljax COMMAND argv``. ``defaults``: flag defaults applied
    under the YAML file's (as if written in it). Raises ValueError for a bad YAML file or an
    invalid config; tyro exits (SystemExit) on bad flags and prints ``--help``."""
    import tyro

    cmd = COMMANDS[command]
    config_cls = cmd.config()
    fields = _flag_fields(config_cls, cmd.script)
    flat_cls = _flat_class(command, fields)
    path, rest = _pop_config_path(list(argv))
    values: Dict[str, Any] = {}
    by_name = {f.name: f for f in fields}
    for k, v in (defaults or {}).items():
        if k not in by_name:
            raise ValueError(f"Unknown default {k!r} for `rljax {command}`.")
        values[k] = v
    if path is not None:
        values.update(read_yaml_config(path, fields, command))
        values["config"] = path
    start = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    start.update(values)
    default = flat_cls(**start)
    flat = tyro.cli(
        flat_cls, args=_normalise_bools(rest, fields), default=default, prog=f"rljax {command}",
        description=f"rljax {command}: {cmd.summary}\n\n{_HELP_FOOTER}", use_underscores=True,
    )
    split = {"config": {}, "script": {}}
    for f in fields:
        split[f.owner][f.name] = getattr(flat, f.name)
    script = cmd.script(**split["script"])
    try:
        config = config_cls(**split["config"])
    except (ValueError, TypeError, ImportError) as e:
        raise ValueError(f"Invalid {config_cls.__name__}: {e}") from e
    _check_sinks(getattr(config, "report_to", None) or getattr(config, "log_with", None))
    return config, script


def _check_sinks(names) -> None:
    """Fail before any training when report_to / log_with names a sink that is unknown or not installed."""
    from rljax.logging import _INSTALL, available, resolve_sink_names

    for name in resolve_sink_names(names):
        if not available(name):
            module, command = _INSTALL[name]
            raise ValueError(f"Logging to {name} needs the {module!r} package: `{command}` (or choose another tracker).")


_HELP_FOOTER = (
    "Flags are the config's field names (TRL / HF TrainingArguments); --config FILE.yaml sets defaults "
    "that flags override; --resume_from_checkpoint DIR continues a run."
)


# --------------------------------------------------------------------------
# Loading models, tokenizers and data
# --------------------------------------------------------------------------


def _require(value: Optional[str], flag: str, command: str) -> str:
    if not value:
        raise ValueError(f"`rljax {command}` needs --{flag}.")
    return value


def load_tokenizer(script: ModelDataArguments, command: str):
    from transformers import AutoTokenizer

    name = script.tokenizer_name or _require(script.model_name_or_path, "model_name_or_path", command)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"Could not load a tokenizer from {name!r} ({type(e).__name__}: {e}). Save one next to the model "
            "(tokenizer.save_pretrained(dir)) or pass --tokenizer_name."
        ) from e


# File extension -> ``datasets`` packaged builder.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _json_top_level(path: str):
    """A .json file holding ``{split: rows}`` or ``{column: values}`` (which ``datasets``' json
    builder reads as ONE row): ``("splits", names)`` / ``("columns", data)``; ``None`` for rows."""
    with open(path) as f:
        head = ""
        while not head:
            chunk = f.read(4096)
            if not chunk:
                return None
            head = chunk.lstrip()[:1]
        if head != "{":
            return None
        f.seek(0)
        data = json.load(f)
    if not isinstance(data, dict) or not data or not all(isinstance(v, list) for v in data.values()):
        return None
    if all(isinstance(row, dict) for rows in data.values() for row in rows):
        return "splits", list(data)
    if len({len(v) for v in data.values()}) == 1:
        return "columns", data
    raise ValueError(f"{path}: expected rows, {{split: rows}} or equal-length {{column: values}}.")


def _load_data_file(path: str):
    """A ``Dataset`` / ``DatasetDict`` from one local file, through ``datasets.load_dataset``
    with the builder of its extension (json for .json/.jsonl, csv, parquet)."""
    import datasets

    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"--dataset_name {path!r}: unknown data file format {ext or '(no extension)'!r}; use one of "
            f"{sorted(DATA_FILE_BUILDERS)}, a datasets.save_to_disk directory, or a directory of such files "
            "named by split (train.jsonl, test.jsonl, ...)."
        )
    builder = DATA_FILE_BUILDERS[ext]
    layout = _json_top_level(path) if ext == ".json" else None
    if layout is not None and layout[0] == "splits":
        return datasets.DatasetDict(
            {k: datasets.load_dataset("json", data_files=path, field=k, split="train") for k in layout[1]})
    if layout is not None:  # columns: the json builder would make one row of lists
        return datasets.Dataset.from_dict(layout[1])
    return datasets.load_dataset(builder, data_files=path, split="train")


def _is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` directory."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))


def load_dataset_splits(name: str, train_split: str = "train", test_split: Optional[str] = "test"):
    """``(train, test_or_None)`` ``datasets.Dataset`` s from a local data set or a hub id.

    ``name`` is a ``save_to_disk`` directory (``datasets.load_from_disk``), a .json / .jsonl /
    .csv / .parquet file (``datasets.load_dataset(builder, data_files=name)``; a .json file may
    also hold ``{split: rows}``), a directory of such files named by split (``train.jsonl``,
    ``test.csv``, ...: ``datasets.load_dataset(name)``), or a hub dataset id (needs internet).
    A data set without splits is all train."""
    import datasets

    if os.path.isdir(name):
        ds = datasets.load_from_disk(name) if _is_saved_dataset(name) else _load_directory(name)
    elif os.path.isfile(name):
        ds = _load_data_file(name)
    elif os.path.splitext(name)[1].lower() in DATA_FILE_BUILDERS:
        raise ValueError(f"--dataset_name {name!r}: no such file.")
    else:
        try:
            ds = datasets.load_dataset(name)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, ...
            raise ValueError(
                f"--dataset_name {name!r} is not a local directory or data file "
                f"({'/'.join(sorted(DATA_FILE_BUILDERS))}), and loading it from the hub failed "
                f"({type(e).__name__}: {str(e)[:300]})."
            ) from e
    if isinstance(ds, datasets.DatasetDict):
        if train_split not in ds:
            raise ValueError(f"Dataset {name!r} has no split {train_split!r} (splits: {list(ds)}); set --dataset_train_split.")
        return ds[train_split], (ds[test_split] if test_split and test_split in ds else None)
    return ds, None


def _load_directory(path: str):
    """A directory of data files (``datasets.load_dataset(path)`` infers splits from the names)."""
    import datasets

    files = [f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in DATA_FILE_BUILDERS]
    if not files:
        raise ValueError(
            f"--dataset_name {path!r}: the directory is neither a datasets.save_to_disk directory nor holds data "
            f"files ({'/'.join(sorted(DATA_FILE_BUILDERS))}, named by split: train.jsonl, test.jsonl, ...)."
        )
    return datasets.load_dataset(path)


def _json_safe(d: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def _finish(config, result: Dict[str, Any], command: str) -> Dict[str, Any]:
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "train_results.json"), "w") as f:
        json.dump(_json_safe(result), f, indent=2)
    print(f"[rljax {command}] done: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    print(f"[rljax {command}] model saved to {config.output_dir}")
    return result


# --------------------------------------------------------------------------
# Subcommands (thin wrappers around the trainers)
# --------------------------------------------------------------------------


def run_sft(config, script: ModelDataArguments) -> Dict[str, Any]:
    from rljax.models import from_pretrained
    from rljax.trainers.sft import SFTTrainer

    tokenizer = load_tokenizer(script, "sft")
    train, test = load_dataset_splits(_require(script.dataset_name, "dataset_name", "sft"), script.dataset_train_split,
                                      script.dataset_test_split)
    if config.dataset_text_field is None and not config.packing and "text" in train.column_names:
        config.dataset_text_field = "text"
    module, params = from_pretrained(script.model_name_or_path)
    trainer = SFTTrainer((module, params), config, train_dataset=train, eval_dataset=test, tokenizer=tokenizer)
    result = trainer.train()
    if test is not None:
        result.update(trainer.evaluate())
    trainer.save_model(config.output_dir)
    return _finish(config, result, "sft")


def run_reward(config, script: ModelDataArguments) -> Dict[str, Any]:
    from rljax.data import tokenize_preference_dataset
    from rljax.trainers.reward import REWARD_COLUMNS, RewardTrainer

    tokenizer = load_tokenizer(script, "reward")
    train, test = load_dataset_splits(_require(script.dataset_name, "dataset_name", "reward"), script.dataset_train_split,
                                      script.dataset_test_split)

    def prepare(ds):
        if ds is None or all(c in ds.column_names for c in REWARD_COLUMNS):
            return ds
        return tokenize_preference_dataset(ds, tokenizer, max_length=config.max_length)

    trainer = RewardTrainer(_require(script.model_name_or_path, "model_name_or_path", "reward"), config,
                            train_dataset=prepare(train), eval_dataset=prepare(test), tokenizer=tokenizer)
    result = trainer.train()
    if test is not None:
        result.update(trainer.evaluate())
    trainer.save_model(config.output_dir)
    return _finish(config, result, "reward")


def run_dpo(config, script: ModelDataArguments) -> Dict[str, Any]:
    from rljax.models import from_pretrained
    from rljax.trainers.dpo import DPOTrainer

    tokenizer = load_tokenizer(script, "dpo")
    train, test = load_dataset_splits(_require(script.dataset_name, "dataset_name", "dpo"), script.dataset_train_split,
                                      script.dataset_test_split)
    module, params = from_pretrained(script.model_name_or_path)
    trainer = DPOTrainer((module, params), None, args=config, train_dataset=train, eval_dataset=test, tokenizer=tokenizer)
    result = trainer.train()
    if test is not None:
        result.update(trainer.evaluate())
    trainer.save_model(config.output_dir)
    return _finish(config, result, "dpo")


def _prompt_bank(texts: Sequence[str], tokenizer, length: int):
    """Left-padded ``[n, length]`` query ids and mask: the first ``length`` tokens of each text."""
    import numpy as np

    from rljax.data import pad_sequences

    ids = [tokenizer(t, add_special_tokens=False).input_ids[:length] for t in texts if isinstance(t, str)]
    ids = [x for x in ids if x]
    if not ids:
        raise ValueError("No usable prompts: every text is empty after tokenization.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = pad_sequences(ids, pad, "left", length)
    mask = pad_sequences([np.ones(len(x), np.int32) for x in ids], 0, "left", length)
    return prompts, mask


def _ppo_checkpoint_dir(path: str) -> str:
    return path if os.path.basename(os.path.normpath(path)) == "checkpoints" or not os.path.isdir(
        os.path.join(path, "checkpoints")) else os.path.join(path, "checkpoints")


def ppo_sinks(log_with: Optional[str]) -> List[str]:
    """PPOConfig.log_with -> sinks: stdout and output_dir/metrics.jsonl always, plus the tracker."""
    return ["stdout", "jsonl"] + ([log_with] if log_with not in (None, "jsonl") else [])


def run_ppo(config, script: PPOScriptArguments) -> Dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rljax.checkpoint import Checkpointer
    from rljax.generation import make_generate_fn
    from rljax.logging import MetricLogger
    from rljax.models.heads import (
        AutoModelForCausalLMWithValueHead,
        save_value_head_model,
        sequence_score_from_pretrained,
    )
    from rljax.ppo_train import PPOTrainState, check_prompt_bank, make_train

    model_path = script.model_name_or_path or config.model_name
    dataset = script.dataset_name or config.query_dataset
    reward_path = config.reward_model
    if not reward_path or not os.path.isdir(reward_path):
        raise ValueError(
            f"`rljax ppo` needs --reward_model DIR: a sequence-score checkpoint (e.g. the output_dir of `rljax reward`), "
            f"got {reward_path!r}."
        )
    tokenizer = load_tokenizer(dataclasses.replace(script, model_name_or_path=model_path), "ppo")
    train, _ = load_dataset_splits(_require(dataset, "dataset_name", "ppo"), script.dataset_train_split, None)
    if script.dataset_text_field not in train.column_names:
        raise ValueError(f"The dataset has no {script.dataset_text_field!r} column (columns: {train.column_names}); "
                         "set --dataset_text_field.")
    prompts, prompt_mask = _prompt_bank(train[script.dataset_text_field], tokenizer, script.max_prompt_length)
    if len(prompts) < config.batch_size:
        raise ValueError(f"{len(prompts)} prompts, fewer than batch_size={config.batch_size}; lower --batch_size.")

    policy = AutoModelForCausalLMWithValueHead.from_pretrained(model_path, rng=jax.random.PRNGKey(config.seed))
    score_module, rm_params = sequence_score_from_pretrained(reward_path)
    label = script.reward_label_index
    if label is None:
        if score_module.num_labels != 1:
            raise ValueError(f"The reward model has num_labels={score_module.num_labels}; pick a logit with --reward_label_index.")
        label = 0
    if score_module.config.vocab_size < policy.config.vocab_size:
        raise ValueError("The reward model's vocabulary is smaller than the policy's: they must share a tokenizer.")

    def reward_fn(reward_params, rollout):  # a JAX function: stays inside the compiled loop
        return score_module.apply({"params": reward_params}, rollout.input_ids, rollout.attention_mask).logits[:, label]

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_kwargs = dict(max_new_tokens=script.max_new_tokens, do_sample=True, temperature=script.temperature,
                      top_k=script.top_k, top_p=script.top_p, eos_token_id=eos, pad_token_id=pad)
    generate_fn = make_generate_fn(policy.module, jit=False, **gen_kwargs)
    sample_gen = make_generate_fn(policy.module, **gen_kwargs)
    score_jit = jax.jit(lambda p, ids, mask: score_module.apply({"params": p}, ids, mask).logits[:, label])

    def fresh_state():
        return PPOTrainState.create(policy.params, jax.tree_util.tree_map(jnp.array, policy.params), config)

    os.makedirs(script.output_dir, exist_ok=True)
    ckpt_dir = os.path.join(script.output_dir, "checkpoints")
    state, start = fresh_state(), 0
    if script.resume_from_checkpoint:
        source = _ppo_checkpoint_dir(script.resume_from_checkpoint)
        with Checkpointer(source, resume=True, async_save=False) as ck:
            state, extra = ck.restore(target_state=state)
        start = int(extra["iteration"])
        from rljax.logging import drop_jsonl_records_after

        drop_jsonl_records_after(os.path.join(script.output_dir, "metrics.jsonl"), start)
        print(f"[rljax ppo] resumed from {source} at iteration {start}")
    saver = Checkpointer(ckpt_dir, async_save=False, resume=bool(script.resume_from_checkpoint),
                         overwrite=script.overwrite_output_dir and not script.resume_from_checkpoint)

    total = config.total_ppo_epochs
    chunk = max(1, min(script.steps_per_call, total))
    prompts_j, mask_j = jnp.asarray(prompts), jnp.asarray(prompt_mask)
    check_prompt_bank(prompts, prompt_mask, config.batch_size)
    compiled: Dict[int, Callable] = {}

    def train_fn(n):
        # reward params and the prompt bank are arguments: nothing large is baked into the program
        if n not in compiled:
            compiled[n] = jax.jit(make_train(policy.module, config, generate_fn, reward_fn, n), donate_argnums=(0,))
        return compiled[n]

    n_samples = min(8, len(prompts))
    sample_key = jax.random.PRNGKey(config.seed + 7)

    def samples(params):
        gen = sample_gen(params, prompts_j[:n_samples], mask_j[:n_samples], sample_key)
        full_mask = jnp.concatenate([mask_j[:n_samples], gen.response_mask], axis=1)
        scores = np.asarray(score_jit(rm_params, gen.sequences, full_mask))
        P = prompts.shape[1]
        seqs, rmask = np.asarray(gen.sequences), np.asarray(gen.response_mask)
        return [
            {"query": tokenizer.decode(seqs[i, :P][prompt_mask[i] > 0]),
             "response": tokenizer.decode(seqs[i, P:][rmask[i] > 0], skip_special_tokens=True),
             "reward": float(scores[i])}
            for i in range(n_samples)
        ]

    logger = MetricLogger(
        ppo_sinks(config.log_with), script.output_dir, config=dict(config.to_dict(), **dataclasses.asdict(script)),
        project_name=config.tracker_project_name, tracker_kwargs=config.tracker_kwargs, sample_every=script.sample_every,
        stdout_keys=("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/policy/clipfrac"),
    )
    first_reward = last = None
    try:
        if start == 0:
            logger.log_samples(samples(state.params), 0, force=True)
        it = start
        while it < total:
            n = min(chunk, total - it)
            state, stats = train_fn(n)(state, rm_params, prompts_j, mask_j)
            stats = jax.device_get(stats)
            for i in range(n):
                last = {k: float(np.asarray(v)[i]) for k, v in stats.items()}
                first_reward = last["env/reward_mean"] if first_reward is None else first_reward
                logger.log(last, it + i + 1)
            before, it = it, it + n
            if any(s % script.sample_every == 0 for s in range(before + 1, it + 1)) or it == total:
                logger.log_samples(samples(state.params), it, force=True)
            if script.save_steps > 0 and it < total and it // script.save_steps > before // script.save_steps:
                saver.save(it, state, {"iteration": it}, force=True)
        if total > start:
            saver.save(total, state, {"iteration": total}, force=True)
    finally:
        saver.close()
        logger.close()
    policy_params = state.params
    save_value_head_model(policy.module, policy_params, script.output_dir, overwrite=True)
    tokenizer.save_pretrained(script.output_dir)
    result = {"ppo/iterations": total}
    if last is not None:
        result.update({"env/reward_mean_first": first_reward, "env/reward_mean_last": last["env/reward_mean"],
                       "objective/kl": last["objective/kl"], "objective/kl_coef": last["objective/kl_coef"]})
    return _finish(script, result, "ppo")


def import_reward_func(path: str) -> Callable:
    """The function at ``pkg.module.function`` or ``pkg.module:function`` (``--reward_funcs``)."""
    import importlib

    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward_funcs {path!r}: give an import path, pkg.module.function or pkg.module:function.")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward_funcs {path!r}: cannot import it ({type(e).__name__}: {e}); is its module on "
                         "PYTHONPATH?") from e
    if not callable(fn):
        raise ValueError(f"--reward_funcs {path!r} is not callable.")
    return fn


def reward_model_func(path: str, tokenizer, label_index: Optional[int] = None, bucket: int = 16) -> Callable:
    """A TRL-style reward function scoring ``prompt + completion`` with the sequence-score checkpoint
    at ``path`` (jitted; rows right-padded to a multiple of ``bucket`` tokens, so few compiles)."""
    import jax
    import numpy as np

    from rljax.data import pad_sequences
    from rljax.models.heads import sequence_score_from_pretrained

    if not os.path.isdir(path):
        raise ValueError(f"--reward_model {path!r}: no such checkpoint directory (e.g. the output_dir of "
                         "`rljax reward`).")
    module, params = sequence_score_from_pretrained(path)
    label = label_index
    if label is None:
        if module.num_labels != 1:
            raise ValueError(f"The reward model has num_labels={module.num_labels}; pick a logit with "
                             "--reward_label_index.")
        label = 0
    score = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask).logits[:, label])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def reward_model(prompts, completions, completion_ids, **_):
        ids = [tokenizer(p, add_special_tokens=False).input_ids + list(c) for p, c in zip(prompts, completion_ids)]
        width = -(-max(len(x) for x in ids) // bucket) * bucket
        seqs = pad_sequences(ids, pad, "right", width)
        mask = pad_sequences([np.ones(len(x), np.int32) for x in ids], 0, "right", width)
        return [float(v) for v in np.asarray(score(params, seqs, mask))]

    return reward_model


def _online_inputs(config, script: OnlineScriptArguments, command: str):
    """(model, tokenizer, train rows, reward functions) of ``rljax grpo|rloo``."""
    from rljax.models import from_pretrained

    tokenizer = load_tokenizer(script, command)
    train, _ = load_dataset_splits(_require(script.dataset_name, "dataset_name", command), script.dataset_train_split,
                                   None)
    field = script.dataset_prompt_field
    if field not in train.column_names:
        raise ValueError(f"The dataset has no {field!r} column (columns: {train.column_names}); set "
                         "--dataset_prompt_field.")
    if field != "prompt":
        train = train.rename_column(field, "prompt") if "prompt" not in train.column_names else (
            train.remove_columns("prompt").rename_column(field, "prompt"))
    if train.num_rows and not isinstance(train[0]["prompt"], str):
        raise ValueError(f"Column {field!r} must hold prompt texts (conversational prompts are not supported yet).")
    funcs = [import_reward_func(p) for p in script.reward_funcs or []]
    if script.reward_model:
        funcs.append(reward_model_func(script.reward_model, tokenizer, script.reward_label_index))
    if not funcs:
        raise ValueError(f"`rljax {command}` needs a reward: --reward_funcs pkg.module.function ... and/or "
                         "--reward_model DIR.")
    model = from_pretrained(_require(script.model_name_or_path, "model_name_or_path", command))
    return model, tokenizer, train, funcs


def _run_online(trainer_cls, config, script: OnlineScriptArguments, command: str) -> Dict[str, Any]:
    model, tokenizer, train, funcs = _online_inputs(config, script, command)
    trainer = trainer_cls(model, funcs, config, train, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(config.output_dir)
    key = "reward" if command == "grpo" else "objective/scores"
    logged = [e for e in trainer.log_history if key in e]
    if logged:
        result.update({f"{key}_first": logged[0][key], f"{key}_last": logged[-1][key]})
        result.update({k: v for k, v in logged[-1].items() if k in ("kl", "completions/mean_length",
                                                                     "completion_length", "objective/kl")})
    return _finish(config, result, command)


def run_grpo(config, script: OnlineScriptArguments) -> Dict[str, Any]:
    from rljax.trainers.grpo import GRPOTrainer

    return _run_online(GRPOTrainer, config, script, "grpo")


def run_rloo(config, script: OnlineScriptArguments) -> Dict[str, Any]:
    from rljax.trainers.rloo import RLOOTrainer

    return _run_online(RLOOTrainer, config, script, "rloo")


def _grpo_config():
    from rljax.trainers.grpo import GRPOConfig

    return GRPOConfig


def _rloo_config():
    from rljax.trainers.rloo import RLOOConfig

    return RLOOConfig


def _sft_config():
    from rljax.trainers.sft import SFTConfig

    return SFTConfig


def _reward_config():
    from rljax.trainers.reward import RewardConfig

    return RewardConfig


def _ppo_config():
    from rljax.ppo import PPOConfig

    return PPOConfig


def _dpo_config():
    from rljax.trainers.dpo import DPOConfig

    return DPOConfig


COMMANDS: Dict[str, Command] = {
    "sft": Command("sft", "supervised fine-tuning (TRL's SFTTrainer) on a text column.", _sft_config, ModelDataArguments, run_sft),
    "reward": Command("reward", "reward modelling (TRL's RewardTrainer) on chosen/rejected pairs.", _reward_config,
                      ModelDataArguments, run_reward),
    "ppo": Command("ppo", "PPO against a reward-model checkpoint, the loop compiled as one lax.scan per call.",
                   _ppo_config, PPOScriptArguments, run_ppo),
    "dpo": Command("dpo", "direct preference optimisation (TRL's DPOTrainer) on prompt/chosen/rejected.", _dpo_config,
                   ModelDataArguments, run_dpo),
    "grpo": Command("grpo", "GRPO (later TRL's GRPOTrainer) on a prompt column with Python reward functions / a reward "
                    "model.", _grpo_config, OnlineScriptArguments, run_grpo),
    "rloo": Command("rloo", "RLOO (TRL's RLOOTrainer, rloo_k samples, leave-one-out baseline) on a prompt column.",
                    _rloo_config, OnlineScriptArguments, run_rloo),
}


def _usage() -> str:
    lines = [f"usage: rljax {{{','.join(COMMANDS)}}} [--config FILE.yaml] [--FLAG VALUE ...]", "", "subcommands:"]
    lines += [f"  {c.name:<8}{c.summary}" for c in COMMANDS.values()]
    lines += ["", "`rljax COMMAND --help` lists every flag with its default and documentation."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, defaults: Optional[Dict[str, Any]] = None) -> Any:
    """Entry point of ``rljax`` / ``python -m rljax``. Returns the subcommand's result dict.
    ``defaults``: flag defaults below the YAML file's (used by the experiment scripts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(_usage(), file=sys.stderr)
        raise SystemExit(f"rljax: unknown command {command!r}; choose one of {list(COMMANDS)}.")
    try:
        config, script = parse(command, rest, defaults)
    except ValueError as e:
        print(f"rljax {command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return COMMANDS[command].run(config, script)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The console script (``rljax ...``, ``python -m rljax ...``): runs :func:`main` and turns
    its outcome into an exit status. 0 on success; a user error (bad value, missing file or column) prints one ``rljax <command>:
    error: ...`` line, no traceback, and exits 1; ``RLJAX_DEBUG=1`` re-raises it instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        main(argv)  # prints where it saved the model
    except (ValueError, OSError, KeyError, NotImplementedError) as e:  # OSError: FileNotFound, disk full, ...
        if os.environ.get("RLJAX_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"rljax {command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
