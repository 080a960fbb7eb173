"""msgspec Structs for every message that crosses the bus.

Internal subjects carry msgpack. Messages that share a subject form a tagged union (``type``
field) so a receiver decodes exactly one of a known set. Token ids travel as ints, never text,
past the frontend.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct, field

Role = Literal["decode", "prefill"]
FinishReason = Literal["stop", "length", "abort", "error"]


class StructuredOutput(Struct, kw_only=True, omit_defaults=True):
    """A constraint on a choice's text, compiled by the engine (xgrammar) into a token bitmask that
    is applied to the logits each step. The frontend turns ``response_format``, vLLM's
    ``structured_outputs``/``guided_*`` and a forced ``tool_choice`` into one of these."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    # json_schema: the schema as JSON text; regex: the pattern; choice: a JSON list of strings;
    # grammar: EBNF (xgrammar/GBNF dialect); json_object: unused.
    spec: str = ""


class SamplingParams(Struct, kw_only=True, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    # OpenAI's additive penalties (-2..2) and vLLM's multiplicative repetition penalty (1: off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Top logprobs per output token: -1 none, 0 the chosen token's only, k the k most likely too.
    logprobs: int = -1
    # The same for prompt tokens (completions' echo with logprobs); -1 none.
    prompt_logprobs: int = -1
    # Parallel sequences from one prompt (its KV blocks shared); chunks carry their ``choice``.
    n: int = 1
    structured: StructuredOutput | None = None
    # vLLM's request priority: lower is served first (the engine's waiting queue, and the last to
    # be preempted under KV pressure); the frontend checks it against its allowed range.
    priority: int = 0


class Usage(Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


# --- frontend -> decode worker -------------------------------------------------------------


class GenerateRequest(Struct, tag="generate", kw_only=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    model: str = ""
    # False: the worker coalesces and sends one final TokenChunk with every token.
    stream: bool = True
    # Absolute wall-clock deadline (unix seconds); 0 means none. Past it the worker aborts.
    deadline: float = 0.0
    # From the router: a peer whose lower KV tiers hold the first kv_source_blocks blocks.
    kv_source: str = ""
    kv_source_blocks: int = 0
    # LoRA adapter to apply (its name, as loaded on the worker); "" : the base model. The
    # frontend resolves the OpenAI ``model`` field to (base model, adapter), as vLLM does.
    lora: str = ""
    # Set by a frontend that takes batched replies (shared.bus.ReplyInbox.batch_subject): the worker
    # then sends every reply of this request there, in ReplyBatches with the other requests of that
    # frontend (one message per engine step per frontend). Empty: one message per reply to ``reply``.
    batch_reply: str = ""


class TokenLogprob(Struct, array_like=True):
    token_id: int
    logprob: float


class PositionLogprobs(Struct, array_like=True):
    """Log-probabilities at one position: the token there and the most likely alternatives."""

    token: TokenLogprob
    top: list[TokenLogprob] = field(default_factory=list)


class TokenChunk(Struct, tag="chunk", kw_only=True, omit_defaults=True):
    """New tokens of one choice of a request. With n == 1 the last chunk carries finish_reason and
    usage; with n > 1 each choice's last chunk carries its finish_reason and the request's last
    chunk the usage (prompt counted once)."""

    request_id: str
    index: int  # position of token_ids[0] in the completion
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    choice: int = 0  # which of the request's n sequences
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # one per token_ids entry
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)  # first chunk only


class GenerateError(Struct, tag="error", kw_only=True):
    request_id: str
    # HTTP-like: 400 bad request, 404 unknown model, 429/503 overloaded, 500 internal.
    code: int
    message: str


class ReplyBatch(Struct, tag="batch", kw_only=True):
    """Replies to several requests of one frontend in one message (one engine step's chunks);
    the frontend's inbox hands each to its request by ``request_id``, in order."""

    replies: list[TokenChunk | GenerateError]


GenerateReply = TokenChunk | GenerateError | ReplyBatch


class Cancel(Struct, tag="cancel", kw_only=True):
    request_id: str
    reason: str = "cancelled"


class StatusRequest(Struct, tag="status_request", kw_only=True):
    """Liveness probe: does the worker still hold these requests? (No responders = it is dead.)"""

    request_ids: list[str] = field(default_factory=list)


class StatusReply(Struct, tag="status_reply", kw_only=True):
    worker_id: str
    known: list[str] = field(default_factory=list)
    draining: bool = False


# --- frontend -> router --------------------------------------------------------------------


class RouteRequest(Struct, tag="route", kw_only=True, omit_defaults=True):
    request_id: str
    model: str
    token_ids: list[int]
    # Workers the caller has just seen fail; the router avoids them.
    exclude: list[str] = field(default_factory=list)
    # Chained KV block hashes of token_ids (shared.kv_hash) for block_size, computed by the caller
    # so the router need not: hashing a 4k-token prompt costs ~300 us, the routing decision ~35 us.
    block_hashes: list[int] = field(default_factory=list)
    block_size: int = 0
    # LoRA adapter the request runs under ("" : none): only workers that have it loaded are
    # candidates, and one that holds it resident is preferred (the adapter-load cost term).
    lora: str = ""
    # A conversation's id (the caller's x-session-id): the router keeps it on one worker while
    # that worker is live and not full (shared/routing/affinity.py). "": no affinity.
    session_id: str = ""
    # The request's output budget (its max_tokens), for the traffic the router reports to the planner.
    max_tokens: int = 0


class RouteDecision(Struct, tag="decision", kw_only=True, omit_defaults=True):
    worker_id: str
    subject: str
    cancel_subject: str
    overlap_blocks: int = 0
    policy: str = ""
    # G4: another worker holds more of this prompt in its host/disk tiers; the chosen worker may
    # pull those blocks from it instead of recomputing them.
    kv_source: str = ""
    kv_source_blocks: int = 0


class RouteError(Struct, tag="route_error", kw_only=True):
    code: int  # 503: no worker, 404: unknown model
    message: str


RouteReply = RouteDecision | RouteError


class RouteBatch(Struct, tag="route_batch", kw_only=True):
    """Several route requests from one frontend in one message (those its event loop gathered in
    one turn): one message and one router wake-up instead of one per request."""

    requests: list[RouteRequest]


class RouteBatchReply(Struct, tag="route_batch_reply", kw_only=True):
    """The router's answers to a RouteBatch, in its order (one message back)."""

    replies: list[RouteDecision | RouteError]


class RouteLeaseRequest(Struct, tag="route_lease_request", kw_only=True):
    """A frontend asks for ``count`` decisions ahead (shared/routing/lease.py). Only a policy that
    does not read the request (round-robin, random) can decide ahead; a KV-aware one refuses."""

    model: str
    count: int


class RouteLease(Struct, tag="route_lease", kw_only=True):
    """Decisions granted ahead, in the order the router made them: ``order`` indexes ``workers``
    (each worker once), good for ``ttl`` seconds from receipt."""

    workers: list[RouteDecision]
    order: list[int]
    ttl: float


# --- router -> planner ---------------------------------------------------------------------


class ModelTraffic(Struct, kw_only=True, omit_defaults=True):
    """New requests one router placed for one model during a report's interval."""

    model: str
    requests: int = 0
    prompt_tokens: int = 0  # summed over those requests
    output_tokens: int = 0  # their max_tokens, summed


class TrafficReport(Struct, tag="traffic", kw_only=True, omit_defaults=True):
    """What one router (a router service replica, or a frontend's embedded one) placed during
    ``interval`` seconds: the planner's traffic meter, instead of a copy of every request."""

    source: str
    interval: float
    models: list[ModelTraffic] = field(default_factory=list)


# --- discovery and load --------------------------------------------------------------------


class LoraInfo(Struct, kw_only=True, omit_defaults=True):
    """A LoRA adapter loaded on a worker (on top of the worker's ``model``, its base)."""

    name: str
    digest: str = ""  # of its files (LoraAdapter.digest): with the name, the root of its KV block hashes


class WorkerInfo(Struct, kw_only=True, omit_defaults=True):
    worker_id: str
    role: Role
    model: str
    generate_subject: str = ""
    cancel_subject: str = ""
    kv_endpoint: str = ""  # where KV blocks are pushed (transport URL), "" if none
    block_size: int = 16
    engine: str = ""
    pid: int = 0
    host: str = ""
    started_at: float = 0.0
    loras: list[LoraInfo] = field(default_factory=list)  # adapters it serves (resident or loadable)
    # What a frontend needs to serve the model (old workers leave these empty; see shared/model_files.py).
    context_length: int = 0
    tokenizer_digest: str = ""
    template_digest: str = ""
    model_path: str = ""  # the directory the worker read the model from (on its host)
    files_published: bool = False  # the tokenizer files are in the model-files object store


class LoadReport(Struct, tag="load", kw_only=True, omit_defaults=True):
    worker_id: str
    role: Role
    timestamp: float
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    running: int = 0
    waiting: int = 0
    prefill_tokens_queued: int = 0
    loras_resident: list[str] = field(default_factory=list)  # adapters in memory now (no load cost)
    # The seq of the last KV event batch the worker had drained when it took these figures: the
    # report reflects every request whose blocks that batch (or an earlier one) announced.
    kv_seq: int = 0


# --- disaggregated prefill -----------------------------------------------------------------


class PrefillJob(Struct, tag="prefill_job", kw_only=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)  # for the first token
    block_hashes: list[int] = field(default_factory=list)
    decode_worker_id: str = ""
    kv_endpoint: str = ""  # where to write the KV blocks ("" : compute only, nothing to send)
    kv_layout: str = ""  # the decode engine's kv_layout(); a prefill worker with another refuses
    # Reserved on the decode worker: the prompt's last len(block_ids) blocks, in logical order
    # (the blocks before them were prefix-cache hits there and are not sent).
    block_ids: list[int] = field(default_factory=list)
    kv_token: bytes = b""  # one-time token the decode worker issued for this transfer; sent with the KV bytes
    notify_subject: str = ""  # where PrefillDone/PrefillFailed go ("" : baton.v1.prefill.done.<id>)
    deadline: float = 0.0  # unix seconds; past it the job is dropped


class PrefillDone(Struct, tag="prefill_done", kw_only=True, omit_defaults=True):
    request_id: str
    prefill_worker_id: str
    num_tokens: int = 0
    cached_tokens: int = 0
    blocks_written: int = 0
    first_token: int = -1  # sampled by the prefill worker; the decode worker continues from it


class PrefillFailed(Struct, tag="prefill_failed", kw_only=True):
    request_id: str
    prefill_worker_id: str
    reason: str


PrefillReply = PrefillDone | PrefillFailed


# --- G4: pulling KV blocks from a peer's host/disk tiers ----------------------------------


class KvFetchRequest(Struct, tag="kv_fetch", kw_only=True, omit_defaults=True):
    """Ask a peer for blocks from its lower tiers. ``send=False`` only asks how many of the
    leading ``block_hashes`` it holds; ``send=True`` sends that many to ``endpoint`` (a KV
    transport) under ``transfer_id``."""

    transfer_id: str
    block_hashes: list[int]
    kv_layout: str = ""
    endpoint: str = ""
    token: bytes = b""  # the asking worker's one-time token for this transfer (send=True)
    send: bool = False


class KvFetchReply(Struct, tag="kv_fetch_reply", kw_only=True, omit_defaults=True):
    available: int = 0
    sent: int = 0
    error: str = ""


# --- KV events (router index) --------------------------------------------------------------


class KvStored(Struct, kw_only=True, omit_defaults=True):
    """A run of blocks stored in order: block_hashes[0]'s parent is parent_hash."""

    block_hashes: list[int]
    parent_hash: int | None = None


class KvEventBatch(Struct, tag="kv_events", kw_only=True, omit_defaults=True):
    worker_id: str
    seq: int  # per worker, +1 per batch; a gap means lost events -> resync
    stored: list[KvStored] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    cleared: bool = False  # the worker dropped every block
    tier: int = 1  # 1 device, 2 host, 3 disk, 4 remote


# --- planner -------------------------------------------------------------------------------


class PlannerObservation(Struct, tag="planner_observation", kw_only=True, omit_defaults=True):
    timestamp: float
    model: str = ""  # the model these workers serve ("": every worker)
    prefill_pending: int = 0
    prefill_ack_pending: int = 0
    prefill_workers: int = 0
    decode_workers: int = 0
    decode_running: int = 0
    decode_waiting: int = 0
    kv_usage: float = 0.0  # mean fraction of KV blocks in use over decode workers


class ScaleDecision(Struct, tag="scale_decision", kw_only=True, omit_defaults=True):
    timestamp: float
    role: Role
    before: int
    after: int
    reason: str
    dry_run: bool = False
    model: str = ""  # the model whose workers change ("": every worker)


# --- public NATS request API ---------------------------------------------------------------


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str


class ApiGenerateRequest(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Body of a request on ``baton.v1.api.generate``: exactly one of prompt, messages, token_ids."""

    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    token_ids: list[int] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = True
    # lower is served first; None: the x-baton-priority header's, else 0 (checked by the frontend)
    priority: int | None = None


class ApiChunk(Struct, tag="chunk", kw_only=True, omit_defaults=True):
    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class ApiError(Struct, tag="error", kw_only=True):
    code: int
    message: str
    request_id: str = ""


ApiReply = ApiChunk | ApiError


# --- LoRA adapters: load / unload at run time --------------------------------------------------


class LoraLoad(Struct, tag="lora_load", kw_only=True):
    """Frontend -> one worker (request/reply on ``baton.v1.lora.<worker_id>``); and the body of
    the public ``baton.v1.api.lora`` operation (vLLM's field names)."""

    lora_name: str
    lora_path: str


class LoraUnload(Struct, tag="lora_unload", kw_only=True):
    lora_name: str


LoraCommand = LoraLoad | LoraUnload


class LoraReply(Struct, tag="lora_reply", kw_only=True, omit_defaults=True):
    """A worker's (or the API's) answer: ``code`` HTTP-like (200 ok, 400 bad adapter, 404 unknown,
    503 busy), ``message`` says why."""

    code: int = 200
    message: str = ""
    worker_id: str = ""
    digest: str = ""


# --- codecs --------------------------------------------------------------------------------
# One encoder/decoder per union, built once: msgspec decoders are fastest when reused.

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode

generate_request_decoder = msgspec.msgpack.Decoder(GenerateRequest)
generate_reply_decoder = msgspec.msgpack.Decoder(GenerateReply)
cancel_decoder = msgspec.msgpack.Decoder(Cancel)
status_request_decoder = msgspec.msgpack.Decoder(StatusRequest)
status_reply_decoder = msgspec.msgpack.Decoder(StatusReply)
route_request_decoder = msgspec.msgpack.Decoder(RouteRequest)
route_reply_decoder = msgspec.msgpack.Decoder(RouteReply)
route_message_decoder = msgspec.msgpack.Decoder(RouteRequest | RouteBatch | RouteLeaseRequest)  # what a router takes
route_batch_reply_decoder = msgspec.msgpack.Decoder(RouteBatchReply | RouteDecision | RouteError)
route_lease_reply_decoder = msgspec.msgpack.Decoder(RouteLease | RouteError)
traffic_report_decoder = msgspec.msgpack.Decoder(TrafficReport)
worker_info_decoder = msgspec.msgpack.Decoder(WorkerInfo)
load_report_decoder = msgspec.msgpack.Decoder(LoadReport)
prefill_job_decoder = msgspec.msgpack.Decoder(PrefillJob)
prefill_reply_decoder = msgspec.msgpack.Decoder(PrefillReply)
kv_event_decoder = msgspec.msgpack.Decoder(KvEventBatch)
kv_fetch_request_decoder = msgspec.msgpack.Decoder(KvFetchRequest)
kv_fetch_reply_decoder = msgspec.msgpack.Decoder(KvFetchReply)
planner_observation_decoder = msgspec.msgpack.Decoder(PlannerObservation)
api_request_msgpack_decoder = msgspec.msgpack.Decoder(ApiGenerateRequest)
api_request_json_decoder = msgspec.json.Decoder(ApiGenerateRequest)
api_reply_msgpack_decoder = msgspec.msgpack.Decoder(ApiReply)
lora_command_decoder = msgspec.msgpack.Decoder(LoraCommand)
lora_command_json_decoder = msgspec.json.Decoder(LoraCommand)
lora_reply_decoder = msgspec.msgpack.Decoder(LoraReply)
