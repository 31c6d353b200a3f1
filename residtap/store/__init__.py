"""Data set -> on-disk activation store, and reading it back.

    store = residtap.extract(model, tokenizer, "texts.jsonl", "all-layers", "acts/")
    store = residtap.Store.open("acts/")
    store["layers.3"], store.labels("label"), store.groups()

Modules: `extract` (the forward loop), `writer` (background shard writer), `reader` (`Store`),
`manifest` (the format, documented there), `data` (input loading), `inputs` (argument checks),
`resume` (what is already in the folder), `checks` (what the reader verifies), `lock`.
"""

from residtap.store.extract import extract
from residtap.store.lock import StoreLockedError
from residtap.store.reader import Store, StoreDataset
from residtap.store.writer import StoreWriteError

__all__ = ["Store", "StoreDataset", "StoreLockedError", "StoreWriteError", "extract"]
