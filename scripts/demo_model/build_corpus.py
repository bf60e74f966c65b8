"""Step 1: read the four domains from installed packages, split by document, write train / held-out jsonl.

    python scripts/demo_model/build_corpus.py [--seed 0]

Writes runs/demo_model/corpus/train/<domain>.jsonl (git-ignored), the shipped held-out split
src/moeserve/assets/demo/heldout/<domain>.jsonl and runs/demo_model/corpus/manifest.json.
Each domain's held-out documents (small ones, so there are many) are drawn first (seeded) until
about `--heldout-chars` of text;
the training split takes the remaining documents in seeded order up to `--train-chars` per domain,
so no domain dominates. Token-level balancing happens in train.py, after the tokenizer exists.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from corpus_sources import READERS, Document
from demo_paths import CORPUS_MANIFEST, DOMAIN_SOURCES, DOMAINS, HELDOUT_DIR, TRAIN_DIR, write_jsonl

from moeserve.atomic import write_text_atomic

MIN_HELDOUT_CHUNK_CHARS = 100


def heldout_chunks(doc: Document) -> list[str]:
    return [c for c in doc.chunks if len(c) >= MIN_HELDOUT_CHUNK_CHARS]


def split_documents(
    docs: list[Document], seed: str, heldout_chars: int, heldout_max_chars: int, train_chars: int
) -> tuple[list[Document], list[Document]]:
    """Seeded split by document: (train, heldout). Held-out docs fill [heldout_chars, heldout_max_chars]."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    heldout: list[Document] = []
    train: list[Document] = []
    held, trained = 0, 0
    for doc in order:
        size = sum(len(c) for c in heldout_chunks(doc))
        # small documents only, so the held-out split spans many files / pages / chapters
        if held < heldout_chars and 0 < size <= heldout_max_chars // 8 and held + size <= heldout_max_chars:
            heldout.append(doc)
            held += size
        elif trained < train_chars:
            train.append(doc)
            trained += doc.chars
    return train, heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-chars", type=int, default=80_000)
    parser.add_argument("--heldout-max-chars", type=int, default=100_000)
    parser.add_argument("--train-chars", type=int, default=4_000_000)
    args = parser.parse_args()

    manifest: dict = {"seed": args.seed, "train_chars_cap": args.train_chars,
                      "heldout_chars_target": args.heldout_chars, "domains": {}}
    started = time.time()
    for domain in DOMAINS:
        docs = READERS[domain]()
        train, heldout = split_documents(docs, f"{args.seed}-{domain}", args.heldout_chars,
                                         args.heldout_max_chars, args.train_chars)
        write_jsonl(TRAIN_DIR / f"{domain}.jsonl",
                    ({"text": c, "domain": domain, "doc": d.doc_id} for d in train for c in d.chunks))
        heldout_rows = [{"text": c, "domain": domain, "doc": d.doc_id} for d in heldout for c in heldout_chunks(d)]
        write_jsonl(HELDOUT_DIR / f"{domain}.jsonl", heldout_rows)
        manifest["domains"][domain] = {
            **DOMAIN_SOURCES[domain],
            "documents_available": len(docs),
            "chars_available": sum(d.chars for d in docs),
            "train": {"documents": len(train), "chunks": sum(len(d.chunks) for d in train),
                      "chars": sum(d.chars for d in train)},
            "heldout": {"documents": len(heldout), "chunks": len(heldout_rows),
                        "chars": sum(len(r["text"]) for r in heldout_rows)},
        }
        print(domain, json.dumps(manifest["domains"][domain]["train"]), json.dumps(manifest["domains"][domain]["heldout"]))
    manifest["wall_s"] = round(time.time() - started, 1)
    CORPUS_MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(CORPUS_MANIFEST, json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
