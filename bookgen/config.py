"""Typed experiment configuration.

One YAML file describes an experiment. It is loaded into :class:`ExperimentConfig`, a tree of small
dataclass sections. Every field carries its documentation in ``metadata["help"]``; validation lives in
each section's ``__post_init__`` and raises :class:`FieldError`, which the loader turns into a
:class:`ConfigError` naming the file and the full dotted key. This module does no I/O and reads no
environment: :mod:`bookgen.config_io` reads files and resolves paths.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class FieldError(ValueError):
    """Raised by a section's validation; ``key`` is the field name inside that section."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise FieldError(key, message)


SEED_LIMIT = 2**63  # torch and NumPy take seeds as 64-bit integers


def _require_seed(seed: int, key: str) -> None:
    _require(0 <= seed < SEED_LIMIT, key, f"must be in [0, 2**63), got {seed}")


def _require_finite(value: float, key: str) -> None:
    # the command line's float() reads "inf" and "nan", as YAML reads .inf and .nan; no setting means them
    _require(math.isfinite(value), key, f"must be a finite number, got {value}")


def _doc(help_text: str, **extra: object) -> dict[str, object]:
    return {"help": help_text, **extra}


# metadata flags understood by the loader
PATH = "path"  # relative value resolves against the YAML file's folder
PATH_OR_ID = "path_or_id"  # a local folder if it exists next to the YAML file, else a hub id
PATH_UNLESS = "path_unless"  # a path resolved as PATH unless the value is one of these keywords
REPLACED = "replaced"  # old values of a setting -> the value that now means the same, named in the error
RENAMED = "renamed"  # old spellings still taken -> the value they now read as, with a one-line notice


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    project: str | None = field(default=None, metadata=_doc("W&B project; unset: $WANDB_PROJECT, else bookgen."))
    entity: str | None = field(default=None, metadata=_doc("W&B team or user; unset: $WANDB_ENTITY or your default."))
    name: str | None = field(default=None, metadata=_doc("W&B run name; unset: the run folder's name."))
    tags: list[str] = field(default_factory=list, metadata=_doc("W&B run tags."))


@dataclass(kw_only=True, slots=True)
class MlflowConfig:
    uri: str | None = field(default=None, metadata=_doc(
        "MLflow tracking server URL or database URI, or a local folder (an SQLite store and the artifacts are kept "
        "there); unset: $MLFLOW_TRACKING_URI, else ./mlruns in the folder the run starts from."))
    experiment: str | None = field(default=None, metadata=_doc(
        "MLflow experiment; unset: $MLFLOW_EXPERIMENT_NAME, else bookgen."))
    run_name: str | None = field(default=None, metadata=_doc("MLflow run name; unset: the run folder's name."))


@dataclass(kw_only=True, slots=True)
class RunConfig:
    output_dir: Path = field(metadata=_doc("Run folder: resolved config, metrics, checkpoints.", path=True))
    log_every: int = field(default=10, metadata=_doc(
        "Read the loss and gradient norm off the device every N optimizer steps (each read waits for the GPU), "
        "then write every step's record and print a progress line; stop requests are seen then too. "
        "Evaluation, checkpoint and last steps always read."))
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        default_factory=lambda: ["tensorboard"],
        metadata=_doc("Where rank 0 also sends the run (metrics.jsonl is always written): tensorboard (into "
                      "<output_dir>/tensorboard), wandb (pip install 'bookgen[wandb]'; WANDB_MODE=offline works "
                      "with no network), mlflow (pip install 'bookgen[mlflow]'). A resumed run continues the same "
                      "tracked run; [] sends nowhere."),
    )
    tensorboard: bool | None = field(default=None, metadata=_doc(
        "Old switch, kept for old experiment files: true adds tensorboard to run.trackers, false removes it."))
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig())
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig())
    peak_tflops: float | None = field(
        default=None,
        metadata=_doc("One device's dense peak TFLOPS, for the MFU column; unset: known GPUs in bf16/fp16."),
    )

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(len(set(self.trackers)) == len(self.trackers), "trackers", "names a tracker twice")
        if self.tensorboard is not None:  # folded into trackers, so the resolved config says it once
            if self.tensorboard and "tensorboard" not in self.trackers:
                self.trackers.append("tensorboard")
            elif not self.tensorboard and "tensorboard" in self.trackers:
                self.trackers.remove("tensorboard")
            self.tensorboard = None
        if self.peak_tflops is not None:
            _require(self.peak_tflops > 0, "peak_tflops", "must be > 0")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: Path = field(
        metadata=_doc(
            "booksummaries.txt, booksummaries.tar.gz, a folder with train/valid/test.txt, a text file with one "
            "document per line, a .jsonl/.json, .csv/.tsv (also .gz/.bz2/.xz) or .parquet file, or a save_to_disk "
            "folder.",
            path=True,
        )
    )
    format: Literal["auto", "cmu", "archive", "splits", "text", "json", "csv", "parquet", "arrow"] = field(
        default="auto", metadata=_doc("How to read `source`; `auto` decides from the file (suffix or contents).")
    )
    text_field: str = field(
        default="text", metadata=_doc("The text column of a JSON, CSV, Parquet or save_to_disk dataset.")
    )
    prompt: str | None = field(
        default=None,
        metadata=_doc("Prompt-completion rows: a template over each row's fields, e.g. \"Title: {title}\\nAuthor: "
                      "{author}\\nSummary:\" (CMU rows: title, author, date, genres; JSON lines: any key). A row is "
                      "<BOS>, the prompt, its text (data.text_field; CMU: the summary), <EOS>, and only the text "
                      "and <EOS> are targets. Unset: the summaries alone (the reference's recipe)."),
    )
    split_names: list[str] = field(
        default_factory=lambda: ["train", "validation", "test"],
        metadata=_doc("A DatasetDict's train, validation and test split names, in that order (used as given)."),
    )
    split: Literal["seeded", "reference"] = field(
        default="seeded",
        metadata=_doc("`seeded`: 70/20/10 by `seed`; `reference`: the reference notebook's exact split."),
    )
    prepared_dir: Path | None = field(
        default=None,
        metadata=_doc("Split files and token store; default `<run.output_dir>/prepared`.", path=True),
    )
    block_size: int = field(default=1024, metadata=_doc("Tokens per training example (truncation length)."))
    packing: Literal["none", "documents", "concat"] = field(
        default="none",
        metadata=_doc("none: one summary per row (line by line); documents: whole summaries packed into rows "
                      "with attention and positions per summary, exactly line by line's loss at packed speed; "
                      "concat: concatenated blocks that cross summaries (continued pre-training, not "
                      "comparable). Evaluation is per summary whatever this is.",
                      replaced={True: "concat", False: "none"}),
    )
    group_by_length: bool = field(
        default=False, metadata=_doc("Batch documents of similar length (data.packing: none only).")
    )
    skip_malformed: bool = field(
        default=False, metadata=_doc("Skip and count malformed CMU rows instead of failing.")
    )
    shard_tokens: int = field(default=1 << 24, metadata=_doc("Maximum tokens per token-store shard."))
    download_url: str = field(
        default="http://www.cs.cmu.edu/~dbamman/data/booksummaries.tar.gz",
        metadata=_doc("Where `bookgen prepare --download` fetches the corpus archive."),
    )
    download_sha256: str | None = field(
        default=None, metadata=_doc("Expected SHA-256 of the archive; checked after download.")
    )

    def __post_init__(self) -> None:
        _require(self.block_size >= 8, "block_size", f"must be >= 8, got {self.block_size}")
        _require(self.shard_tokens >= 1024, "shard_tokens", "must be >= 1024")
        _require(len(self.split_names) == 3 and len(set(self.split_names)) == 3, "split_names",
                 f"must name three different splits (train, validation, test), got {self.split_names}")
        _require(
            not (self.packing != "none" and self.group_by_length),
            "group_by_length",
            f"cannot be combined with data.packing: {self.packing} (packed rows are all about the block size)",
        )


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    name_or_path: str | None = field(
        default=None,
        metadata=_doc(
            "Hub id or folder. Default: the model's tokenizer, or a byte-level BPE trained on the "
            "training split when the model is built from a config.",
            path_or_id=True,
        ),
    )
    vocab_size: int = field(default=4096, metadata=_doc("Vocabulary size when bookgen trains the BPE."))
    bos_token: str = field(default="<BOS>", metadata=_doc(
        "Start-of-summary token; a pretrained tokenizer's own (e.g. <s>) is used as it is, not added."))
    eos_token: str = field(default="<EOS>", metadata=_doc(
        "End-of-summary token; a pretrained tokenizer's own (e.g. </s>) is used as it is, not added."))
    pad_token: str = field(default="<PAD>", metadata=_doc("Padding token, excluded from the loss."))

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes plus merges)")
        tokens = [self.bos_token, self.eos_token, self.pad_token]
        _require(len(set(tokens)) == 3, "pad_token", f"special tokens must differ, got {tokens}")


@dataclass(kw_only=True, slots=True)
class LoraSettings:
    r: int = field(default=8, metadata=_doc("LoRA rank: each adapted matrix W gains B @ A with A r x in, B out x r."))
    alpha: float = field(default=16.0, metadata=_doc("LoRA scale numerator: the update is (alpha / r) B @ A."))
    dropout: float = field(default=0.0, metadata=_doc("Dropout on the adapters' input."))
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata=_doc("Layers to adapt, by name or name suffix (GPT-2: c_attn, c_proj, c_fc; Llama: q_proj, k_proj, "
                      "v_proj, o_proj, gate_proj, up_proj, down_proj); [all-linear]: every linear layer but the "
                      "output head."),
    )
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=_doc("Modules trained in full beside the adapters and saved with them (e.g. lm_head)."),
    )
    train_new_tokens: bool = field(
        default=True,
        metadata=_doc("Train the embedding rows of the tokens this run adds (<BOS>, <EOS>, <PAD>) beside the "
                      "adapters (peft's trainable tokens); false leaves them at their mean initialisation."),
    )

    def __post_init__(self) -> None:
        _require(self.r >= 1, "r", "must be >= 1")
        _require(self.alpha > 0, "alpha", "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _require(bool(self.target_modules), "target_modules", "names no layer; use [all-linear] or layer names")
        _require("all-linear" not in self.target_modules or len(self.target_modules) == 1, "target_modules",
                 "all-linear stands alone; give it or layer names")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name_or_path: str | None = field(
        default=None,
        metadata=_doc("Hub id or local folder of a pretrained model; unset builds from the fields below.",
                      path_or_id=True),
    )
    config: dict[str, Any] | None = field(
        default=None,
        metadata=_doc("Build from a config of any causal-LM family transformers knows, e.g. {model_type: llama, "
                      "hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
                      "num_key_value_heads: 2, max_position_embeddings: 512}; vocab_size and the special token ids "
                      "come from the tokenizer. Unset: the GPT-2 keys below."),
    )
    n_layer: int = field(default=2, metadata=_doc("Layers (from-scratch model only)."))
    n_head: int = field(default=2, metadata=_doc("Attention heads (from-scratch model only)."))
    n_embd: int = field(default=64, metadata=_doc("Width (from-scratch model only)."))
    n_positions: int = field(default=1024, metadata=_doc("Context length (from-scratch model only)."))
    dropout: float | None = field(default=None, metadata=_doc("Override all dropout rates."))
    pad_to_multiple_of: int | None = field(
        default=None, metadata=_doc("Round the resized vocabulary up to a multiple of this.")
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=_doc("Recompute each block's activations in the backward pass: activation memory of about one "
                      "block instead of all, for about a third more compute per step."),
    )
    lora: LoraSettings | None = field(
        default=None,
        metadata=_doc("LoRA through peft: only the adapters (and model.lora.modules_to_save) train; unset: full "
                      "fine-tuning. model.lora: {} takes every default."),
    )
    attention: Literal["causal", "eager", "flash_attention_2"] = field(
        default="causal",
        metadata=_doc("Attention in training: causal is bookgen's causal attention (SDPA with no mask, the flash "
                      "kernel on GPUs; torch's varlen flash kernel for data.packing: documents on CUDA in "
                      "bf16/fp16; the blocked CPU kernel on a CPU, uncompiled), or transformers' SDPA for a model "
                      "with sliding windows or soft-capping; generation always uses transformers' SDPA. eager and "
                      "flash_attention_2 (GPUs with flash_attn installed) are transformers' own.",
                      replaced={"bookgen": "causal"}, renamed={"sdpa": "causal"}),
    )

    def __post_init__(self) -> None:
        if self.config is not None:
            _require(self.name_or_path is None, "config", "a pretrained model (model.name_or_path) brings its own "
                     "config; give one or the other")
            _require(isinstance(self.config.get("model_type"), str), "config",
                     "needs model_type (gpt2, llama, qwen2, mistral, gpt_neox, opt, ...)")
            for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
                _require(key not in self.config, "config", f"{key} comes from the tokenizer; remove it")
        for key in GPT2_KEYS:
            _require(getattr(self, key) >= 1, key, "must be >= 1")
        _require(self.n_embd % self.n_head == 0, "n_embd", "must be divisible by model.n_head")
        if self.dropout is not None:
            _require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        if self.pad_to_multiple_of is not None:
            _require(self.pad_to_multiple_of >= 1, "pad_to_multiple_of", "must be >= 1")

    def ignored_gpt2_keys(self) -> list[str]:
        """The built-in GPT-2's keys set to other than their defaults where a pretrained model or model.config
        decides the shape instead (an experiment for the tiny GPT-2 pointed at a model with --set, say)."""
        if self.name_or_path is None and self.config is None:
            return []
        return [key for key in GPT2_KEYS if getattr(self, key) != ModelConfig.__dataclass_fields__[key].default]


GPT2_KEYS = ("n_layer", "n_head", "n_embd", "n_positions")  # the built-in GPT-2's shape


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    epochs: int = field(default=1, metadata=_doc("Passes over the training split."))
    max_steps: int | None = field(default=None, metadata=_doc("Stop after this many optimizer steps."))
    micro_batch_size: int = field(default=2, metadata=_doc("Examples per rank per forward pass."))
    grad_accum_steps: int = field(default=1, metadata=_doc("Micro-batches per optimizer step."))
    learning_rate: float = field(default=5e-5, metadata=_doc("Peak learning rate (AdamW)."))
    weight_decay: float = field(
        default=0.0, metadata=_doc("AdamW weight decay (matrices and embeddings; not biases or norm gains).")
    )
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_doc("AdamW betas."))
    adam_eps: float = field(default=1e-8, metadata=_doc("AdamW epsilon."))
    warmup_steps: int = field(default=0, metadata=_doc("Linear warm-up steps."))
    lr_schedule: Literal["linear", "cosine", "constant"] = field(
        default="linear", metadata=_doc("Decay after warm-up: to zero at the last step, or constant.")
    )
    loss_average: Literal["tokens", "micro_batches"] = field(
        default="tokens",
        metadata=_doc("tokens: every predicted token of the global batch weighs the same, however the batch is "
                      "split over ranks and accumulation; micro_batches: mean of per-micro-batch means (the "
                      "reference's Trainer before transformers 4.46)."),
    )
    grad_clip: float = field(default=1.0, metadata=_doc("Gradient norm clipping; 0 disables."))
    precision: Literal["fp32", "bf16-mixed", "bf16", "fp16"] = field(
        default="fp32",
        metadata=_doc("Training precision. bf16-mixed: fp32 weights and optimizer, bf16 autocast (DeepSpeed's "
                      "torch_autocast), the fast path for a model that fits on each GPU; bf16 and fp16: 16-bit "
                      "weights under ZeRO 1-3 (fp16 needs a GPU); fp32."),
    )
    loss_chunk_tokens: int | None = field(
        default=None,
        metadata=_doc("Compute the head and the loss over chunks of this many tokens (e.g. 4096), so a step never "
                      "holds the whole batch's logits: same loss and gradients, the head run once more (bookgen "
                      "plan shows what it saves). Unset: the model's own loss."))
    fit_check: bool | Literal["auto"] = field(
        default="auto",
        metadata=_doc("Refuse a run whose memory plan (bookgen plan) does not fit before any data is touched: "
                      "`auto` on GPUs (a CPU run's weights are checked against the host's memory anyway), `true` "
                      "(or on) on CPUs too, `false` (or off) to start anyway."))
    compile: bool = field(
        default=False,
        metadata=_doc("torch.compile the model (DeepSpeed's engine.compile): faster steps on GPUs after a slower "
                      "start while it compiles; also used for evaluation."),
    )
    tf32: bool = field(
        default=True,
        metadata=_doc("On GPUs, let fp32 matrix products use TF32 tensor cores (float32 matmul precision "
                      "'high'), as nanoGPT does; no effect on CPUs."),
    )

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens is not None:
            _require(self.loss_chunk_tokens >= 1, "loss_chunk_tokens", "must be >= 1")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(self.adam_eps > 0, "adam_eps", f"must be > 0, got {self.adam_eps}")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                 "adam_betas", "must be two numbers in [0, 1)")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    every: int | None = field(default=None, metadata=_doc("Evaluate on the validation split every N steps."))
    at_end: bool = field(default=True, metadata=_doc("Evaluate on the validation split after training."))
    batch_size: int = field(default=4, metadata=_doc("Examples per rank per evaluation forward pass."))
    samples: int = field(
        default=4,
        metadata=_doc("Summaries sampled from generate.prompt at every evaluation (generate settings, a fixed "
                      "seed), written to samples.jsonl with their quality measures; 0 turns it off."),
    )
    scored: int = field(
        default=16,
        metadata=_doc("With data.prompt: at every evaluation, this many fixed validation rows (the first ones) get a "
                      "completion from their prompt (greedy, generate.max_new_tokens at most) scored against the real "
                      "one: ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score) in metrics.jsonl and the trackers; 0 turns "
                      "it off."),
    )
    scored_sampling: bool = field(
        default=False,
        metadata=_doc("Score completions sampled with the run's generate settings (seeded) instead of greedy ones."),
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata=_doc("Stop training after this many evaluations in a row without a new lowest validation loss."),
    )
    early_stopping_min_delta: float = field(
        default=0.0, metadata=_doc("How much lower a validation loss must be to count as a new lowest.")
    )

    def __post_init__(self) -> None:
        if self.every is not None:
            _require(self.every >= 1, "every", "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.samples >= 0, "samples", "must be >= 0")
        _require(self.scored >= 0, "scored", "must be >= 0")
        if self.early_stopping_patience is not None:
            _require(self.early_stopping_patience >= 1, "early_stopping_patience", "must be >= 1")
            _require(self.every is not None, "early_stopping_patience", "needs eval.every: it counts evaluations")
        _require(self.early_stopping_min_delta >= 0, "early_stopping_min_delta", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class DeepSpeedSection:
    config: Path | None = field(
        default=None,
        metadata=_doc("DeepSpeed JSON (see ds_configs/); experiment-owned values are filled in.", path=True),
    )
    zero_stage: int = field(default=0, metadata=_doc("ZeRO stage 0-3."))
    comm_timeout_s: int = field(default=300, metadata=_doc("Collective timeout, so a dead rank ends the job."))

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.comm_timeout_s >= 1, "comm_timeout_s", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int | None = field(default=None, metadata=_doc("Save every N optimizer steps (and at the end)."))
    keep: int = field(default=2, metadata=_doc("Complete checkpoints to keep."))
    resume: str = field(
        default="auto",
        metadata=_doc("`auto` (newest complete), `never`, or a checkpoint folder (relative: to the YAML's folder).",
                      path_unless=("auto", "never")),
    )
    keep_best: bool = field(
        default=False,
        metadata=_doc("Also keep the best checkpoint by checkpoint.best_by (`best_complete` names it); "
                      "checkpoint.every must be a multiple of eval.every."),
    )
    best_by: Literal["eval_loss", "rouge1", "rouge2", "rougeL"] = field(
        default="eval_loss",
        metadata=_doc("What makes a checkpoint the best: the lowest validation loss, or (data.prompt runs) the "
                      "highest ROUGE of the scored validation rows (eval.scored)."),
    )

    def __post_init__(self) -> None:
        if self.every is not None:
            _require(self.every >= 1, "every", "must be >= 1")
        _require(self.keep >= 1, "keep", "must be >= 1")


@dataclass(kw_only=True, slots=True)
class GenerateConfig:
    prompt: str | None = field(default=None, metadata=_doc(
        "Default prompt; unset: the tokenizer's begin token (<BOS> for bookgen's own tokenizer, the model's own, "
        "e.g. <|begin_of_text|>, where tokenizer.bos_token names it)."))
    top_k: int = field(default=50, metadata=_doc("Sample among the k most likely tokens."))
    top_p: float = field(default=1.0, metadata=_doc("Nucleus sampling mass, in (0, 1]."))
    temperature: float = field(default=1.0, metadata=_doc("Softmax temperature, > 0."))
    repetition_penalty: float = field(default=1.0, metadata=_doc("1.0 disables."))
    max_new_tokens: int = field(default=300, metadata=_doc("New tokens per sequence at most."))
    num_return_sequences: int = field(default=5, metadata=_doc("Samples per prompt."))
    batch_size: int | None = field(
        default=None,
        metadata=_doc("Sequences decoded together; unset: as many as fit a KV-cache budget (half the free memory "
                      "on a GPU, 2 GiB on a CPU), which for small models is all of them at once."),
    )
    seed: int | None = field(default=None, metadata=_doc("Sampling seed; default the experiment seed."))

    def __post_init__(self) -> None:
        for key in ("top_p", "temperature", "repetition_penalty"):
            _require_finite(getattr(self, key), key)
        _require(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        _require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.temperature > 0, "temperature", "must be > 0")
        _require(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.num_return_sequences >= 1, "num_return_sequences", "must be >= 1")
        if self.batch_size is not None:
            _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        if self.seed is not None:
            _require_seed(self.seed, "seed")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GB|GIB|G|MB|MIB|M|TB|TIB|T)?\s*$", re.IGNORECASE)
# binary, as GPU makers mean them: an "80GB" H100 has 80 GiB
_UNITS = {"G": 2**30, "GB": 2**30, "GIB": 2**30, "M": 2**20, "MB": 2**20, "MIB": 2**20, "T": 2**40, "TB": 2**40,
          "TIB": 2**40}


def parse_size(text: str) -> int | None:
    """``80GB``, ``80 GiB``, ``40g``, ``512MB`` in bytes (a bare number is GB; GB is GiB); None if not a size."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        return None
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "GB").upper()])


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    backend: Literal["torchrun", "deepspeed", "slurm"] = field(
        default="torchrun", metadata=_doc("What `bookgen launch` starts."))
    nodes: int = field(default=1, metadata=_doc("Nodes (machines)."))
    procs_per_node: int = field(default=1, metadata=_doc("Ranks per node (on GPUs: GPUs per node)."))
    node_rank: int = field(default=0, metadata=_doc("This node's index (torchrun across nodes)."))
    master_addr: str = field(default="127.0.0.1", metadata=_doc("Rendezvous host: the first node."))
    master_port: int = field(default=29500, metadata=_doc("Rendezvous port."))
    hostfile: Path | None = field(default=None, metadata=_doc("DeepSpeed hostfile (multi-node).", path=True))
    partition: str | None = field(default=None, metadata=_doc("Slurm partition."))
    time: str | None = field(default=None, metadata=_doc("Slurm time limit, e.g. 12:00:00."))
    account: str | None = field(default=None, metadata=_doc("Slurm account."))
    gpus_per_node: int = field(default=0, metadata=_doc("Slurm GPUs per node (0: CPU job)."))
    gpu_memory: int | str | None = field(default=None, metadata=_doc(
        "Memory of one of the cluster's GPUs, e.g. 80GB: `bookgen launch` then checks the memory plan (bookgen "
        "plan) before the job waits in the queue; unset: the job checks it when it starts."))
    sbatch_extra: list[str] = field(default_factory=list, metadata=_doc("Extra sbatch options, e.g. --qos=high."))
    max_restarts: int = field(default=3, metadata=_doc(
        "torchrun (bookgen launch, slurm/train.sh) restarts every rank this many times when one crashes or is "
        "killed; the run resumes from its newest complete checkpoint. A user error, a preemption or a Ctrl-C "
        "is never restarted."))

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "nodes", "must be >= 1")
        _require(self.procs_per_node >= 1, "procs_per_node", "must be >= 1")
        _require(0 <= self.node_rank < self.nodes, "node_rank", "must be in [0, launch.nodes)")
        _require(1 <= self.master_port <= 65535, "master_port", "must be a TCP port")
        _require(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
        _require(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        if self.gpu_memory is not None:
            _require(parse_size(str(self.gpu_memory)) is not None, "gpu_memory",
                     f"{self.gpu_memory!r} is not a size; write e.g. 80GB, 80GiB or 512MB")


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    seed: int = field(default=42, metadata=_doc("Seed for the split, initialisation and data order."))
    run: RunConfig = field(metadata=_doc("Run folder and logging."))
    data: DataConfig = field(metadata=_doc("Corpus, split and token store."))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig, metadata=_doc("Tokenizer."))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_doc("Model."))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_doc("Optimisation."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_doc("Evaluation."))
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection, metadata=_doc("DeepSpeed."))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=_doc("Checkpoints."))
    generate: GenerateConfig = field(default_factory=GenerateConfig, metadata=_doc("Sampling."))
    launch: LaunchConfig = field(default_factory=LaunchConfig, metadata=_doc("How `bookgen launch` starts ranks."))

    def __post_init__(self) -> None:
        _require_seed(self.seed, "seed")
        if self.model.name_or_path is None and self.model.config is None:  # others: checked in preflight
            _require(self.data.block_size <= self.model.n_positions, "data.block_size",
                     f"{self.data.block_size} is more than model.n_positions ({self.model.n_positions}): the model "
                     "has no position embedding beyond that; lower data.block_size or raise model.n_positions")
        if self.train.precision == "bf16" and self.deepspeed.zero_stage == 0:
            # DeepSpeed's unfused 16-bit optimizer: one device read per parameter tensor every step
            _require(False, "train.precision", "bf16 with deepspeed.zero_stage 0 keeps bf16 weights in DeepSpeed's "
                     "slowest optimizer (one device read per parameter tensor each step); use bf16-mixed (fp32 "
                     "weights, bf16 autocast) for ZeRO-0, or ZeRO 1-3 for bf16 weights")
        if self.checkpoint.keep_best:
            # only a checkpoint saved right after an evaluation has a loss to rank it by
            every, eval_every = self.checkpoint.every, self.eval.every
            _require(every is not None and eval_every is not None and every % eval_every == 0,
                     "checkpoint.keep_best", f"needs checkpoint.every ({every}) to be a multiple of eval.every "
                     f"({eval_every}), so that every checkpoint has a validation loss")
        if self.checkpoint.best_by != "eval_loss":
            _require(self.data.prompt is not None and self.eval.scored > 0, "checkpoint.best_by",
                     f"{self.checkpoint.best_by} is measured on prompt-completion rows: set data.prompt and "
                     "eval.scored > 0, or keep the best by eval_loss")

    @property
    def prepared_dir(self) -> Path:
        return self.data.prepared_dir or self.run.output_dir / "prepared"
