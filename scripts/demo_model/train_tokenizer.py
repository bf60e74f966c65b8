"""Step 2: train the byte-level BPE tokenizer on the training split (all four domains).

    python scripts/demo_model/train_tokenizer.py [--vocab-size 8192]

Writes tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast) to runs/demo_model/tokenizer;
train.py copies them into the checkpoint. `tokenizer(text)` prepends <|bos|> (the model was trained
on <|bos|> chunk <|eos|> sequences); <|eos|> ends generation; <|pad|> is id 0.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

from demo_paths import (
    BOS_TOKEN,
    DOMAINS,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_WORK_DIR,
    TRAIN_DIR,
    read_jsonl,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moeserve.atomic import atomic_dir


def training_texts() -> Iterator[str]:
    for domain in DOMAINS:
        for row in read_jsonl(TRAIN_DIR / f"{domain}.jsonl"):
            yield row["text"]


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    started = time.time()
    tokenizer = train_bpe(training_texts(), args.vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )
    with atomic_dir(TOKENIZER_WORK_DIR, "tokenizer.json", force=True) as tmp:
        fast.save_pretrained(tmp)
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"vocab {tokenizer.get_vocab_size()} trained in {time.time() - started:.1f}s -> {TOKENIZER_WORK_DIR}")


if __name__ == "__main__":
    main()
