"""Our Prometheus metrics, beside vLLM's on /metrics."""

from __future__ import annotations


class Metrics:
    """Ours, beside vLLM's on /metrics (same Prometheus registry): requests speaking now, seconds of
    audio produced, time to first audio; and the SpeechEngine's queue gauges (`omni_vllm:speech_*`)."""

    def __init__(self, model_name: str):
        from prometheus_client import Counter, Gauge, Histogram

        self.model_name = model_name
        labels = dict(model_name=model_name)
        self.speaking = Gauge(
            "omni_vllm:speaking_requests",
            "Requests producing audio right now.",
            ["model_name"],
            multiprocess_mode="livesum",
        ).labels(**labels)
        self.audio_seconds = Counter(
            "omni_vllm:audio_seconds", "Seconds of audio produced.", ["model_name"]
        ).labels(**labels)
        self.ttfa = Histogram(
            "omni_vllm:time_to_first_audio_seconds",
            "From request arrival to its first audio chunk.",
            ["model_name"],
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 40, 80),
        ).labels(**labels)
        self.queue_time = Histogram(
            "omni_vllm:speech_queue_time_seconds",
            "Time audio requests waited for a speaking slot.",
            ["model_name"],
            buckets=(
                0.01,
                0.1,
                0.3,
                0.5,
                1,
                2,
                5,
                10,
                20,
                30,
                60,
                120,
                240,
                480,
                960,
                1920,
            ),
        ).labels(**labels)

    def attach(self, speech) -> None:
        """Export `speech.stats()` gauges (waiting requests, talker slots, queued Token2Wav windows)."""
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        model_name = self.model_name

        # (metric name, stats key, kind, help) of what `speech.stats()` exports
        exported = (
            (
                "omni_vllm:speech_waiting",
                "waiting",
                GaugeMetricFamily,
                "Audio requests waiting for a speaking slot.",
            ),
            (
                "omni_vllm:speech_talker_slots_used",
                "talker_slots_used",
                GaugeMetricFamily,
                "Talker slots (requests a step batches) in use.",
            ),
            (
                "omni_vllm:speech_queued_windows",
                "queued_windows",
                GaugeMetricFamily,
                "Token2Wav windows ready and waiting to be decoded.",
            ),
            (
                "omni_vllm:talker_kv_usage",
                "talker_kv_usage",
                GaugeMetricFamily,
                "Fraction of the talker's KV block pool in use (1 = full).",
            ),
            (
                "omni_vllm:speech_preemptions",
                "talker_preemptions",
                CounterMetricFamily,
                "Talker requests preempted (blocks freed, resumed by recompute) "
                "because the KV pool was full.",
            ),
            (
                "omni_vllm:speech_runaway",
                "runaway_capped",
                CounterMetricFamily,
                "Replies whose speech the runaway guard cut "
                "(--max-audio-tokens-per-text-token).",
            ),
        )

        class _Collector:
            def collect(self):
                stats = speech.stats()
                for name, key, kind, doc in exported:
                    metric = kind(name, doc, labels=["model_name"])
                    metric.add_metric([model_name], float(stats.get(key) or 0))
                    yield metric

        REGISTRY.register(_Collector())
