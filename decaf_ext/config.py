"""Training configuration: one dataclass with every knob, loaded from YAML and/or command-line flags.

Precedence: dataclass defaults < YAML file (``--config``) < explicit flags. The defaults are the offline
default run (DeCAF, 10 agents, ring, Dirichlet(0.5) non-IID, LoRA rank 8, all-MiniLM-L6-v2, BBC News),
sized to finish in under ten minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from decaf_ext.data.images import FASHION_MNIST
from decaf_ext.data.partition import SCHEMES
from decaf_ext.data.text import OFFLINE_DEFAULT
from decaf_ext.device import check_device, cuda_available
from decaf_ext.errors import ConfigError, first_line
from decaf_ext.storage.loading import load_yaml

if TYPE_CHECKING:
    from decaf_ext.elastic import ChurnSchedule
    from decaf_ext.strategies import Strategy

COMM_ORDERS: tuple[str, ...] = ("train_then_mix", "mix_then_train")
OPTIMIZER_STATE_POLICIES: tuple[str, ...] = ("keep", "reset")
CLIP_ENCODERS: tuple[str, ...] = ("vision", "text", "both")
#: old option names still read from YAML, config.json and the command line -> their current names
RENAMED: dict[str, str] = {"alpha": "dirichlet_alpha"}
#: fields holding a local path, stored absolute so that a run resumes from any working directory
PATH_FIELDS: tuple[str, ...] = ("dataset", "model", "topology_file", "kit")
TRANSPORTS: tuple[str, ...] = ("gloo", "tls")
#: (max_train, max_test) used when they are not set: a budget for the offline default and Fashion-MNIST
DEFAULT_CAPS: dict[str, tuple[int, int]] = {OFFLINE_DEFAULT: (600, 200), FASHION_MNIST: (2000, 500)}
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: options a resumed run may change; every other one must be the run's own (output_dir aside: a run moves)
RESUMABLE: tuple[str, ...] = ("rounds", "eval_every", "checkpoint_every", "device", "progress")


def registry_names() -> dict[str, tuple[str, ...]]:
    """Choices of the options backed by a registry, read from the registries themselves (imports torch)."""
    from decaf_ext.strategies import strategy_names
    from decaf_ext.tasks import TASKS
    from decaf_ext.topology import RULES, TOPOLOGIES

    return {"algorithm": strategy_names(), "topology": tuple(TOPOLOGIES), "mixing": tuple(RULES),
            "partition": SCHEMES, "task": tuple(TASKS)}


def _knob(default: Any, help: str) -> Any:
    """A dataclass field carrying its command-line help text (defaults are immutable values or None)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a decentralized LoRA fine-tuning run (see docs/training.md)."""

    # what is trained, and how agents talk
    algorithm: str = _knob("decaf", "communication strategy (or one registered with "
                                    "decaf_ext.strategies.register_strategy); --list shows them")
    topology: str = _knob("ring", "communication graph; --list shows them")
    mixing: str = _knob("auto", "mixing-matrix rule: auto = uniform on regular graphs, else metropolis; "
                                "--list shows them")
    topology_p: float | None = _knob(None, "edge probability of the erdos_renyi topology")
    topology_file: str | None = _knob(None, "adjacency file of the 'file' topology")
    agents: int = _knob(10, "number of simulated agents")
    decaf_method: str = _knob("auto", "DeCAF's truncated SVD: consensus_tsvd's method (auto, exact, randomized, "
                                      "dense)")
    decaf_oversample: int = _knob(10, "DeCAF randomized method: extra columns of the test matrix")
    decaf_n_iter: int = _knob(2, "DeCAF randomized method: power iterations")
    decaf_seed: int = _knob(0, "DeCAF randomized method: seed of the test matrix")
    decaf_split: str = _knob("balanced", "how DeCAF splits U S V^T into B, A: consensus_tsvd's split (balanced, "
                                         "left, right)")
    message_dtype: str = _knob("float32", "what a message carries: float32 (uncompressed), bfloat16 or int8 (one "
                                          "float32 scale per row, see docs/strategies.md)")
    comm_order: str = _knob("train_then_mix", "per round: local steps then mixing (train_then_mix) "
                                              "or mixing then local steps (mix_then_train)")
    # task, model and adapters
    task: str = _knob("text_classification", "task; --list shows them")
    model: str | None = _knob(None, "pretrained model folder, hub id or the task's alias (none: the task's "
                                    "offline default, all-MiniLM-L6-v2 for text classification)")
    rank: int | str = _knob(8, "LoRA rank r: one rank for every agent, one per agent ('2,4,8,16' with --agents 4) "
                               "or a rule ('cycle:2,4,8,16': agent i takes entry i mod 4); see docs/strategies.md")
    lora_alpha: float = _knob(16.0, "LoRA alpha (update scale alpha / r)")
    lora_dropout: float = _knob(0.1, "dropout on the LoRA input")
    target_modules: list[str] | None = _knob(None, "comma-separated LoRA target modules (default: the task's)")
    max_len: int = _knob(64, "maximum tokens per example")
    dtype: str = _knob("float32", f"dtype of the frozen base model of causal_lm: {', '.join(DTYPES)} "
                                  "(LoRA factors, mixing and optimizer state stay float32)")
    gradient_checkpointing: bool = _knob(False, "recompute the base model's activations in the backward pass "
                                                "(causal_lm; less memory, more time)")
    template: str | None = _knob(None, "causal_lm prompt: yesno_qa, wic, topic (default), or a string with "
                                       "{column} placeholders")
    label_words: list[str] | None = _knob(None, "causal_lm: comma-separated word per label id (default: the "
                                                "template's, else the label names)")
    columns: list[str] | None = _knob(None, "causal_lm: comma-separated field=column pairs renaming dataset "
                                            "columns to the template's fields (e.g. label=answer)")
    # clip task
    prompt_template: str = _knob("generic", "clip: class-name prompt, a built-in template (flowers, food, actions, "
                                            "generic) or a string with {} for the class name")
    clip_lora_on: str = _knob("both", f"clip: encoders carrying LoRA: {', '.join(CLIP_ENCODERS)}")
    shots_per_class: int | None = _knob(None, "clip: training images per class in all (seeded), before the "
                                              "split over agents")
    # image_classification task
    encoder_layers: int | None = _knob(None, "image_classification: keep the backbone's first N transformer layers "
                                             "(none: all of a model, 8 of the offline dinov2-small-offline)")
    image_size: int | None = _knob(None, "image_classification: side of the square images the model sees (none: "
                                         "its processor's crop size, 224 for the offline DINOv2)")
    # data
    dataset: str = _knob(OFFLINE_DEFAULT, f"'{OFFLINE_DEFAULT}' (offline), a local csv/json/jsonl/parquet file or "
                                          "folder, or a hub id")
    text_column: str = _knob("text", "text column of a csv/json/jsonl/parquet or hub dataset")
    label_column: str = _knob("label", "label column of a csv/json/jsonl/parquet or hub dataset")
    test_fraction: float = _knob(0.2, "held-out fraction of the dataset")
    max_train: int | None = _knob(None, "training examples used, a seeded subset (none: 600 of the offline "
                                        "bbcnews, 2000 of fashion-mnist, all of any other dataset; 0: all)")
    max_test: int | None = _knob(None, "held-out examples evaluated, a seeded subset (none: 200 of the offline "
                                       "bbcnews, 500 of fashion-mnist, all of any other dataset; 0: all)")
    partition: str = _knob("dirichlet", f"how training data is split over agents: {', '.join(SCHEMES)}")
    dirichlet_alpha: float = _knob(0.5, "concentration of the 'dirichlet' partition, smaller = more non-IID "
                                        "(was --alpha)")
    shards: int = _knob(2, "label shards per agent of the 'shards' partition")
    shots: int | None = _knob(None, "examples per class per agent of the 'few_shot' partition")
    # optimization
    rounds: int = _knob(10, "communication rounds")
    local_steps: int = _knob(5, "local optimizer steps per agent per round")
    batch_size: int = _knob(16, "training batch size")
    lr: float = _knob(5e-3, "AdamW learning rate")
    weight_decay: float = _knob(0.0, "AdamW weight decay")
    optimizer_state: str = _knob("keep", "AdamW state after each communication: keep or reset")
    # evaluation, logging, reproducibility
    eval_every: int = _knob(5, "evaluate every K rounds (and after the last round)")
    eval_batch_size: int = _knob(64, "evaluation batch size")
    eval_at_start: bool = _knob(False, "also evaluate before the first round (round 0: the pretrained model)")
    checkpoint_every: int = _knob(1, "checkpoint every K rounds (0: only after the last round); a killed run "
                                     "continues with --resume from its newest checkpoint")
    seed: int = _knob(0, "seed of data split, partition, initialization and data order")
    device: str = _knob("auto", "cpu, cuda, cuda:N or auto")
    output_dir: str | None = _knob(None, "run folder (default: runs/<algorithm>-<topology>-<time>)")
    progress: bool = _knob(True, "show a progress bar")
    tensorboard: bool = _knob(False, "also write TensorBoard event files to <run folder>/tensorboard "
                                     "(needs the tensorboard package: pip install decaf_ext[tensorboard])")
    # message safety (runs with one process per agent)
    run_key_file: str | None = _knob(None, "file holding a shared secret of at least 16 bytes: every message "
                                           "carries an HMAC tag bound to the run, round, sender and receiver; "
                                           "untagged or wrongly tagged ones are rejected (or set DECAF_RUN_KEY)")
    norm_bound: float | None = _knob(None, "reject a neighbour whose LoRA product norm exceeds this multiple of "
                                           "the median of the agent's own and the round's messages")
    norm_cap: float | None = _knob(None, "reject a message any of whose factors, extras or LoRA product has a "
                                         "Frobenius norm above this absolute value")
    # elastic membership
    churn: str | None = _knob(None, "agents joining and leaving a running run, e.g. 'join:5@3,leave:2@5,kill:3@6' "
                                    "(0-based rounds; see docs/membership.md)")
    # differential privacy of each agent's examples (DP-SGD through Opacus, docs/privacy.md)
    dp_epsilon: float | None = _knob(None, "train every agent with DP-SGD spending at most this epsilon over the "
                                           "run, per agent (none: no differential privacy)")
    dp_delta: float | None = _knob(None, "DP-SGD delta (none: 1 / the agent's number of training examples)")
    dp_max_grad_norm: float = _knob(1.0, "DP-SGD: each example's gradient is clipped to this L2 norm")
    dp_accountant: str = _knob("rdp", "DP-SGD's Opacus accountant: rdp or prv")
    # transport of a distributed run (--launcher dist)
    transport: str = _knob("gloo", "how agents of a distributed run reach each other: gloo (torch.distributed "
                                   "and a shared store, trusted networks) or tls (mutual TLS between sites, "
                                   "needs --kit; see docs/deploy.md)")
    kit: str | None = _knob(None, "with --transport tls: this agent's kit folder made by 'decaf-train provision'")
    robust: str | None = _knob(None, "Byzantine-robust mixing: clipped_gossip (tau automatic: the weighted median "
                                     "of the round's distances to the neighbours) or clipped_gossip:TAU (each agent "
                                     "moves at most TAU toward each neighbour per round); see docs/robust.md")

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the argument) for values that are invalid on their own."""
        if self.agents < 1:
            raise ConfigError(f"agents must be >= 1, got {self.agents}")
        self.agent_ranks()  # before the registries: a malformed rank is refused without importing torch
        for name, choices in registry_names().items():
            _check_choice(name, getattr(self, name), choices)
        _check_choice("comm_order", self.comm_order, COMM_ORDERS)
        _check_choice("transport", self.transport, TRANSPORTS)
        if self.transport == "tls" and not self.kit:
            raise ConfigError("kit: --transport tls needs --kit FOLDER (this agent's folder made by decaf-train "
                              "provision)")
        from decaf_ext.comm.codec import MESSAGE_DTYPES

        _check_choice("message_dtype", self.message_dtype, MESSAGE_DTYPES)
        _check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_POLICIES)
        _check_choice("clip_lora_on", self.clip_lora_on, CLIP_ENCODERS)
        _check_choice("dtype", self.dtype, DTYPES)
        strategy = self.strategy()
        if self.agents < 2 and strategy.decentralized:
            raise ConfigError(f"agents must be >= 2 for the decentralized algorithm {self.algorithm!r}, "
                              f"got {self.agents}")
        for name in ("max_len", "rounds", "local_steps", "batch_size", "eval_every", "eval_batch_size",
                     "shards"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: all) or none, got {getattr(self, name)}")
        for name in ("shots", "shots_per_class"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or none, got {getattr(self, name)}")
        for name in ("encoder_layers", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or none, got {getattr(self, name)}")
        for name in ("text_column", "label_column"):
            if not getattr(self, name):
                raise ConfigError(f"{name} must name a column")
        for name in ("dirichlet_alpha", "lora_alpha", "lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.seed < 2**32:  # numpy's legacy seeding takes 32 bits
            raise ConfigError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules must name at least one module")
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound >= 1):
            raise ConfigError(f"norm_bound must be a finite number >= 1 or none, got {self.norm_bound}")
        if self.norm_cap is not None and not (math.isfinite(self.norm_cap) and self.norm_cap > 0):
            raise ConfigError(f"norm_cap must be a finite number > 0 or none, got {self.norm_cap}")
        check_device(self.device)
        self.churn_schedule()
        from decaf_ext.privacy.options import check_privacy

        check_privacy(self)
        if self.dtype == "float16" and (self.device == "cpu" or (self.device == "auto" and not cuda_available())):
            raise ConfigError("dtype: float16 cannot train on a CPU (use bfloat16 or float32)")

    def agent_ranks(self) -> list[int]:
        """The LoRA rank of each of the `agents` agents (ConfigError naming `rank` if the spec is malformed)."""
        spec = self.rank
        if isinstance(spec, int):
            ranks = [spec] * self.agents
        else:
            rule, _, values = spec.rpartition(":")
            try:
                listed = [int(item) for item in values.split(",")]
            except ValueError:
                raise ConfigError(f"rank must be an integer, a comma-separated list or 'cycle:LIST', got {spec!r}"
                                  ) from None
            if rule == "cycle":
                ranks = [listed[i % len(listed)] for i in range(self.agents)]
            elif rule:
                raise ConfigError(f"rank: unknown rule {rule!r} (the rule is 'cycle:LIST'), got {spec!r}")
            elif len(listed) != self.agents:
                raise ConfigError(f"rank: {len(listed)} ranks listed for {self.agents} agents (one per agent, or "
                                  f"'cycle:{values}')")
            else:
                ranks = listed
        if min(ranks) < 1:
            raise ConfigError(f"rank must be >= 1, got {spec!r}")
        return ranks

    def churn_schedule(self) -> ChurnSchedule:
        """The run's :class:`~decaf_ext.elastic.ChurnSchedule` (ConfigError naming churn, or mixing when a churn
        schedule meets a rule that cannot be re-weighted on the live graph)."""
        from decaf_ext.elastic import ChurnSchedule
        from decaf_ext.elastic.live_graph import REWEIGHTED_RULES

        schedule = ChurnSchedule.parse(self.churn, self.agents)
        if schedule.active and self.mixing not in REWEIGHTED_RULES:
            raise ConfigError(f"mixing: --churn re-weights W on the live graph (Metropolis-Hastings); use "
                              f"{' or '.join(REWEIGHTED_RULES)}, not {self.mixing!r}")
        return schedule

    def strategy(self) -> Strategy:
        """The configured strategy, with the decaf_* options it takes (the built-in decaf takes all five), under
        the `robust` rule when one is set (:func:`decaf_ext.robust.with_robust`)."""
        from decaf_ext.strategies import get_strategy, strategy_options

        options = {name: getattr(self, f"decaf_{name}") for name in strategy_options(self.algorithm)
                   if hasattr(self, f"decaf_{name}")}
        try:
            strategy = get_strategy(self.algorithm, **options)
        except ValueError as error:
            raise ConfigError(f"decaf_{first_line(error)}") from None
        from decaf_ext.robust import with_robust

        try:
            return with_robust(strategy, self.robust)
        except ValueError as error:
            raise ConfigError(first_line(error)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict of every field."""
        return dataclasses.asdict(self)

    def caps(self) -> tuple[int | None, int | None]:
        """(max_train, max_test) in effect: None = every example (unset caps take DEFAULT_CAPS of the dataset)."""
        defaults = DEFAULT_CAPS.get(self.dataset, (None, None))
        chosen = [default if cap is None else cap for cap, default in zip((self.max_train, self.max_test), defaults)]
        return chosen[0] or None, chosen[1] or None

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose dataset (unless the offline default's name), model and topology file, where they name an
        existing local path, are absolute."""
        changes = {name: os.path.abspath(os.path.expanduser(getattr(self, name))) for name in PATH_FIELDS
                   if getattr(self, name) and os.path.exists(os.path.expanduser(getattr(self, name)))
                   and not (name == "dataset" and self.dataset == OFFLINE_DEFAULT)}
        return dataclasses.replace(self, **changes)

    def check_resumes(self, saved: dict[str, Any], *, source: str) -> None:
        """ConfigError naming the first option outside RESUMABLE (and output_dir) in which this configuration
        differs from `saved`, the options a run was trained with (read from `source`)."""
        before = TrainConfig.from_dict(saved, source=source).to_dict()
        for name, value in self.to_dict().items():
            if name not in (*RESUMABLE, "output_dir") and before[name] != value:
                raise ConfigError(f"{name}: the run was trained with {before[name]!r}, not {value!r} (only "
                                  f"{', '.join(RESUMABLE)} may change when resuming)")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping (YAML or JSON), converting and checking each value's type."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of options, got {type(values).__name__}")
        values = {RENAMED.get(name, name): value for name, value in values.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
        return cls(**{name: convert_value(name, value) for name, value in values.items()})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def field_types() -> dict[str, Any]:
    """Resolved type annotation of every TrainConfig field."""
    return typing.get_type_hints(TrainConfig)


def convert_value(name: str, value: Any) -> Any:
    """`value` (from YAML or a command-line string) converted to the type of field `name`.

    Strings are parsed ("none" -> None, comma lists); numbers are accepted where the field is numeric.
    """
    kind = field_types()[name]
    optional = type(None) in typing.get_args(kind)
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if optional else kind
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty")
    try:
        if set(typing.get_args(base)) == {int, str}:  # an integer when the value is one, else the string
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).strip()
            return int(text) if text.lstrip("-").isdigit() and not isinstance(value, bool) else text
        if typing.get_origin(base) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(item).strip() for item in items if str(item).strip()]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} expects {getattr(base, '__name__', base)}, got {value!r}") from None


def build_config(yaml_path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then `overrides` (already typed or strings), validated."""
    values = load_yaml(yaml_path) if yaml_path else {}
    if not isinstance(values, dict):
        raise ConfigError(f"config: {yaml_path!r} must hold a mapping of options")
    config = TrainConfig.from_dict({**values, **(overrides or {})}, source=f"config {yaml_path!r}"
                                   if yaml_path else "config")
    config.validate()
    return config
