"""Preparing a corpus: gpt2lab's sharded prepare vs the common approach (``datasets.map`` with tiktoken's
GPT-2 encoding, then one memmap, as nanoGPT's data/openwebtext/prepare.py does), on the same parquet text.

For each corpus size both contenders run in a fresh process with the same number of worker processes;
the table gives tokens/s, the peak resident memory of the main process and of the largest worker
(``getrusage(RUSAGE_CHILDREN)``), and checks that both produced the same token count. Two sizes show
whether memory stays flat as the corpus grows. Both sides use the same GPT-2 BPE (gpt2lab's offline
copy of it), so the comparison is of the pipelines, not of the tokenizers.

    python benchmarks/prepare.py                          # ~50 MB and ~100 MB of text, all cores
    python benchmarks/prepare.py --sizes-mb 1 2 --workers 2   # a smoke run (seconds)

Results: a table on stdout and ``prepare.csv`` / ``prepare.png`` in ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from memory import peak_memory

from gpt2lab.files import atomic_file

CONTENDERS = ("gpt2lab", "datasets.map")


def write_corpus(path: Path, megabytes: float) -> int:
    """A parquet of documents made from CPython's bundled docs, numbered so no two are equal; its bytes."""
    from pydoc_data.topics import topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces = list(topics.values())
    texts, size, i = [], 0, 0
    while size < megabytes * 1e6:
        text = f"Document {i}.\n{pieces[i % len(pieces)]}"
        texts.append(text)
        size += len(text.encode())
        i += 1
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1000)
    return size


def run_gpt2lab(corpus: Path, out: Path, workers: int) -> int:
    from gpt2lab.data.shards import prepare_shards

    return prepare_shards([corpus], out, workers=workers, val_tokens=100_000)["tokens"]


def run_datasets_map(corpus: Path, out: Path, workers: int) -> int:
    """The nanoGPT recipe: load, ``map`` the encoder over all rows with num_proc, write one uint16 memmap."""
    from datasets import load_dataset

    from gpt2lab.tokenizer import load_tokenizer

    enc = load_tokenizer()

    def process(example):
        ids = enc.encode_ordinary(example["text"]) + [enc.eot_token]
        return {"ids": ids, "len": len(ids)}

    dataset = load_dataset("parquet", data_files=str(corpus), split="train", cache_dir=str(out / "hf-cache"))
    tokenized = dataset.map(process, remove_columns=["text"], num_proc=workers)
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(out / "train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    index, shards = 0, 64
    for k in range(shards):
        batch = tokenized.shard(num_shards=shards, index=k, contiguous=True).with_format("numpy")
        ids = np.concatenate(batch["ids"])
        arr[index : index + len(ids)] = ids
        index += len(ids)
    arr.flush()
    return total


def child(kind: str, corpus: Path, workers: int) -> None:
    out = Path(tempfile.mkdtemp(prefix="prep-"))
    try:
        start = time.perf_counter()
        tokens = (run_gpt2lab if kind == "gpt2lab" else run_datasets_map)(corpus, out / "data", workers)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"tokens": tokens, "seconds": seconds, "main_peak": peak_memory(), "worker_peak": worker_peak}))


def measure(kind: str, corpus: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus), "--workers", str(workers)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    from gpt2lab.plots import plot_file

    with plot_file(path) as (ax,):
        for kind in CONTENDERS:
            points = [(r["corpus_mb"], r["main_peak"] / 2**20) for r in rows if r["contender"] == kind]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{kind} (main process)")
        ax.set_xlabel("corpus size (MB of text)")
        ax.set_ylabel("peak resident memory (MiB)")
        ax.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[50, 100])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.corpus, args.workers)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.workers} workers; "
          f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes_mb:
            corpus = Path(tmp) / f"corpus-{mb:g}MB.parquet"
            size = write_corpus(corpus, mb)
            results = {kind: measure(kind, corpus, args.workers) for kind in CONTENDERS}
            if len({r["tokens"] for r in results.values()}) != 1:
                sys.exit(f"the contenders disagree on the token count: {results}")
            for kind, r in results.items():
                rows.append({"contender": kind, "corpus_mb": size / 1e6, **r, "tok_s": r["tokens"] / r["seconds"]})
                memory = f"main {r['main_peak'] / 2**20:8.1f} MiB  largest worker {r['worker_peak'] / 2**20:8.1f} MiB"
                speed = f"{r['tokens']:>12,} tokens  {rows[-1]['tok_s']:>10,.0f} tok/s"
                print(f"{size / 1e6:7.1f} MB  {kind:<13} {speed}  {memory}")
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / "prepare.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "prepare.png")
    print(f"results: {args.out / 'prepare.csv'}, {args.out / 'prepare.png'}")


if __name__ == "__main__":
    main()
