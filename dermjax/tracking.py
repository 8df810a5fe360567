"""Run tracking: `metrics.jsonl` and `summary.json` in the workdir, optional wandb, console progress.

The JSONL file is the source of truth (one JSON object per `log` call); wandb mirrors it when a
project is configured, as the original did with `wandb.init(project, name, config)`. One
experiment is one wandb run: its id is generated on the first start, stored in every checkpoint's
meta (`wandb_run_id`) and passed back on resume, so a resumed run continues the same wandb run
(`resume="allow"`) instead of opening a duplicate, and steps already logged are not sent again
(the JSONL records after the checkpoint are dropped, see `_start_lines`). wandb is imported lazily and is optional: if it is missing or fails to start, one warning is issued and the
run continues with JSONL only. Workdirs may be fsspec URLs (e.g. ``gs://``); there, the JSONL file
is rewritten whole on each `log`, which is cheap at one line per epoch event.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import fsspec
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


def to_jsonable(value: Any) -> Any:
    """Converts numpy/jax scalars and arrays, tuples and mappings to JSON types; NaN/inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(value.to_dict())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy or jax array / scalar
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _kept(records: Sequence[Mapping[str, Any]], step: int) -> list[str]:
    """The lines a run resumed at global step `step` keeps: epoch records up to it."""
    return [
        json.dumps(r)
        for r in records
        if r.get("step", 0) <= step and r.get("event") in ("epoch", "val/confusion_matrix")
    ]


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Tracker:
    """Writes run events to `workdir/metrics.jsonl` and, with `wandb_project`, to wandb.

    `enabled=False` makes every method a no-op (for non-primary hosts in multi-host runs).
    """

    def __init__(
        self,
        workdir: str,
        *,
        experiment_name: str,
        config_dict: Mapping[str, Any],
        wandb_project: str | None = None,
        wandb_dir: str | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
        wandb_run_id: str | None = None,
    ):
        self.workdir = str(workdir).rstrip("/")
        self.experiment_name = experiment_name
        self.enabled = enabled
        self.start_time = time.time()
        self.metrics_path = f"{self.workdir}/metrics.jsonl"
        self._remote_lines: list[str] | None = None
        self._run: Any = None
        self._wandb_failed = False
        self._last_step = 0
        # Generated here, not by wandb, so that the checkpoint meta can carry it.
        self.wandb_run_id = (
            (wandb_run_id or uuid.uuid4().hex[:12]) if wandb_project and enabled else None
        )
        if not enabled:
            return
        fs, root = fsspec.core.url_to_fs(self.workdir)
        fs.makedirs(root, exist_ok=True)
        self._last_step = resume_step or 0
        lines = self._start_lines(fs, f"{root}/metrics.jsonl", resume_step)
        if _is_remote(self.workdir):
            self._remote_lines = lines
        elif lines is not None:
            with fsspec.open(self.metrics_path, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
        if wandb_project:
            if wandb_dir is None:  # always explicit: wandb keeps the first run's settings
                local = None if _is_remote(self.workdir) else self.workdir
                wandb_dir = os.environ.get("WANDB_DIR") or local
            self._start_wandb(wandb_project, wandb_dir, to_jsonable(config_dict))

    def _start_lines(self, fs: Any, path: str, resume_step: int | None) -> list[str] | None:
        """The lines a (resumed) run continues from; a fresh run moves an old file aside.

        Resuming at global step S keeps the epoch records up to S and drops later ones (written
        after the checkpoint the run resumes from) and any final evaluation, so no record is
        repeated. A new run never appends to another run's records.
        """
        if not fs.exists(path):
            return [] if _is_remote(self.workdir) else None
        if resume_step is None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            fs.mv(path, f"{path}.{stamp}")
            log.warning(
                "%s of an earlier run that saved no checkpoint moved to metrics.jsonl.%s",
                self.metrics_path,
                stamp,
            )
            return []
        records = []
        with fs.open(path, "r") as f:
            for line in f.read().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short when the run was killed
                    log.warning("%s: dropped an unreadable line", self.metrics_path)
        return _kept(records, resume_step)

    def rewind(self, step: int) -> None:
        """Drops the records after global step `step`: the resumed run fell back to an older
        checkpoint than the one it started from (a damaged newer copy)."""
        if not self.enabled:
            return
        self._last_step = step
        if self._remote_lines is not None:
            self._remote_lines = _kept([json.loads(x) for x in self._remote_lines], step)
            return
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f.read().splitlines()]
        with open(self.metrics_path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in _kept(records, step))

    def _start_wandb(self, project: str, wandb_dir: str | None, config: Any) -> None:
        try:
            import wandb  # optional dependency, imported only when asked for

            self._run = wandb.init(
                project=project,
                name=self.experiment_name,
                config=config,
                dir=wandb_dir,
                id=self.wandb_run_id,
                resume="allow",
            )
        except Exception as e:  # missing package, bad credentials, no network, ...
            self._wandb_warning(f"wandb could not start ({type(e).__name__}: {e})")

    def _wandb_warning(self, message: str) -> None:
        if not self._wandb_failed:
            log.warning("%s; continuing with metrics.jsonl only", message)
        self._wandb_failed = True
        self._run = None

    def _write_line(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(to_jsonable(record), allow_nan=False)
        if self._remote_lines is None:
            with fsspec.open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        else:
            self._remote_lines.append(line)
            with fsspec.open(self.metrics_path, "w") as f:
                f.write("\n".join(self._remote_lines) + "\n")

    def _record(self, event: str, step: int) -> dict[str, Any]:
        self._last_step = int(step)
        now = time.time()
        return {
            "event": event,
            "step": int(step),
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "elapsed_s": round(now - self.start_time, 3),
        }

    def log(self, event: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends `{"event", "step", "time", "elapsed_s", **metrics}` as one JSONL line.

        `step` is always the global optimisation step (records of an epoch also carry `epoch`).
        wandb receives the scalar metrics at `step`; lists and nested values stay in the JSONL.
        """
        if not self.enabled:
            return
        metrics = to_jsonable(metrics)
        self._write_line({**self._record(event, step), **metrics})
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._wandb_log(scalars, step)

    def _wandb_log(self, data: Mapping[str, Any], step: int) -> None:
        if self._run is None or not data:
            return
        try:
            self._run.log(dict(data), step=int(step))
        except Exception as e:
            self._wandb_warning(f"wandb.log failed ({type(e).__name__}: {e})")

    def log_confusion_matrix(
        self, split: str, matrix: Any, class_names: Sequence[str], *, step: int | None = None
    ) -> None:
        """Logs a confusion matrix (rows true, columns predicted) with its class names.

        JSONL gets the matrix; wandb gets a confusion-matrix chart and per-class recall. Without
        `step`, the last logged step is used, so wandb never sees a step going backwards.
        """
        if not self.enabled:
            return
        step = self._last_step if step is None else step
        matrix = np.asarray(matrix, dtype=np.int64)
        self._write_line(
            {
                **self._record(f"{split}/confusion_matrix", step),
                "class_names": list(class_names),
                "confusion_matrix": matrix.tolist(),
            }
        )
        if self._run is None:
            return
        try:
            import wandb

            rows = [
                [class_names[i], class_names[j], int(matrix[i, j])]
                for i in range(len(class_names))
                for j in range(len(class_names))
            ]
            table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
            fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
            chart = wandb.plot_table(
                "wandb/confusion_matrix/v1", table, fields, {"title": f"{split} confusion matrix"}
            )
            support = matrix.sum(axis=1)
            recall = {
                f"{split}/recall/{name}": float(matrix[i, i] / support[i])
                for i, name in enumerate(class_names)
                if support[i] > 0
            }
            self._wandb_log({f"{split}/confusion_matrix": chart, **recall}, step)
        except Exception as e:
            self._wandb_warning(f"wandb confusion matrix failed ({type(e).__name__}: {e})")

    def summary(self, values: Mapping[str, Any]) -> None:
        """Writes `workdir/summary.json` (overwritten) and mirrors it to the wandb run summary."""
        if not self.enabled:
            return
        values = to_jsonable(values)
        text = json.dumps(values, indent=2, allow_nan=False)
        path = f"{self.workdir}/summary.json"
        if _is_remote(path):  # an object store writes an object whole
            with fsspec.open(path, "w") as f:
                f.write(text)
        else:  # a run killed while writing must not leave half a file
            partial = f"{path}.partial"
            with open(partial, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(partial, path)
        if self._run is not None:
            try:
                self._run.summary.update(values)
            except Exception as e:
                self._wandb_warning(f"wandb summary failed ({type(e).__name__}: {e})")

    def close(self) -> None:
        """Finishes the wandb run, if any (the JSONL file is closed after every write)."""
        if self._run is not None:
            try:
                self._run.finish()
            finally:
                self._run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _format_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Progress of one pass over a split, in images: a tqdm bar on a TTY, else periodic lines.

    Lines are printed every `every_updates` updates (steps) when given, else every `every_s`
    seconds.

    The line format reports throughput measured after the first update, so the compilation of the
    first step does not pollute the rate or the ETA. `unit` names what is counted (img, text).
    """

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        every_s: float = 30.0,
        every_updates: int | None = None,
        unit: str = "img",
        stream: TextIO | None = None,
        enabled: bool = True,
    ):
        self.total, self.desc, self.every_s, self.unit = total, desc, every_s, unit
        self.every_updates = every_updates
        self.updates = 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.count = 0
        self._start = time.perf_counter()
        self._first: tuple[float, int] | None = None
        self._last_print = self._start
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = (
            tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=self.stream)
            if enabled and is_tty
            else None
        )

    def rate(self) -> float | None:
        """Images per second since the first update (None until two updates have happened)."""
        if self._first is None:
            return None
        t0, n0 = self._first
        elapsed = time.perf_counter() - t0
        return (self.count - n0) / elapsed if elapsed > 0 and self.count > n0 else None

    def update(self, n: int, **postfix: float) -> None:
        """Adds `n` processed images; `postfix` values (e.g. loss) are shown next to the rate."""
        self.count += n
        self.updates += 1
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, self.count)
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()})
        elif self.enabled and self._due(now):
            self._last_print = now
            self._print_line(postfix)

    def _due(self, now: float) -> bool:
        if self.every_updates is not None:
            return self.updates % self.every_updates == 0
        return now - self._last_print >= self.every_s

    def _print_line(self, postfix: Mapping[str, float]) -> None:
        rate = self.rate()
        done = f"{self.count}" if self.total is None else f"{self.count}/{self.total}"
        parts = [f"{self.desc}: {done} {self.unit}"]
        parts.append(f"{rate:.1f} {self.unit}/s" if rate else f"-- {self.unit}/s")
        if rate and self.total is not None:
            parts.append(f"ETA {_format_duration((self.total - self.count) / rate)}")
        parts.extend(f"{k}={float(v):.4g}" for k, v in postfix.items())
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        """Ends the bar, or prints a final line with the total time and mean throughput."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            rate = self.rate()
            took = _format_duration(time.perf_counter() - self._start)
            speed = f", {rate:.1f} {self.unit}/s" if rate else ""
            print(f"{self.desc}: done, {self.count} {self.unit} in {took}{speed}", file=self.stream)
