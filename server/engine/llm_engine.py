"""The synchronous engine: requests in, one batched step at a time, deltas out.

Each loaded policy version is a :class:`PolicyWorker` (model, paged KV cache, block manager,
scheduler). New requests go to the current worker; :meth:`LLMEngine.load_policy` adds a worker
for another version and makes it current while the old one finishes its in-flight sequences,
after which it is dropped and its memory freed. Not thread-safe: :class:`AsyncEngine` drives
it from one thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import nn

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.cpu_kernels import StepThreads, prepack_linears, warm_up
from server.engine.cuda_graphs import GraphDecoder
from server.engine.guided import Guide
from server.engine.kv_cache import PagedKVCache, blocks_for_budget
from server.engine.model_runner import ModelRunner
from server.engine.outputs import Delta, TextState, metrics_of
from server.engine.sampling import SampleOutput, SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import FinishReason, Sequence, TokenLogprob
from server.engine.stats import EngineStats
from shared.checkpoints import Policy, PolicyRegistry
from shared.families import PolicyModel
from shared.model import RotaryEmbedding

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Retired:
    queries: int = 0
    hits: int = 0
    preemptions: int = 0


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 429/503)."""


@dataclass
class PolicyWorker:
    policy: Policy
    blocks: BlockManager
    scheduler: Scheduler
    runner: ModelRunner

    @property
    def version(self) -> str:
        return self.policy.version


def _serving_layout(model: PolicyModel, config: EngineConfig) -> None:
    """Ready the projections for serving. Float32 on CPU: weights prepacked once for oneDNN's
    matmul (:mod:`server.engine.cpu_kernels`). Otherwise every projection is stored transposed
    (same values and shapes), so ``F.linear`` hands BLAS a row-major (in, out) matrix, faster
    for the few-row matmuls of decoding. The output projection is untied from the embedding
    either way, so the embedding lookup keeps its own row-major table."""
    if model.to_logits.weight is model.token_emb.weight:  # once: a second engine on the same
        # model must not swap a tensor that the first one's CUDA graphs read
        model.to_logits.weight = nn.Parameter(model.to_logits.weight.detach().clone())
    model.requires_grad_(False)
    if prepack_linears(model):
        warm_up(model, config.max_num_seqs, config.threads())
        return
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.data = module.weight.data.t().contiguous().t()


def build_worker(policy: Policy, config: EngineConfig) -> PolicyWorker:
    device, dtype = config.torch_device(), config.torch_dtype()
    model = policy.model.to(device=device).eval()
    for module in model.modules():  # rotary frequencies stay float32 (precision matters)
        if isinstance(module, RotaryEmbedding):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(dtype))
    _serving_layout(model, config)
    num_blocks = config.num_blocks or blocks_for_budget(
        model.config, config.block_size, config.kv_cache_memory_mb, dtype
    )
    blocks = BlockManager(num_blocks, config.block_size)
    cache = PagedKVCache(model.config, num_blocks, config.block_size, device, dtype)
    scheduler = Scheduler(config, blocks, model.config.max_seq_len)
    graphs = GraphDecoder(model, cache, config.max_num_seqs) if config.graph_decode() else None
    return PolicyWorker(policy, blocks, scheduler, ModelRunner(model, cache, config.seed, graphs))


def check_admission(
    num_prompt_tokens: int,
    queued: int,
    max_waiting: int,
    max_seq_len: int,
    num_blocks: int,
    block_size: int,
) -> None:
    """``EngineOverloaded`` when ``queued`` sequences already wait, ``ValueError`` for a prompt
    that leaves no room in the context or could never fit the KV pool (both engine fronts)."""
    if queued >= max_waiting:
        raise EngineOverloaded(f"waiting queue is full ({max_waiting} sequences); retry later")
    if not 1 <= num_prompt_tokens < max_seq_len:
        raise ValueError(f"prompt must have 1 to {max_seq_len - 1} tokens, got {num_prompt_tokens}")
    if -(-(num_prompt_tokens + 1) // block_size) > num_blocks:
        raise ValueError(
            f"prompt of {num_prompt_tokens} tokens does not fit a KV cache of "
            f"{num_blocks} blocks x {block_size} tokens"
        )


class LLMEngine:
    def __init__(
        self,
        policy: Policy,
        config: EngineConfig | None = None,
        registry: PolicyRegistry | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        if self.config.torch_device().type == "cpu":
            torch.set_num_threads(self.config.threads())
        self.registry = registry
        self.workers: dict[str, PolicyWorker] = {}
        # versions served beside the current one to requests that name them (a canary):
        # loaded until released, drained or not
        self.beside: set[str] = set()
        self._retired = _Retired()  # counters of unloaded policy versions
        self.current = self.add_worker(build_worker(policy, self.config))
        self.texts: dict[Sequence, TextState] = {}
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        self._stats = EngineStats()
        cpu = self.config.torch_device().type == "cpu"
        self.threads = (
            StepThreads(self.config.threads(), self.config.decode_threads) if cpu else None
        )

    @classmethod
    def from_registry(
        cls,
        registry: PolicyRegistry,
        version: str | None = None,
        config: EngineConfig | None = None,
    ) -> LLMEngine:
        version = version or registry.latest()
        if version is None:
            raise ValueError(f"no policy versions in {registry.root}")
        return cls(registry.load(version), config, registry)

    # -- policies ---------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.current.version

    def add_worker(self, worker: PolicyWorker, *, beside: bool = False) -> PolicyWorker:
        """Serve ``worker``'s version to new requests, or with ``beside`` only to those that
        name it (:meth:`add_request`'s ``version``), the current version staying."""
        if worker.version in self.workers:
            raise ValueError(f"policy {worker.version} is already loaded")
        self.workers[worker.version] = worker
        if beside:
            self.beside.add(worker.version)
            log.info("serving policy %s beside %s", worker.version, self.current.version)
            return worker
        self.current = worker
        self.beside.discard(worker.version)
        log.info("serving policy %s for new requests", worker.version)
        self._drop_drained_workers()  # a replaced version with nothing in flight goes now
        return worker

    def load_verified(self, version: str) -> Policy:
        """Read and verify a version from the registry (raises ``CheckpointError``)."""
        if self.registry is None:
            raise RuntimeError("this engine has no policy registry to load versions from")
        return self.registry.load(version)

    def prepare_policy(self, version: str) -> PolicyWorker:
        """Load and verify a version and build its worker (raises ``CheckpointError``); safe to
        call from another thread while the loop runs."""
        if version in self.workers:
            raise ValueError(f"policy {version} is already loaded")
        return build_worker(self.load_verified(version), self.config)

    def reuse_worker(self, version: str, *, beside: bool = False) -> bool:
        """Serve an already-loaded version again (e.g. a rollback before the old one drained,
        or the promotion of a version served beside); with ``beside``, keep it loaded for the
        requests that name it."""
        worker = self.workers.get(version)
        if worker is None:
            return False
        if beside:
            if worker is not self.current:
                self.beside.add(version)
            return True
        self.current = worker
        self.beside.discard(version)
        log.info("serving policy %s for new requests (still loaded)", version)
        self._drop_drained_workers()
        return True

    def load_policy(self, version: str, *, beside: bool = False) -> str:
        """Serve ``version`` to new requests (in-flight ones finish on theirs), or with
        ``beside`` only to requests that name it, the current version staying."""
        if version == self.version or self.reuse_worker(version, beside=beside):
            return version
        self.add_worker(self.prepare_policy(version), beside=beside)
        return version

    def release(self, version: str) -> None:
        """Stop serving a version beside the current one: requests in flight on it finish,
        then it is unloaded; new ones naming it are refused."""
        self.beside.discard(version)
        self._drop_drained_workers()

    # -- requests ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(len(w.scheduler.waiting) for w in self.workers.values())

    def has_work(self) -> bool:
        return any(len(w.scheduler) for w in self.workers.values())

    def serving(self, version: str | None = None) -> PolicyWorker:
        """The worker new requests naming ``version`` go to (None: the current one);
        ``ValueError`` for a version that is neither current nor served beside it."""
        if version is None or version == self.current.version:
            return self.current
        if version not in self.beside:
            raise ValueError(f"policy {version} is not being served")
        return self.workers[version]

    def check_admission(
        self, num_prompt_tokens: int, queued: int, version: str | None = None
    ) -> None:
        """Refuse a request before it queues: ``EngineOverloaded`` when ``queued`` sequences
        already wait (the limit is ``max_waiting``), ``ValueError`` for a prompt that leaves
        no room in the model's context or could never fit the KV pool, or for a version not
        served."""
        worker = self.serving(version)
        check_admission(
            num_prompt_tokens,
            queued,
            self.config.max_waiting,
            worker.policy.config.max_seq_len,
            worker.blocks.num_blocks,
            worker.blocks.block_size,
        )

    def add_request(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        version: str | None = None,
    ) -> str:
        """Queue a request on ``version`` (None: the current one; else one served beside it,
        :meth:`load_policy`)."""
        params = params or SamplingParams()
        self.check_admission(len(prompt_ids), self.num_waiting, version)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        worker, now = self.serving(version), time.perf_counter()
        seqs = [
            Sequence(request_id, i, list(prompt_ids), params, worker.version, arrival=now)
            for i in range(params.n)
        ]
        if params.guided is not None:  # before anything is queued: a bad grammar raises here
            for seq in seqs:
                seq.guide = Guide(params.guided, worker.policy.tokenizer)
        for seq in seqs:
            worker.scheduler.add(seq)
            self.texts[seq] = TextState(worker.policy.tokenizer, params.stop)
        self.requests[request_id] = seqs
        return request_id

    def abort(self, request_id: str) -> list[Delta]:
        """Cancel a request: its blocks are freed now; returns its final deltas."""
        deltas = []
        for seq in self.requests.get(request_id, []):
            if not seq.is_finished:
                worker = self.workers[seq.policy_version]
                worker.scheduler.finish(seq, FinishReason.CANCELLED)
                self._stats.requests_cancelled += 1
                logprobs: list[TokenLogprob] | None = [] if seq.params.logprobs else None
                deltas.append(self._final(seq, FinishReason.CANCELLED, [], logprobs, False))
        self._forget_done(request_id)
        self._drop_drained_workers()
        return deltas

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[Delta]:
        """One batch per policy that has work: schedule, run, postprocess."""
        deltas: list[Delta] = []
        for worker in list(self.workers.values()):
            batch = worker.scheduler.schedule(time.perf_counter())
            if batch is not None:
                out = self._run(worker, batch)
                deltas += self._postprocess(worker, batch, out)
        self._drop_drained_workers()
        return deltas

    def _run(self, worker: PolicyWorker, batch: ScheduledBatch) -> SampleOutput:
        """Forward and sample one batch, on the CPU threads its size runs fastest on."""
        if self.threads is not None:
            self.threads.use(batch.num_tokens, batch.is_prefill)
        out = worker.runner.run(
            batch.seqs,
            batch.is_prefill,
            batch.fork_rows,
            batch.block_copies,
            end_ids=worker.policy.tokenizer.stop_ids,
        )
        if self.threads is not None:
            self.threads.done()
        self._stats.steps += 1
        if batch.is_prefill:
            self._stats.prefill_tokens += batch.num_tokens
            for seq in batch.seqs:
                if seq.num_preemptions == 0:
                    self._stats.prompt_tokens += seq.num_prompt_tokens
        return out

    def _postprocess(
        self, worker: PolicyWorker, batch: ScheduledBatch, out: SampleOutput
    ) -> list[Delta]:
        """Append the sampled tokens and turn each row into its candidate's delta."""
        results = worker.scheduler.postprocess(
            batch, out.token_ids, time.perf_counter(), worker.policy.tokenizer.stop_ids
        )
        deltas = []
        for row, (seq, is_output) in enumerate(results):
            lp = None
            if seq.params.logprobs and is_output:
                lp = TokenLogprob(
                    out.token_ids[row], out.logprobs[row] or 0.0, out.top_logprobs[row] or []
                )
                seq.logprobs.append(lp)
            deltas.append(self._process(worker, seq, is_output, lp))
        return deltas

    def _process(
        self, worker: PolicyWorker, seq: Sequence, is_output: bool, lp: TokenLogprob | None
    ) -> Delta:
        text = self.texts[seq]
        token_ids = [seq.output_ids[-1]] if is_output else []
        if is_output:
            self._stats.generated_tokens += 1
        logprobs = [lp] if lp is not None else ([] if seq.params.logprobs else None)
        by_string = is_output and text.push(seq.output_ids[-1])
        if by_string:
            seq.finish_reason = FinishReason.STOP
        if seq.finish_reason is None:
            return Delta(
                seq.request_id,
                seq.index,
                token_ids,
                text.take(False),
                logprobs,
                None,
                seq.policy_version,
            )
        reason = seq.finish_reason
        worker.scheduler.finish(seq, reason)
        self._stats.requests_finished += 1
        delta = self._final(seq, reason, token_ids, logprobs, by_string)
        self._forget_done(seq.request_id)
        return delta

    def _final(
        self,
        seq: Sequence,
        reason: FinishReason,
        token_ids: list[int],
        logprobs: list[TokenLogprob] | None,
        by_string: bool,
    ) -> Delta:
        text = self.texts.pop(seq)
        text.finish(stopped_by_string=by_string)
        metrics = metrics_of(seq)
        self._stats.recent.append(metrics)
        return Delta(
            seq.request_id,
            seq.index,
            token_ids,
            text.take(True),
            logprobs,
            reason,
            seq.policy_version,
            metrics,
        )

    def _forget_done(self, request_id: str) -> None:
        seqs = self.requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[request_id]

    def _drop_drained_workers(self) -> None:
        for version, worker in list(self.workers.items()):
            if worker is self.current or version in self.beside:
                continue
            if not len(worker.scheduler):
                self._retired.queries += worker.blocks.stats.queries
                self._retired.hits += worker.blocks.stats.hits
                self._retired.preemptions += worker.scheduler.num_preemptions
                del self.workers[version]
                log.info("policy %s drained and unloaded", version)

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._stats
        s.running = sum(len(w.scheduler.running) for w in self.workers.values())
        s.waiting = self.num_waiting
        s.kv_blocks_used = sum(w.blocks.num_used for w in self.workers.values())
        s.kv_blocks_total = sum(w.blocks.num_blocks for w in self.workers.values())
        workers, retired = self.workers.values(), self._retired
        s.prefix_cache_queries = retired.queries + sum(w.blocks.stats.queries for w in workers)
        s.prefix_cache_hits = retired.hits + sum(w.blocks.stats.hits for w in workers)
        s.preemptions = retired.preemptions + sum(w.scheduler.num_preemptions for w in workers)
        s.policy_versions = list(self.workers)
        s.decode_threads = self.threads.timed_choices() if self.threads is not None else {}
        return s.snapshot()

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[list[Delta]]:
        """Run prompts to completion (offline use, tests), batched together; ``params`` is one
        for all or one per prompt. Returns each request's final deltas, one per candidate,
        merged (all token ids, whole text, all logprobs)."""
        each: list[SamplingParams | None]
        if params is None or isinstance(params, SamplingParams):
            each = [params] * len(prompts)
        else:
            each = list(params)
        if len(each) != len(prompts):
            raise ValueError(f"{len(each)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, q) for p, q in zip(prompts, each, strict=True)]
        merged: dict[tuple[str, int], Delta] = {}
        try:
            while self.has_work():
                for d in self.step():
                    key = (d.request_id, d.index)
                    if key not in merged:
                        merged[key] = d
                        continue
                    m = merged[key]
                    m.token_ids += d.token_ids
                    m.text += d.text
                    if m.logprobs is not None and d.logprobs:
                        m.logprobs += d.logprobs
                    m.finish_reason, m.metrics = d.finish_reason, d.metrics
        finally:
            if self.threads is not None:
                self.threads.restore()  # the caller's thread setting, as it was
        return [
            sorted((d for k, d in merged.items() if k[0] == rid), key=lambda d: d.index)
            for rid in ids
        ]
