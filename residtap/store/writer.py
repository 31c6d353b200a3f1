"""The background shard writer: the forward loop hands it batches, a thread writes the files.

    writer = ShardWriter(folder, manifest)
    writer.start()
    writer.put_batch({"layers.0": rows}, sample, position, samples)   # (R, d), (R,), (R,)
    writer.end_shard()                                                # after some batches
    writer.close()                                                    # waits, raises errors

Host memory stays bounded: the queue holds at most `max_pending` batches (the producer blocks
when it is full) and the thread holds one shard's rows. Each shard is written as a
safetensors file streamed tensor by tensor from the batches (no concatenated copy), to a
temporary name, fsynced and renamed; then its samples JSONL the same way; only then is the
shard added to the manifest, itself replaced atomically. A failure stops the thread, removes
the temporary file and is raised in the producer as `StoreWriteError`; complete shards and the
manifest stay readable.
"""

from __future__ import annotations

import json
import logging
import queue
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from residtap.store.data import Sample
from residtap.store.manifest import atomic_write, atomic_write_bytes, shard_names, write_manifest

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


class StoreWriteError(OSError):
    """Writing a shard failed; the complete shards and the manifest are still readable."""


def write_safetensors(path: Path, tensors: dict[str, list[Tensor]], metadata: dict[str, str]
                      ) -> int:
    """Write a safetensors file whose tensor `name` is the concatenation (dim 0) of the CPU
    tensors `tensors[name]`, streaming each part (no concatenated copy). Atomic: temp name,
    fsync, rename. Returns the bytes written."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, parts in tensors.items():
        first = parts[0]
        if first.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store dtype {first.dtype} of {name!r} in safetensors")
        odd = [p for p in parts if p.dtype != first.dtype or p.shape[1:] != first.shape[1:]]
        if odd:
            raise ValueError(
                f"the parts of {name!r} disagree: {first.dtype} {tuple(first.shape[1:])} and "
                f"{odd[0].dtype} {tuple(odd[0].shape[1:])}; every row of a site must match"
            )
        rows = sum(p.shape[0] for p in parts)
        nbytes = sum(p.numel() * p.element_size() for p in parts)
        header[name] = {"dtype": SAFETENSORS_DTYPES[first.dtype], "shape": [rows, *first.shape[1:]],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for parts in tensors.values():
            for part in parts:
                if part.numel():
                    f.write(part.contiguous().reshape(-1).view(torch.uint8).numpy())

    atomic_write(path, write)
    return 8 + len(raw) + offset


class _Shard:
    """Rows accumulated for the shard being filled."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}
        self.samples: list[Sample] = []
        self.rows = 0


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
        self._shard = _Shard()
        self._thread = threading.Thread(target=self._run, name="residtap-store-writer",
                                        daemon=True)

    # -- producer side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

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
                if item == _END_SHARD:
                    self._write_shard()
                else:
                    self._add(*item[1:])
        except BaseException as err:  # handed to the producer, never lost
            self._error = err

    def _add(self, tensors: dict[str, Tensor], sample: Tensor, position: Tensor,
             samples: list[Sample]) -> None:
        shard = self._shard
        for name, t in {**tensors, "sample": sample, "position": position}.items():
            shard.parts.setdefault(name, []).append(t)
        shard.samples.extend(samples)
        shard.rows += int(sample.shape[0])

    def _write_shard(self) -> None:
        shard, self._shard = self._shard, _Shard()
        if not shard.samples:
            return
        manifest = self.manifest
        index = len(manifest["shards"])
        tensor_file, samples_file = shard_names(index)
        for site, info in manifest["sites"].items():
            first = shard.parts[site][0]
            shape, dtype = list(first.shape[1:]), str(first.dtype).removeprefix("torch.")
            if info["shape"] is None:
                info["shape"], info["dtype"] = shape, dtype
            elif (info["shape"], info["dtype"]) != (shape, dtype):
                raise ValueError(
                    f"site {site!r} produced rows of shape {shape} and dtype {dtype}, but "
                    f"the store holds {info['shape']} {info['dtype']}; a store keeps one "
                    "shape and dtype per site"
                )
        try:
            lines = "".join(json.dumps(s.record()) + "\n" for s in shard.samples)
            atomic_write_bytes(self.folder / samples_file, lines.encode())
            meta = {"format": manifest["format"], "shard": str(index)}
            self.bytes_written += write_safetensors(self.folder / tensor_file, shard.parts, meta)
            self.bytes_written += len(lines)
            manifest["shards"].append({
                "file": tensor_file, "samples_file": samples_file, "rows": shard.rows,
                "first_sample": shard.samples[0].index, "samples": len(shard.samples),
            })
            manifest["rows"] += shard.rows
            write_manifest(self.folder, manifest)
        except OSError as err:
            if len(manifest["shards"]) > index:  # keep memory in line with the file on disk
                done = manifest["shards"].pop()
                manifest["rows"] -= done["rows"]
            raise StoreWriteError(
                f"writing shard {index} of the store {str(self.folder)!r} failed: {err}. The "
                f"{index} complete shard(s) and manifest.json are intact and readable; fix the "
                "cause (free disk space, permissions) and run the same call again to resume"
            ) from err
        log.debug("wrote shard %d: %d rows, %d samples", index, shard.rows, len(shard.samples))

    def finish_manifest(self, **updates: Any) -> None:
        """After `close()`: apply `updates` to the manifest and write it."""
        self.manifest.update(updates)
        write_manifest(self.folder, self.manifest)
