"""The ModelConfig schema: the contract between the importer, the catalog and the runtime.

A config pins everything the runtime needs (backend, exact revision, stop tokens, the chat template
itself, reasoning and tool-call formats, context size, quantization, sampling defaults, files with
hashes) and records, for each decision, the evidence that led to it. Top-level keys follow LocalAI's
model YAML where LocalAI has a key for the same thing; everything else lives under `mlx:`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gallery.kv_quant import backend_kv_problem, kv_problem

SCHEMA_VERSION = 1

# Backend names as LocalAI spells them: `mlx` is its mlx-lm backend, `mlx-vlm` the vision one.
Backend = Literal["mlx", "mlx-vlm"]
SUPPORTED_BACKENDS: tuple[str, ...] = ("mlx", "mlx-vlm")

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Evidence(_Strict):
    """One piece of evidence: where it was read and what it says."""

    source: str = Field(
        description="Where it was read: a repo file, `hub` (model info), `cli`, `weights index`."
    )
    field: str | None = Field(default=None, description="The field or key inside the source, if any.")
    detail: str = Field(description="What this evidence says, in one line.")
    value: str | None = Field(
        default=None,
        description="The raw value read there (e.g. a token's text), when a "
        "check needs it as data rather than in the sentence.",
    )
    strength: Literal["decisive", "strong", "medium", "weak"] | None = Field(
        default=None,
        description="How much this evidence weighs: decisive (what the libraries can load), strong (what "
        "the weights contain), medium (config and processor declarations), weak (names, tags).",
    )


class Decision(_Strict):
    """A decision the importer made, with the evidence for it and any evidence against it."""

    value: str = Field(description="The decided value, as shown to a reviewer.")
    evidence: list[Evidence] = Field(default_factory=list)
    conflicts: list[str] = Field(
        default_factory=list, description="Evidence that disagreed, and why it lost."
    )


class Parameters(_Strict):
    """LocalAI's `parameters`: the model reference and sampling defaults."""

    model: str = Field(description="The Hugging Face repo id (or local path) the runtime loads.")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    repeat_penalty: float | None = None
    seed: int | None = None


class TemplateSettings(_Strict):
    """LocalAI's `template` section: this project always uses the (pinned) tokenizer template."""

    use_tokenizer_template: bool = True


class Source(_Strict):
    """Where the model comes from, pinned to an exact commit."""

    repo: str | None = Field(
        default=None, description="Hub repo id, e.g. mlx-community/gemma-4-E4B-it-qat-4bit."
    )
    revision: str | None = Field(default=None, description="The full commit hash the config is pinned to.")
    requested_revision: str | None = Field(default=None, description="What the user asked for (branch, tag).")
    local_path: str | None = Field(default=None, description="A local model folder, when imported from one.")

    @field_validator("revision")
    @classmethod
    def _full_commit(cls, value: str | None) -> str | None:
        if value is not None and not _COMMIT_RE.match(value):
            raise ValueError(f"revision must be a full 40-hex commit hash, got {value!r}")
        return value

    @model_validator(mode="after")
    def _somewhere(self) -> Source:
        if not self.repo and not self.local_path:
            raise ValueError("a source needs a repo or a local_path")
        return self


# Token ids are int32 everywhere they travel (tokenizers, LocalAI's gRPC): a larger id is a typo or an attack.
MAX_TOKEN_ID = 2**31 - 1


class StopToken(_Strict):
    """One end-of-sequence token: its id, its text, and every place that named it."""

    id: int = Field(ge=0, le=MAX_TOKEN_ID)
    text: str | None = Field(default=None, description="The token's text; null when no file maps the id.")
    sources: list[str] = Field(default_factory=list, description="file:field entries that named this token.")


class RenderCheck(_Strict):
    """The result of rendering the pinned template on probe conversations at import time."""

    text_probe: Literal["ok", "error", "skipped"] = "skipped"
    image_probe: Literal["ok", "error", "skipped"] = "skipped"
    errors: list[str] = Field(default_factory=list)


class ChatTemplate(_Strict):
    """The pinned chat template: the text itself plus its sha256, and where it was found."""

    status: Literal["pinned", "missing", "rejected"] = Field(
        description="pinned: text below is used; missing: none anywhere; rejected: found but unusable (see render_check)."
    )
    source: str | None = Field(default=None, description="File (and key) the pinned template came from.")
    name: str | None = Field(
        default=None, description="Which named template was pinned, when the home had several."
    )
    text: str | None = None
    sha256: str | None = None
    named: dict[str, str] = Field(default_factory=dict, description="Other named templates (e.g. tool_use).")
    variables: dict[str, str] = Field(
        default_factory=dict,
        description="Special tokens the template sees as variables (bos_token, eos_token, …).",
    )
    render_check: RenderCheck = Field(default_factory=RenderCheck)
    supports_system: bool = Field(
        default=True,
        description="False when the template rejects system messages (the runtime folds them in).",
    )
    content_format: Literal["string", "parts"] = Field(
        default="string", description="parts: the template only renders list-of-parts message content."
    )
    accept_missing: bool = Field(
        default=False,
        description="A catalog entry sets this to say a missing template is known and accepted.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ChatTemplate:
        if self.status == "pinned":
            if not self.text:
                raise ValueError("a pinned chat template needs its text")
            if self.sha256 is not None and not _SHA256_RE.match(self.sha256):
                raise ValueError("chat_template.sha256 must be 64 lowercase hex digits")
        elif self.text:
            raise ValueError("status is 'missing' but a template text is present")
        return self


class Reasoning(_Strict):
    """How the model reasons: its markers, whether it thinks by default, and the switch."""

    supported: bool = False
    start: str | None = Field(default=None, description="Marker that opens reasoning, e.g. <think>.")
    end: str | None = Field(default=None, description="Marker that closes reasoning, e.g. </think>.")
    default_enabled: bool | None = Field(
        default=None, description="Whether the template thinks when not told."
    )
    switch: str | None = Field(default=None, description="Template variable that turns it on/off.")


class ToolCalls(_Strict):
    """The tool-call syntax the template and model use."""

    format: str | None = Field(default=None, description="qwen, llama3_json, mistral, gemma4, harmony, …")
    start: str | None = None
    end: str | None = None


class Quantization(_Strict):
    """Weight quantization as the checkpoint declares it."""

    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    activation_quantization: bool = Field(
        default=False,
        description="mxfp8/nvfp4 weights: on CUDA the runtime also quantizes activations (mlx's QQLinear); "
        "nowhere else.",
    )


class KvCache(_Strict):
    """How the runtime quantizes the KV cache (load options kv_bits / kv_quant_scheme override it)."""

    bits: float | None = Field(
        default=None,
        description="Bits per KV element: whole 2-8 (uniform) or 1-8 in steps of 0.5 (turboquant).",
    )
    scheme: Literal["uniform", "turboquant"] = Field(
        default="uniform",
        description="uniform: MLX's group-wise quantization; turboquant: mlx-vlm's TurboQuant.",
    )
    group_size: int = Field(default=64, description="Uniform quantization's group size: 32, 64 or 128.")
    quantized_kv_start: int = Field(default=0, ge=0, description="Tokens kept unquantized first.")

    @model_validator(mode="after")
    def _valid_pair(self) -> KvCache:
        problem = kv_problem(self.bits, self.scheme, where="mlx.kv_cache.")
        if problem:
            raise ValueError(problem)
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"mlx.kv_cache.group_size {self.group_size} is not 32, 64 or 128")
        return self


# The drafter families mlx-vlm's speculative loop runs (its KNOWN_DRAFTER_KINDS).
DraftKind = Literal["dflash", "eagle3", "mtp"]


class Speculative(_Strict):
    """Speculative-decoding options the checkpoint (or the user) pins.

    `draft_model` (a local folder, unpinned) is the older way to name a drafter and still loads; a drafter from
    the Hub is pinned in `mlx.drafter` instead, with its revision and file hashes.
    """

    mtp: bool = Field(default=False, description="The checkpoint bundles multi-token-prediction layers.")
    draft_model: str | None = Field(
        default=None, description="A drafter folder (unpinned); prefer mlx.drafter for a Hub drafter."
    )
    draft_kind: DraftKind | None = None
    num_draft_tokens: int | None = Field(default=None, ge=1, le=64)


class Media(_Strict):
    """Which inputs besides text the model's towers accept."""

    image: bool = False
    audio: bool = False
    video: bool = False
    marker: str | None = Field(default=None, description="What an image part renders as in the prompt.")
    image_token: str | None = None
    audio_token: str | None = None
    video_token: str | None = None


class RepoFile(_Strict):
    """A file of the pinned revision, with the hashes the Hub gives for it."""

    path: str
    size: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(
        default=None, description="The LFS sha256 (weights); null for small git files."
    )
    blob_id: str | None = Field(default=None, description="Git blob sha1 from the Hub.")

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_RE.match(value):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
        return value


class Drafter(_Strict):
    """A separate drafter model, pinned like the main model: repo at a commit, its files with sha256."""

    repo: str | None = Field(default=None, description="Hub repo id of the drafter.")
    revision: str | None = Field(default=None, description="The full commit hash the drafter is pinned to.")
    local_path: str | None = Field(default=None, description="A local drafter folder (no Hub pin).")
    kind: DraftKind = Field(description="mlx-vlm's drafter family: dflash, eagle3 or mtp.")
    model_type: str | None = Field(
        default=None, description="The drafter's model type as mlx-vlm resolves it (e.g. qwen3_dflash)."
    )
    num_draft_tokens: int | None = Field(
        default=None, ge=1, le=64, description="Drafts per verification round (default: the drafter's own)."
    )
    files: list[RepoFile] = Field(
        default_factory=list, description="The drafter's files, each with its sha256."
    )

    @field_validator("revision")
    @classmethod
    def _full_commit(cls, value: str | None) -> str | None:
        if value is not None and not _COMMIT_RE.match(value):
            raise ValueError(f"drafter revision must be a full 40-hex commit hash, got {value!r}")
        return value

    @model_validator(mode="after")
    def _pinned(self) -> Drafter:
        if not self.repo and not self.local_path:
            raise ValueError("a drafter needs a repo (with revision and files) or a local_path")
        if self.repo:
            if self.revision is None:
                raise ValueError(f"drafter {self.repo}: revision must be pinned to a full commit hash")
            if not self.files:
                raise ValueError(f"drafter {self.repo}: files must list the pinned files with their sha256")
            unhashed = [f.path for f in self.files if f.sha256 is None]
            if unhashed:
                raise ValueError(f"drafter {self.repo}: files without sha256: {', '.join(unhashed[:5])}")
        return self


class Sharding(_Strict):
    """How mlx-lm can split this model across processes (recorded by the importer, checked by validate)."""

    pipeline: bool = Field(
        default=False, description="mlx-lm's class has model.pipeline(group): layers split across ranks."
    )
    tensor: bool = Field(
        default=False,
        description="mlx-lm's class has shard(group): every layer's matrices split across ranks.",
    )
    library: str | None = Field(default=None, description="The mlx-lm version whose classes were read.")
    layers: int | None = Field(default=None, gt=0, description="Transformer layers (what a pipeline splits).")
    attention_heads: int | None = Field(default=None, gt=0)
    kv_heads: int | None = Field(
        default=None, gt=0, description="Key/value heads (tensor mode divides them)."
    )


class Distributed(_Strict):
    """Serving one model from several processes with MLX's distributed runtime (started by mlx.launch)."""

    backend: Literal["ring", "jaccl"] = Field(
        default="ring",
        description="ring: TCP (Ethernet, Wi-Fi, Thunderbolt bridge); jaccl: RDMA over Thunderbolt 5.",
    )
    hosts: list[str] = Field(
        default_factory=list,
        description="One entry per rank (an IP named twice runs two ranks there); rank 0 first.",
    )
    hostfile: str | None = Field(default=None, description="An mlx.launch hostfile instead of hosts.")
    strategy: Literal["auto", "pipeline", "tensor"] = Field(
        default="auto", description="auto: pipeline when the class supports it, else tensor."
    )
    layer_split: list[int] | None = Field(
        default=None, description="Pipeline: layers per rank, rank 0 first (default: even)."
    )

    @model_validator(mode="after")
    def _one_host_source(self) -> Distributed:
        if self.hosts and self.hostfile:
            raise ValueError("give hosts or hostfile, not both")
        return self


class MemoryEstimate(_Strict):
    """What the model needs in memory: weights from the file list plus the KV cache, as mlx-lm allocates it.

    KV at N tokens = (kv_bytes_per_token - sliding_kv_bytes_per_token) × N
    + sliding_kv_bytes_per_token × min(N, sliding_window) + state_bytes.
    """

    weights_bytes: int | None = Field(default=None, ge=0, description="Bytes of the weight files MLX loads.")
    kv_bytes_per_token: int | None = Field(
        default=None, ge=0, description="KV-cache bytes one token adds, over every layer that caches it."
    )
    kv_dtype: str | None = Field(default=None, description="The dtype the KV cache is stored in.")
    full_attention_layers: int | None = Field(default=None, ge=0)
    sliding_attention_layers: int | None = Field(default=None, ge=0)
    sliding_window: int | None = Field(default=None, gt=0, description="Tokens a sliding-window layer keeps.")
    sliding_kv_bytes_per_token: int | None = Field(
        default=None, ge=0, description="The part of kv_bytes_per_token held by sliding-window layers."
    )
    linear_attention_layers: int | None = Field(
        default=None, ge=0, description="Linear-attention / SSM layers: a fixed state, not per token."
    )
    shared_kv_layers: int | None = Field(default=None, ge=0, description="Layers reusing another's KV.")
    state_bytes: int | None = Field(default=None, ge=0, description="Fixed state of the linear layers.")
    context_tokens: int | None = Field(default=None, gt=0, description="The pinned context size.")
    at_context_bytes: int | None = Field(
        default=None, ge=0, description="Weights + KV at the pinned context."
    )
    at_8k_bytes: int | None = Field(default=None, ge=0, description="Weights + KV at 8192 tokens.")


class MlxSection(_Strict):
    """The project's own section: everything LocalAI has no key for."""

    source: Source
    model_type: str | None = None
    architectures: list[str] = Field(default_factory=list)
    vocab_size: int | None = Field(
        default=None,
        gt=0,
        le=MAX_TOKEN_ID + 1,
        description="The language model's vocabulary size (config.json, or its text/llm sub-config): "
        "stop token ids must be below it.",
    )
    stop_tokens: list[StopToken] = Field(default_factory=list)
    chat_template: ChatTemplate
    reasoning: Reasoning = Field(default_factory=Reasoning)
    tool_calls: ToolCalls = Field(default_factory=ToolCalls)
    media: Media = Field(default_factory=Media)
    quantization: Quantization | None = None
    speculative: Speculative = Field(default_factory=Speculative)
    kv_cache: KvCache | None = Field(default=None, description="KV-cache quantization (default: none).")
    drafter: Drafter | None = Field(
        default=None, description="A separate drafter model, pinned (see the README's 'Drafters')."
    )
    text_route: Literal["shared-weights", "vlm"] | None = Field(
        default=None, description="For mlx-vlm configs: how text-only requests run."
    )
    trust_remote_code: bool = False
    files: list[RepoFile] = Field(default_factory=list)
    total_size: int | None = Field(default=None, ge=0)
    sharding: Sharding | None = Field(
        default=None, description="Distributed sharding support (configs imported before it have none)."
    )
    memory: MemoryEstimate | None = Field(
        default=None, description="Memory estimate (optional: configs imported before it have none)."
    )
    decisions: dict[str, Decision] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)

    @property
    def stop_token_ids(self) -> list[int]:
        """The pinned stop-id set, in a stable order."""
        return [token.id for token in self.stop_tokens]


class ModelConfig(_Strict):
    """A pinned, explained model config (LocalAI-shaped keys plus the `mlx:` section)."""

    schema_version: int = Field(default=SCHEMA_VERSION)
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    license: str | None = None
    backend: Backend
    known_usecases: list[str] = Field(default_factory=list)
    context_size: int | None = Field(default=None, gt=0)
    parameters: Parameters
    template: TemplateSettings = Field(default_factory=TemplateSettings)
    stopwords: list[str] = Field(default_factory=list)
    options: list[str] = Field(
        default_factory=list, description="LocalAI `key:value` options for the backend."
    )
    mlx: MlxSection
    distributed: Distributed | None = Field(
        default=None,
        description="Serve across several processes or machines (see the README's 'Several machines').",
    )

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {value}; this tool reads version {SCHEMA_VERSION}")
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # Names become file names (`<name>.yaml`) at install time: keep them inside their folder.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value) or ".." in value:
            raise ValueError(
                f"name {value!r} must be letters, digits and . _ + - (no path separators, no '..')"
            )
        return value

    @model_validator(mode="after")
    def _kv_cache_fits_backend(self) -> ModelConfig:
        kv = self.mlx.kv_cache
        problem = backend_kv_problem(self.backend, kv.scheme, field="mlx.kv_cache.scheme") if kv else None
        if problem:
            raise ValueError(problem)

        return self

    @model_validator(mode="after")
    def _one_drafter(self) -> ModelConfig:
        drafter = self.mlx.drafter
        if drafter is None:
            return self
        if self.backend != "mlx-vlm":
            raise ValueError(
                f"mlx.drafter: a {drafter.kind} drafter runs on mlx-vlm's speculative loop; backend "
                f"{self.backend!r} (mlx-lm) cannot use it"
            )
        if self.mlx.speculative.draft_model:
            raise ValueError("mlx.drafter and mlx.speculative.draft_model both name a drafter: keep one")
        return self

    @field_validator("options")
    @classmethod
    def _key_value(cls, value: list[str]) -> list[str]:
        for item in value:
            if ":" not in item:
                raise ValueError(f"option {item!r} must be written key:value")
        return value

    def to_data(self) -> dict[str, Any]:
        """The config as plain data in schema key order, without empty optional values."""
        return _prune(self.model_dump(mode="json"))


def _prune(value: Any) -> Any:
    """Drop None values and empty containers so configs stay short and diffs stay small."""
    if isinstance(value, dict):
        pruned = {key: _prune(item) for key, item in value.items()}
        return {key: item for key, item in pruned.items() if item is not None and item != {} and item != []}
    if isinstance(value, list):
        return [_prune(item) for item in value]
    return value


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of ModelConfig."""
    schema = ModelConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "MLX gallery ModelConfig"
    schema["$id"] = f"https://mlx-gallery.invalid/schema/model-config-v{SCHEMA_VERSION}.json"
    return schema
