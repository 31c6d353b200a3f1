"""The background shard writer: the forward loop hands it batches, a thread writes the files.

    writer = ShardWriter(folder, manifest)
    writer.start()
    writer.begin_shard(rows)                                          # rows the shard will hold
    writer.put_batch({"layers.0": rows}, sample, position, samples)   # (R, d), (R,), (R,)
    writer.end_shard()                                                # after the shard's batches
    writer.close()                                                    # waits, raises errors

Host memory stays bounded: the queue holds at most `max_pending` batches (the producer blocks
when it is full) and the thread holds none once written. The forward loop knows how many rows a
shard will hold before its first forward (it encodes the shard's batches first), so the thread
lays out the safetensors header at once and writes each batch's rows at their final offsets as
they arrive (`SafetensorsStream`): a shard is on disk, bar its last batch, by the time its last
forward ends. The file has a temporary name until it is complete, fsynced and renamed; then its
samples JSONL is written the same way; only then is the shard added to the manifest, itself
replaced atomically. A failure stops the thread, removes the temporary file and is raised in
the producer as `StoreWriteError`; complete shards and the manifest stay readable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from residtap.artefacts import atomic_write_bytes, fsync_dir
from residtap.store.data import Sample
from residtap.store.manifest import shard_names, write_manifest

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class StoreWriteError(OSError):
    """Writing a shard failed; the complete shards and the manifest are still readable."""


class SafetensorsStream:
    """A safetensors file written part by part: tensor `name` is `rows[name]` rows of
    `like[name]`'s dtype and row shape; parts of each tensor arrive in order and go straight to
    their final offsets. Atomic: a temporary name until `close()` fsyncs and renames it."""

    def __init__(self, path: Path, like: dict[str, Tensor], rows: dict[str, int],
                 metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        self.like = {n: (t.dtype, tuple(t.shape[1:])) for n, t in like.items()}
        self.start: dict[str, int] = {}  # byte offset of each tensor's first row in the data
        self.row_bytes: dict[str, int] = {}
        offset = 0
        for name, t in like.items():
            if t.dtype not in SAFETENSORS_DTYPES:
                raise TypeError(f"cannot store dtype {t.dtype} of {name!r} in safetensors")
            self.row_bytes[name] = math.prod(t.shape[1:]) * t.element_size()
            nbytes = rows[name] * self.row_bytes[name]
            header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype],
                            "shape": [rows[name], *t.shape[1:]],
                            "data_offsets": [offset, offset + nbytes]}
            self.start[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path, self.tmp = Path(path), Path(path).with_name(Path(path).name + ".tmp")
        self.rows, self.written = dict(rows), dict.fromkeys(rows, 0)
        self.data_start, self.nbytes = 8 + len(raw), 8 + len(raw) + offset
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close/discard)
        try:
            self.file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.discard()
            raise

    def write(self, name: str, part: Tensor) -> None:
        """Append `part` (r, *row shape) to tensor `name`."""
        dtype, shape = self.like[name]
        if part.dtype != dtype or tuple(part.shape[1:]) != shape:
            raise ValueError(
                f"the parts of {name!r} disagree: {dtype} {shape} and {part.dtype} "
                f"{tuple(part.shape[1:])}; every row of a site must match"
            )
        r = int(part.shape[0])
        if self.written[name] + r > self.rows[name]:
            raise ValueError(f"tensor {name!r} was declared with {self.rows[name]} rows but "
                             f"{self.written[name] + r} arrived")
        if r:
            at = self.data_start + self.start[name] + self.written[name] * self.row_bytes[name]
            self.file.seek(at)
            self.file.write(part.contiguous().reshape(-1).view(torch.uint8).numpy())
            if hasattr(os, "posix_fadvise"):  # start writing these pages to disk now, so the
                self.file.flush()              # fsync in close() has little left to wait for
                os.posix_fadvise(self.file.fileno(), at, r * self.row_bytes[name],
                                 os.POSIX_FADV_DONTNEED)
        self.written[name] += r

    def close(self) -> int:
        """Fsync and rename to the final name; returns the bytes in the file."""
        short = {n: (w, self.rows[n]) for n, w in self.written.items() if w != self.rows[n]}
        if short:
            self.discard()
            raise ValueError(f"tensors ended short of their declared rows (written, declared): "
                             f"{short}")
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)
        return self.nbytes

    def discard(self) -> None:
        """Close and delete the temporary file (nothing of it stays)."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_safetensors(path: Path, tensors: dict[str, list[Tensor]], metadata: dict[str, str]
                      ) -> int:
    """Write a safetensors file whose tensor `name` is the concatenation (dim 0) of the CPU
    tensors `tensors[name]` (no concatenated copy). Atomic. Returns the bytes written."""
    rows = {n: sum(int(p.shape[0]) for p in parts) for n, parts in tensors.items()}
    stream = SafetensorsStream(path, {n: parts[0] for n, parts in tensors.items()}, rows,
                               metadata)
    try:
        for name, parts in tensors.items():
            for part in parts:
                stream.write(name, part)
    except BaseException:
        stream.discard()
        raise
    return stream.close()


class _Shard:
    """The shard being written: its file (opened at its first batch) and samples so far."""

    def __init__(self, index: int, rows: int) -> None:
        self.index, self.rows = index, rows
        self.file: SafetensorsStream | None = None
        self.samples: list[Sample] = []
        self.written = 0


_END_SHARD = "end-shard"
_STOP = "stop"


class ShardWriter:
    """A thread that writes shards of a store and keeps its manifest up to date."""

    def __init__(self, folder: Path, manifest: dict[str, Any], max_pending: int = 8) -> None:
        self.folder = Path(folder)
        self.manifest = manifest  # owned by the thread once started
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._shard: _Shard | None = None
        self._thread = threading.Thread(target=self._run, name="residtap-store-writer",
                                        daemon=True)

    # -- producer side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def begin_shard(self, rows: int) -> None:
        """Open the next shard, which will hold exactly `rows` rows."""
        self._put(("begin", rows))

    def put_batch(self, tensors: dict[str, Tensor], sample: Tensor, position: Tensor,
                  samples: list[Sample]) -> None:
        """Queue one batch's rows: per site (R, ...) CPU tensors, and (R,) sample/position."""
        self._put(("batch", tensors, sample, position, samples))

    def end_shard(self) -> None:
        """Close the current shard after the batches queued so far."""
        self._put(_END_SHARD)

    def close(self) -> None:
        """Wait for every queued item to be written; raise the writer's error if it failed."""
        self._put(_STOP)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without writing the shard in progress (used when the producer fails)."""
        self._abort.set()
        while True:  # drop what is queued so the thread sees the stop at once
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join(timeout=60)

    def _put(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("the store writer thread is not running")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, StoreWriteError):
                raise StoreWriteError(str(err)) from err.__cause__
            raise err

    # -- thread side -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._abort.is_set():
                item = self._queue.get()
                if item == _STOP or self._abort.is_set():
                    return
                try:
                    if item == _END_SHARD:
                        self._finish_shard()
                    elif item[0] == "begin":
                        self._shard = _Shard(len(self.manifest["shards"]), item[1])
                    else:
                        self._write_batch(*item[1:])
                except OSError as err:
                    index = len(self.manifest["shards"])
                    raise StoreWriteError(
                        f"writing shard {index} of the store {str(self.folder)!r} failed: "
                        f"{err}. The {index} complete shard(s) and manifest.json are intact and "
                        "readable; fix the cause (free disk space, permissions) and run the "
                        "same call again to resume"
                    ) from err
        except BaseException as err:  # handed to the producer, never lost
            self._error = err
        finally:
            shard, self._shard = self._shard, None
            if shard is not None and shard.file is not None:
                shard.file.discard()  # an unfinished shard leaves no file behind

    def _write_batch(self, tensors: dict[str, Tensor], sample: Tensor, position: Tensor,
                     samples: list[Sample]) -> None:
        shard = self._shard
        parts = {**tensors, "sample": sample, "position": position}
        if shard.file is None:
            self._check_sites(tensors)
            tensor_file, _ = shard_names(shard.index)
            meta = {"format": self.manifest["format"], "shard": str(shard.index)}
            shard.file = SafetensorsStream(self.folder / tensor_file, parts,
                                           dict.fromkeys(parts, shard.rows), meta)
        for name, t in parts.items():
            shard.file.write(name, t)
            self.bytes_written += t.numel() * t.element_size()
        shard.samples.extend(samples)
        shard.written += int(sample.shape[0])

    def _check_sites(self, tensors: dict[str, Tensor]) -> None:
        """The first batch of a shard fixes (or must match) each site's row shape and dtype."""
        for site, info in self.manifest["sites"].items():
            first = tensors[site]
            shape, dtype = list(first.shape[1:]), str(first.dtype).removeprefix("torch.")
            if info["shape"] is None:
                info["shape"], info["dtype"] = shape, dtype
            elif (info["shape"], info["dtype"]) != (shape, dtype):
                raise ValueError(
                    f"site {site!r} produced rows of shape {shape} and dtype {dtype}, but "
                    f"the store holds {info['shape']} {info['dtype']}; a store keeps one "
                    "shape and dtype per site"
                )

    def _finish_shard(self) -> None:
        shard, self._shard = self._shard, None
        if shard is None or not shard.samples:
            return
        manifest = self.manifest
        tensor_file, samples_file = shard_names(shard.index)
        try:
            shard.file.close()
        except BaseException:
            shard.file.discard()  # no temporary file stays behind
            raise
        lines = "".join(json.dumps(s.record()) + "\n" for s in shard.samples)
        atomic_write_bytes(self.folder / samples_file, lines.encode())
        self.bytes_written += shard.file.data_start + len(lines)
        manifest["shards"].append({
            "file": tensor_file, "samples_file": samples_file, "rows": shard.written,
            "first_sample": shard.samples[0].index, "samples": len(shard.samples),
        })
        manifest["rows"] += shard.written
        try:
            write_manifest(self.folder, manifest)
        except OSError:
            manifest["shards"].pop()  # keep memory in line with the file on disk
            manifest["rows"] -= shard.written
            raise
        log.debug("wrote shard %d: %d rows, %d samples", shard.index, shard.written,
                  len(shard.samples))

    def finish_manifest(self, **updates: Any) -> None:
        """After `close()`: apply `updates` to the manifest and write it."""
        self.manifest.update(updates)
        write_manifest(self.folder, self.manifest)
