"""Per-queue metrics stay bounded whatever queue names clients use."""

from __future__ import annotations

from eventbus.ops.metrics import MAX_QUEUE_LABELS, OTHER_QUEUES, Metrics, label_values


def test_queues_past_the_label_limit_count_together() -> None:
    metrics = Metrics("n")
    for i in range(MAX_QUEUE_LABELS + 500):
        metrics.published.labels(f"q{i}").inc()
    metrics.delivered.labels("q0").inc()  # a queue seen before keeps its own label
    published = label_values(metrics.published)
    assert len(published) == MAX_QUEUE_LABELS + 1
    assert published[OTHER_QUEUES] == 500
    assert published["q0"] == 1 and label_values(metrics.delivered) == {"q0": 1}
