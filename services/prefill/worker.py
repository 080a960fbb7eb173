"""The prefill worker actor: pulls prefill jobs from the JetStream work queue and computes them.

A job is acked only after its result is announced, so a worker that dies mid-job leaves it
un-acked and JetStream redelivers it to another worker after the ack wait. A job that names a KV
endpoint is prefilled with its blocks held (``Engine.prefill_and_hold``), the blocks the decode
worker reserved are written straight into its pool over the KV transport, and only then are the
held blocks given back and PrefillDone (with the first token) announced. Whatever goes wrong in a
job (engine error, decode worker gone, transfer broken) becomes a PrefillFailed, never a crashed
worker, and the held blocks are always given back.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import anyio
import anyio.abc
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from shared import subjects, tracing
from shared.discovery import WorkerView
from shared.engines import Engine
from shared.kv_transport import TransferError
from shared.messages import PrefillDone, PrefillFailed, PrefillJob, SamplingParams, prefill_job_decoder
from shared.streams import PREFILL_ACK_WAIT_S, PrefillJobs, ensure_prefill_queue
from shared.telemetry import bind_request
from shared.worker_host import WorkerHost, WorkerSettings

log = logging.getLogger("baton.prefill")

JOBS = Counter("baton_prefill_jobs_total", "Prefill jobs by outcome", ["outcome"])
JOB_SECONDS = Histogram("baton_prefill_job_seconds", "Time to compute one prefill job",
                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30))
JOBS_RUNNING = Gauge("baton_prefill_jobs_running", "Prefill jobs being computed or sent")
KV_USED = Gauge("baton_prefill_kv_blocks_used", "KV blocks in use on this prefill worker (held ones included)")
KV_TOTAL = Gauge("baton_prefill_kv_blocks_total", "KV blocks in this prefill worker's pool")
SENDS_IN_FLIGHT = Gauge("baton_prefill_kv_sends_in_flight", "KV transfers under way to decode workers")
SENT_BLOCKS = Counter("baton_prefill_kv_blocks_sent_total", "KV blocks written into decode workers' pools")


@dataclass
class PrefillSettings(WorkerSettings):
    max_concurrent_jobs: int = 8


class PrefillWorker(WorkerHost):
    """Pulls its work: the job loop is :meth:`work`; a drain lets it finish the jobs it holds."""

    role = "prefill"
    publishes_load = False  # the planner reads the prefill queue, not prefill workers' load
    settings: PrefillSettings

    def __init__(self, settings: PrefillSettings, engine: Engine | None = None) -> None:
        super().__init__(settings, engine)
        self.jobs_done = 0
        self.view: WorkerView | None = None

    def wants_transport(self) -> bool:
        # Sending only: the listener is unused, but start() keeps one code path.
        return self.engine.supports_remote_prefill

    async def prepare(self) -> None:
        assert self.bus is not None
        await ensure_prefill_queue(self.bus)

    async def serve(self, tg: anyio.abc.TaskGroup) -> None:
        assert self.bus is not None
        self.view = WorkerView(self.bus, self.settings.discovery_ttl)
        tg.start_soon(self.view.run)
        tg.start_soon(self._update_gauges)

    async def work(self) -> None:
        assert self._tg is not None
        await self._pull_jobs(self._tg)

    async def drain(self) -> None:
        # Deregister and stop fetching; work() returns once the jobs in hand are done.
        self._draining = True
        if self.registration is not None:
            await self.registration.withdraw()
        await anyio.sleep_forever()

    async def _pull_jobs(self, tg: anyio.abc.TaskGroup) -> None:
        assert self.bus is not None
        jobs = await PrefillJobs.subscribe(self.bus)
        limit = anyio.Semaphore(self.settings.max_concurrent_jobs)
        while not self._draining:
            free = limit.value
            if free == 0:
                await limit.acquire()  # wait for a slot before asking for more work
                limit.release()
                continue
            try:
                msgs = await jobs.fetch(batch=free, timeout=1.0)  # [] if nothing queued this second
            except Exception as e:  # NATS away: back off and ask again
                log.warning("fetch failed: %r", e)
                await anyio.sleep(0.5)
                continue
            for m in msgs:
                await limit.acquire()
                tg.start_soon(self._job, m, limit)
        # Draining: let running jobs finish; unfetched ones stay in the queue for others.
        if self.in_flight:
            await self._idle.wait()

    async def _update_gauges(self) -> None:
        while True:
            st = self.engine.stats()
            KV_USED.set(st.kv_blocks_used)
            KV_TOTAL.set(st.kv_blocks_total)
            JOBS_RUNNING.set(self.in_flight)
            await anyio.sleep(0.5)

    async def _job(self, msg: Msg, limit: anyio.Semaphore) -> None:
        assert self.bus is not None
        self.begin()
        try:
            await self._handle(msg)
        except Exception:  # NATS away mid-announce, say: the job is redelivered, the worker lives on
            log.exception("prefill job failed unannounced")
        finally:
            self.end()
            limit.release()

    async def _handle(self, msg: Msg) -> None:
        assert self.bus is not None
        try:
            job = prefill_job_decoder.decode(msg.data)
        except Exception as e:
            log.warning("dropping undecodable prefill job: %r", e)
            await msg.term()
            return
        # This job's log lines (here and in the engine/transfer code it calls) carry the request id.
        bind_request(job.request_id, tracing.trace_id_from_headers(msg.headers))
        if job.deadline and time.time() > job.deadline:
            JOBS.labels("expired").inc()
            await self._announce(job, PrefillFailed(request_id=job.request_id, prefill_worker_id=self.worker_id,
                                                    reason="deadline passed before prefill started"))
            await msg.ack()
            return
        span = tracing.start("prefill", tracing.SpanKind.CONSUMER, tracing.context_from(msg.headers), **{
            "baton.request_id": job.request_id, "baton.worker_id": self.worker_id,
            "gen_ai.usage.input_tokens": len(job.token_ids)})
        if span is not None:
            bind_request(job.request_id, tracing.trace_id_of(span))
        log.debug("prefill job: %d prompt tokens%s", len(job.token_ids),
                  f", KV to {job.kv_endpoint}" if job.kv_endpoint else "")
        t0 = time.perf_counter()
        try:
            done = await self._compute(job, msg)
        except Exception as e:  # an engine bug fails this job, not the worker
            log.exception("prefill of %s failed", job.request_id)
            done = self._failed(job, f"prefill failed: {e!r}")
        finally:
            tracing.end(span)
        JOB_SECONDS.observe(time.perf_counter() - t0)
        JOBS.labels("done" if isinstance(done, PrefillDone) else "failed").inc()
        if isinstance(done, PrefillFailed):
            log.info("prefill job %s failed: %s", job.request_id, done.reason)
        else:
            log.debug("prefill job done in %.1f ms", (time.perf_counter() - t0) * 1e3)
        await self._announce(job, done)
        await msg.ack()  # only now: a crash before this line means redelivery
        self.jobs_done += 1

    def _failed(self, job: PrefillJob, reason: str) -> PrefillFailed:
        return PrefillFailed(request_id=job.request_id, prefill_worker_id=self.worker_id, reason=reason)

    async def _compute(self, job: PrefillJob, msg: Msg) -> PrefillDone | PrefillFailed:
        """Compute the prompt (and its first token); send its KV blocks if the job asks for them.
        JetStream is told we are alive meanwhile, so a long job is not redelivered."""
        async with anyio.create_task_group() as tg:

            async def keep_alive() -> None:
                while True:
                    await anyio.sleep(PREFILL_ACK_WAIT_S / 3)
                    try:
                        await msg.in_progress()
                    except Exception as e:  # NATS away for a moment: try again next time
                        log.debug("in-progress ack failed: %r", e)

            tg.start_soon(keep_alive)
            try:
                if job.kv_endpoint:
                    return await self._compute_and_send(job)
                return await self._compute_only(job)
            finally:
                tg.cancel_scope.cancel()

    async def _compute_only(self, job: PrefillJob) -> PrefillDone | PrefillFailed:
        rid = f"{job.request_id}:prefill:{uuid.uuid4().hex[:6]}"
        cached, first = 0, -1
        sampling = SamplingParams(max_tokens=1, temperature=job.sampling.temperature, top_p=job.sampling.top_p,
                                  top_k=job.sampling.top_k, seed=job.sampling.seed, ignore_eos=True)
        async for out in self.engine.generate(rid, job.token_ids, sampling):
            if out.error:
                return self._failed(job, out.error)
            cached = max(cached, out.num_cached_tokens)
            if out.token_ids:
                first = out.token_ids[0]
        return PrefillDone(request_id=job.request_id, prefill_worker_id=self.worker_id, num_tokens=len(job.token_ids),
                           cached_tokens=cached, first_token=first)

    async def _compute_and_send(self, job: PrefillJob) -> PrefillDone | PrefillFailed:
        if not self.engine.supports_remote_prefill or self.transport is None:
            return self._failed(job, f"the {self.engine.name} engine cannot export KV blocks")
        if job.kv_layout != self.engine.kv_layout():
            return self._failed(job, f"KV layout mismatch: decode has {job.kv_layout!r}, "
                                     f"this worker {self.engine.kv_layout()!r}")
        if self._decode_gone(job):
            # Its decode worker is gone from discovery: nobody will read the blocks. Fail fast.
            return self._failed(job, f"decode worker {job.decode_worker_id} is gone")
        rid = f"{job.request_id}:prefill:{uuid.uuid4().hex[:6]}"
        try:
            block_ids, first, cached = await self.engine.prefill_and_hold(rid, job.token_ids, job.sampling)
        except RuntimeError as e:  # the engine refused or failed the prompt; nothing is held
            return self._failed(job, f"prefill failed: {e}")
        try:
            if len(job.block_ids) > len(block_ids):
                return self._failed(job, f"{len(job.block_ids)} blocks reserved for a {len(block_ids)}-block prompt")
            send = block_ids[len(block_ids) - len(job.block_ids):] if job.block_ids else []
            if send:
                if self._decode_gone(job):  # it left while we computed: do not wait on a dead peer
                    return self._failed(job, f"decode worker {job.decode_worker_id} is gone")
                remaining = job.deadline - time.time() if job.deadline else 30.0
                if remaining <= 0:
                    return self._failed(job, "deadline passed before the KV blocks could be sent")
                with SENDS_IN_FLIGHT.track_inprogress():
                    await self.transport.send(job.kv_endpoint, job.request_id, self.engine.kv_views(send),
                                              timeout=remaining, token=job.kv_token)
                SENT_BLOCKS.inc(len(send))
        except TransferError as e:
            return self._failed(job, f"KV transfer failed: {e}")
        finally:
            self.engine.release_held(rid)  # sent or not, the blocks go back (to the prefix cache)
        return PrefillDone(request_id=job.request_id, prefill_worker_id=self.worker_id, num_tokens=len(job.token_ids),
                           cached_tokens=cached, blocks_written=len(send), first_token=first)

    def _decode_gone(self, job: PrefillJob) -> bool:
        return bool(job.decode_worker_id) and self.view is not None and self.view.get(job.decode_worker_id) is None

    async def _announce(self, job: PrefillJob, result: PrefillDone | PrefillFailed) -> None:
        assert self.bus is not None
        with anyio.fail_after(5):
            await self.bus.publish(job.notify_subject or subjects.prefill_done(job.request_id), result)
