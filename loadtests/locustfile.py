"""Locust load test for sinch-gateway: send requests in through Kafka, results out,
signed Sinch callbacks in through the webhook.

``KafkaSendUser`` publishes send-request envelopes to the requests topic, all of
them together at ``--send-rate`` per second (each user paces itself against a
fixed timeline, so a slow tick is caught up). Each request is reported twice:

- ``kafka`` / ``produce``: the broker's acknowledgement (librdkafka's own latency).
- ``e2e`` / ``result``: from publishing to reading the request's record back from
  the results topic, correlated by ``request_id``. A status other than ``sent``
  is a failure, and so is a request with no result within ``--result-timeout``.

``WebhookUser`` posts delivery reports and inbound messages to
``POST /webhooks/sinch`` at ``--webhook-rate`` per second, signed like Sinch
(base64 HMAC-SHA256 of ``body.nonce.timestamp``); anything but 200 is a failure.

Run it against the compose stack (deploy/docker-compose.yml)::

    locust -f loadtests/locustfile.py --headless -u 5 -r 5 -t 60s \\
        --host http://127.0.0.1:8080 --kafka-bootstrap 127.0.0.1:9094

or against a throwaway stack on loopback with ``python loadtests/run.py``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import time
import uuid
from typing import Any

import gevent
import gevent.event
import payloads
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from locust import HttpUser, User, events, task
from locust.env import Environment
from locust.runners import MasterRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

log = logging.getLogger("loadtest")


class ResultError(Exception):
    """A request's result said it was not sent, or it never came."""


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("sinch-gateway")
    group.add_argument(
        "--kafka-bootstrap",
        default="127.0.0.1:9094",
        help="Kafka bootstrap servers (the compose stack's host listener)",
    )
    group.add_argument("--requests-topic", default="sinch.outbound.requests")
    group.add_argument("--results-topic", default="sinch.outbound.results")
    group.add_argument(
        "--send-rate",
        type=float,
        default=100.0,
        help="send requests per second, all KafkaSendUsers together",
    )
    group.add_argument("--send-users", type=int, default=4, help="number of KafkaSendUsers")
    group.add_argument(
        "--apps", type=int, default=10, help="spread requests round-robin over this many app ids"
    )
    group.add_argument(
        "--webhook-rate",
        type=float,
        default=10.0,
        help="callbacks per second, all WebhookUsers together",
    )
    group.add_argument("--webhook-users", type=int, default=1, help="number of WebhookUsers")
    group.add_argument(
        "--webhook-secret",
        default="demo-webhook-secret",
        help="the gateway's GATEWAY_WEBHOOK_SECRET",
    )
    group.add_argument(
        "--result-timeout",
        type=float,
        default=30.0,
        help="seconds after the run to wait for outstanding results",
    )


def options(environment: Environment) -> argparse.Namespace:
    if environment.parsed_options is None:
        raise RuntimeError("run this locustfile with the locust command (options are needed)")
    return environment.parsed_options


@events.init.add_listener
def _user_counts(environment: Environment, **_: Any) -> None:
    if environment.parsed_options is not None:
        KafkaSendUser.fixed_count = environment.parsed_options.send_users
        WebhookUser.fixed_count = environment.parsed_options.webhook_users


class ResultTracker:
    """Publishes requests and reads their results back; fires Locust request events.

    Locust events are fired only from greenlets. The blocking librdkafka calls (poll,
    flush) run in gevent's native thread pool, so delivery callbacks run there and
    only queue what they saw, with the time they saw it.
    """

    def __init__(self, environment: Environment) -> None:
        opts = options(environment)
        self._env = environment
        self._requests_topic: str = opts.requests_topic
        self._results_topic: str = opts.results_topic
        self._apps = itertools.cycle(payloads.app_ids(opts.apps))
        self.pending: dict[str, float] = {}
        self._acks: collections.deque[tuple[str, int, KafkaError | None, float]] = (
            collections.deque()
        )
        self._stopping = False
        self._closed = False
        self._drained = gevent.event.Event()
        self._loop: gevent.Greenlet | None = None
        self._acker: gevent.Greenlet | None = None
        self._producer = Producer(
            {
                "bootstrap.servers": opts.kafka_bootstrap,
                "client.id": "sinch-loadtest",
                "acks": "all",
                "linger.ms": 1,
                "socket.nagle.disable": True,
            }
        )
        self._consumer = Consumer(
            {
                "bootstrap.servers": opts.kafka_bootstrap,
                "client.id": "sinch-loadtest",
                "group.id": f"sinch-loadtest-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
                "socket.nagle.disable": True,
            }
        )

    def connect(self) -> None:
        """Read the results topic from its current end, before anything is published.

        Blocking calls: made at Locust's init, before the run-time clock starts.
        """
        metadata = self._consumer.list_topics(self._results_topic, timeout=15)
        topic = metadata.topics.get(self._results_topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(f"results topic {self._results_topic!r} not found")
        assignment = []
        for partition in topic.partitions:
            tp = TopicPartition(self._results_topic, partition)
            _, high = self._consumer.get_watermark_offsets(tp, timeout=15)
            assignment.append(TopicPartition(self._results_topic, partition, high))
        self._consumer.assign(assignment)

    def resume(self) -> None:
        """At each test start: serve delivery reports and read results."""
        self._stopping = self._closed = False
        self._drained.clear()
        self._loop = gevent.spawn(self._consume_loop)
        self._acker = gevent.spawn(self._ack_loop)

    def publish(self) -> None:
        app_id = next(self._apps)
        request_id, key, value = payloads.send_request(app_id)
        started = time.perf_counter()
        self.pending[request_id] = started
        size = len(value)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            # In the polling thread, as soon as the broker answered.
            self._acks.append((request_id, size, err, time.perf_counter() - started))

        try:
            self._producer.produce(self._requests_topic, value, key, on_delivery=delivered)
        except (BufferError, KafkaException) as exc:
            self.pending.pop(request_id, None)
            self._fire("kafka", "produce", 0.0, size, exc)

    def _fire(
        self, kind: str, name: str, seconds: float, size: int, exc: BaseException | None = None
    ) -> None:
        self._env.events.request.fire(
            request_type=kind,
            name=name,
            response_time=seconds * 1000.0,
            response_length=size,
            exception=exc,
            context={},
        )

    def _report_acks(self) -> None:
        while self._acks:
            request_id, size, err, latency = self._acks.popleft()
            if err is not None:
                self.pending.pop(request_id, None)
                self._fire("kafka", "produce", latency, size, KafkaException(err))
            else:
                self._fire("kafka", "produce", latency, size)

    def _ack_loop(self) -> None:
        """Serve delivery callbacks from a native thread, so each is timed when it lands."""
        pool = gevent.get_hub().threadpool
        while not self._closed:
            pool.apply(self._producer.poll, (0.1,))
            self._report_acks()

    def _fetch(self) -> tuple[float, list[Message]]:
        """Runs in a native thread: block for the first record, then take what is there."""
        first = self._consumer.poll(0.1)
        arrived = time.perf_counter()
        if first is None:
            return arrived, []
        return arrived, [first, *self._consumer.consume(1000, 0)]

    def _consume_loop(self) -> None:
        pool = gevent.get_hub().threadpool
        while not self._closed:
            arrived, messages = pool.apply(self._fetch)
            for msg in messages:
                if msg.error() is not None:
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("results consumer: %s", msg.error())
                    continue
                value = msg.value() or b""
                request_id, status, error = payloads.result_outcome(value)
                started = self.pending.pop(request_id or "", None)
                if started is None:
                    continue  # a result for somebody else's request
                failure = None if status == "sent" else ResultError(f"{status}: {error}")
                self._fire("e2e", "result", arrived - started, len(value), failure)
            self._report_acks()
            if self._stopping and not self.pending:
                self._drained.set()
                return

    def drain(self, timeout_s: float) -> None:
        """After the users stopped: wait for outstanding acks and results, then report."""
        self._stopping = True
        pool = gevent.get_hub().threadpool
        pool.apply(self._producer.flush, (timeout_s,))
        self._report_acks()
        if self._loop is not None and not self.pending:
            self._drained.set()
        self._drained.wait(timeout_s)
        self._closed = True
        for loop in (self._loop, self._acker):
            if loop is not None:
                loop.join()  # returns after its current fetch or poll (0.1 s at most)
        self._report_acks()
        for _ in range(len(self.pending)):
            _, started = self.pending.popitem()
            waited = time.perf_counter() - started
            self._fire("e2e", "result", waited, 0, ResultError(f"no result in {timeout_s:g} s"))
        # Locust's CSV writer rewrites its files once per CSV_STATS_INTERVAL_SEC and has no
        # final pass before it closes them: give it one after the last event.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)

    def close(self) -> None:
        self._consumer.close()
        self._producer.flush(0)


class _Holder:
    tracker: ResultTracker | None = None
    error: str | None = None


@events.init.add_listener
def _connect(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner) or environment.parsed_options is None:
        return
    try:
        tracker = ResultTracker(environment)
        tracker.connect()
    except (RuntimeError, KafkaException) as exc:
        _Holder.error = str(exc)
        return
    _Holder.tracker = tracker


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    if _Holder.error is not None:
        log.error("cannot start: %s", _Holder.error)
        environment.process_exit_code = 2
        if environment.runner is not None:
            gevent.spawn(environment.runner.quit)
    elif _Holder.tracker is not None:
        _Holder.tracker.resume()


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    if _Holder.tracker is not None:
        _Holder.tracker.drain(options(environment).result_timeout)


@events.quitting.add_listener
def _close(environment: Environment, **_: Any) -> None:
    tracker, _Holder.tracker = _Holder.tracker, None
    if tracker is not None:
        tracker.close()


class _Paced:
    """Task pacing against a fixed timeline: ``rate`` task runs per second, no drift."""

    _interval = 1.0
    _due = 0.0

    def pace(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._due = time.perf_counter()

    def wait_time(self) -> float:
        self._due += self._interval
        return max(0.0, self._due - time.perf_counter())


class KafkaSendUser(_Paced, User):
    """Publishes send requests to Kafka; results are read back by the ResultTracker."""

    fixed_count = 4

    def on_start(self) -> None:
        opts = options(self.environment)
        self.pace(opts.send_rate / opts.send_users)

    @task
    def send(self) -> None:
        tracker = _Holder.tracker
        if tracker is None:
            raise RuntimeError("the result tracker did not start")
        tracker.publish()


class WebhookUser(_Paced, HttpUser):
    """Posts signed Sinch callbacks to the gateway's webhook (host: --host)."""

    fixed_count = 1

    def on_start(self) -> None:
        opts = options(self.environment)
        self.pace(opts.webhook_rate / opts.webhook_users)
        self._secret: str = opts.webhook_secret
        self._apps = itertools.cycle(payloads.app_ids(opts.apps))

    def _post(self, body: bytes, name: str) -> None:
        headers = payloads.signed_headers(self._secret, body)
        with self.client.post(
            "/webhooks/sinch",
            data=body,
            headers=headers,
            name=f"/webhooks/sinch {name}",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")

    @task(4)
    def delivery_report(self) -> None:
        self._post(payloads.delivery_report(next(self._apps)), "delivery report")

    @task(1)
    def inbound_message(self) -> None:
        self._post(payloads.inbound_message(next(self._apps)), "inbound message")
