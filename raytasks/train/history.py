"""A training run's history on the driver and in its folder: ``history.json`` / ``history.csv`` (written by
the rank-0 worker after every epoch, read back to resume), the epoch lines the driver prints while Ray Train
runs (:class:`Progress`), and the PNG of the curves.

Split from raytasks/train/job.py (the worker loop and the driver).
"""

from __future__ import annotations

import io
import json

import pandas as pd

import storage
from core import engine
from models.base import Recipe

HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"


def write_history(run_uri: str, history: list[dict], attempts: list[dict], header: dict) -> None:
    doc = dict(header, attempts=attempts, epochs=history)
    storage.write_bytes(storage.join(run_uri, HISTORY_JSON), json.dumps(doc, indent=1).encode())
    rows = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history]
    storage.write_bytes(storage.join(run_uri, HISTORY_CSV), pd.DataFrame(rows).to_csv(index=False).encode())


def read_history(run_uri: str) -> dict | None:
    uri = storage.join(run_uri, HISTORY_JSON)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


class Progress:
    """Prints the epoch lines on the driver: a thread that follows ``history.json`` in the run folder (the
    workers' own output stays in the Ray logs, so the driver's output ends with the checkpoint URI)."""

    def __init__(self, run_uri: str, model, recipe: Recipe, log_fn, after_epoch: int = 0, every_s: float = 1.0):
        import threading

        self.run_uri, self.model, self.recipe, self.log_fn = run_uri, model, recipe, log_fn
        self.last_epoch, self.every_s = after_epoch, every_s
        self.seen_attempts = 0
        self.first_attempt = 1  # the attempt this trainer starts: rows of earlier ones are not its epochs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)

    def start(self) -> None:
        doc = self._read()
        # attempts before this trainer plus the one it is about to start: more than that are restarts
        self.seen_attempts = self.first_attempt = (len(doc["attempts"]) if doc else 0) + 1
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def _read(self) -> dict | None:
        try:
            return read_history(self.run_uri)
        except (OSError, ValueError):  # a half-written file on some stores: read it next time
            return None

    def poll(self) -> None:
        doc = self._read()
        if not doc:
            return
        for a in doc["attempts"][self.seen_attempts:]:
            self.log_fn(f"a worker failed: the worker group restarted from the checkpoint of epoch "
                        f"{a['start_epoch'] - 1}")
        self.seen_attempts = max(self.seen_attempts, len(doc["attempts"]))
        metric = doc.get("primary_metric") or self.model.primary_metric  # what picks the best epoch (the worker's)
        for row in doc["epochs"]:
            # a row of an earlier attempt after the epoch this trainer resumes from was written but its checkpoint
            # never committed (raytasks/train/resume.py): this trainer trains that epoch again and writes it anew
            if row["epoch"] > self.last_epoch and row.get("attempt", self.first_attempt) >= self.first_attempt:
                self.log_fn(engine.format_epoch(self.model, row, self.recipe.epochs, row.get("eta_s"), metric=metric))
                if row.get("stopped"):
                    self.log_fn(f"early stopping after epoch {int(row['epoch'])}: no improvement of "
                                f"{metric} for {self.recipe.early_stopping_patience} epochs")
                self.last_epoch = row["epoch"]


def plot_curves(doc: dict) -> bytes:
    """PNG of the losses (train and validation) and the primary metric per epoch."""
    from matplotlib.figure import Figure  # no pyplot: never switches the caller's backend (notebooks)

    h = pd.DataFrame([{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in doc["epochs"]])
    primary = doc.get("primary_metric", "val_loss")
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for col, label in (("train_loss", "train"), ("val_loss", "validation")):
        if col in h:
            axes[0].plot(h["epoch"], h[col], marker="o", label=label)
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0].legend()
    if primary in h:
        axes[1].plot(h["epoch"], h[primary], marker="o", color="tab:green")
    axes[1].set(xlabel="epoch", ylabel=primary, title=f"validation {primary}")
    fig.suptitle(f"{doc.get('model', '')} · {doc.get('run', '')}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
