"""Evaluation passes of a run: every sample of a split once, metrics counted on the devices.

Each split keeps one long-lived stream, so its loader workers start once per run rather than
once per validation. The device-side accumulators here serve the train epochs too: counts stay
on the devices during a pass and are fetched once at its end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax

from dermjax import parallel
from dermjax.data import pipeline
from dermjax.tracking import Progress
from dermjax.train.metrics import ClassificationMetrics, accumulate, host_metrics, totals_of
from dermjax.train.step import make_eval_step

if TYPE_CHECKING:
    from dermjax.experiment import Components


def device_totals(
    num_classes: int, mesh: jax.sharding.Mesh, start: ClassificationMetrics | None = None
) -> dict[str, jax.Array]:
    """A replicated device-side metrics accumulator, from `start`'s counts or zeros."""
    return parallel.replicate(totals_of(start or ClassificationMetrics(num_classes)), mesh)


def fetch_totals(num_classes: int, totals: dict[str, jax.Array]) -> ClassificationMetrics:
    """The accumulated counts on the host (the one transfer of a pass)."""
    return host_metrics(num_classes, jax.tree.map(parallel.to_host, totals))


def shown_samples(batch: dict) -> int:
    """Valid samples of a host batch for the progress display: this process's part, scaled to
    the global batch (the metrics count them exactly on the devices)."""
    return int(batch["valid"].sum()) * jax.process_count()


class Evaluator:
    """Runs the eval steps (multimodal and vision-only, each compiled on first use) over splits."""

    def __init__(self, c: Components, *, show_progress: bool):
        self.c, self.show_progress = c, show_progress
        self.num_classes = len(c.data.classes)
        self.steps = {vo: make_eval_step(c.parts, c.spec, vision_only=vo) for vo in (False, True)}
        self.streams: dict[str, pipeline.EvalStream] = {}

    def evaluate(
        self,
        state: Any,
        records: pipeline.Records,
        split: str,
        controls: dict[str, jax.Array],
        *,
        vision_only: bool = False,
    ) -> dict[str, Any]:
        """One pass of `state` over `records`; metrics over the readable samples.

        `controls` are the epoch's aux weights and masks; `vision_only` picks the pre-training
        path. Adds `bad_images` (samples skipped as unreadable) and `majority_accuracy` (the
        train split's majority class on the same samples the metrics count).
        """
        eval_step, stream = self.steps[vision_only], self._stream(records, split)
        totals = device_totals(self.num_classes, self.c.mesh)
        progress = Progress(len(records.labels), desc=split, enabled=self.show_progress)
        batches = stream.next_pass()
        try:
            for batch in batches:
                shown = shown_samples(batch)
                out = eval_step(state, parallel.shard_batch(batch, self.c.mesh), controls)
                previous, totals = totals, accumulate(totals, out)
                # Wait for the step before (no transfer): at most two batches on the devices.
                jax.block_until_ready(previous)
                progress.update(shown)
        finally:
            batches.close()
        progress.close()
        metrics = fetch_totals(self.num_classes, totals)
        result = metrics.compute()
        support = metrics.matrix.sum(axis=1)
        result["bad_images"] = stream.bad_images
        result["majority_accuracy"] = float(
            support[self.c.data.majority_class] / max(1, support.sum())
        )
        return result

    def _stream(self, records: pipeline.Records, split: str) -> pipeline.EvalStream:
        """The split's long-lived eval stream, replaced when the split's records change."""
        stream = self.streams.get(split)
        if stream is None or stream.records is not records:
            if stream is not None:
                stream.close()
            stream = pipeline.EvalStream(self.c.eval_loader(records, split, repeat=True), records)
            self.streams[split] = stream
        return stream

    def close(self) -> None:
        """Stops every split's loader workers."""
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()
