"""What WD phase 1 costs with a big multilingual teacher: an M2M-100-418M-shaped teacher
(random weights: 12+12 pre-norm layers x 1024/4096/16 heads, all embeddings shared, a
dictionary of 128,112 entries), with the full and a trimmed vocabulary
(``wd-trim-vocab``), with the authors' per-token embedding generators and with
``--wd-table-scale shared``.

For each setting fairseq's own ``Trainer`` (Adam, label-smoothed CE) builds the phase-1
model and runs update steps on one fixed batch of random sentences: trainable (generator)
parameters, of which the embedding-table generators, the frozen teacher's parameters, the
Adam state after a step (bytes of its tensors), and the median update time; and, for each
vocabulary, the median time of a student of that vocabulary (stock ``transformer``, random
weights) to beam-search 16 sentences: what trimming alone saves in decoding.

    python benchmarks/big_teacher_cost.py [--trimmed-vocab 32000] [--steps 2] [--threads 2]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import add_common_args, environment, print_table, use_threads, write_results

M2M_100_418M = dict(
    arch="transformer", _name="transformer", encoder_layers=12, decoder_layers=12,
    encoder_embed_dim=1024, decoder_embed_dim=1024, encoder_ffn_embed_dim=4096,
    decoder_ffn_embed_dim=4096, encoder_attention_heads=16, decoder_attention_heads=16,
    encoder_normalize_before=True, decoder_normalize_before=True, share_all_embeddings=True,
    share_decoder_input_output_embed=True, max_source_positions=1024, max_target_positions=1024,
    dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, activation_fn="relu")
M2M_VOCABULARY = 128_112
#: a deployable multilingual student: 6+2 layers x 512/2048/8 heads, tables shared
STUDENT = ["--encoder-layers", "6", "--encoder-embed-dim", "512", "--encoder-ffn-embed-dim", "2048",
           "--encoder-attention-heads", "8", "--decoder-layers", "2", "--decoder-embed-dim", "512",
           "--decoder-ffn-embed-dim", "2048", "--decoder-attention-heads", "8", "--share-all-embeddings"]
OPTIM = ["--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "7e-4", "--lr-scheduler",
         "inverse_sqrt", "--warmup-updates", "4000", "--criterion", "label_smoothed_cross_entropy",
         "--label-smoothing", "0.1", "--seed", "1", "--num-workers", "0", "--cpu"]


def data_bin(directory: Path, vocabulary: int, sentences: int = 48, length: int = 24) -> Path:
    """A joined dictionary of ``vocabulary`` entries (specials included) and a train
    split of random sentences."""
    from fairseq.data import Dictionary, indexed_dataset

    directory.mkdir(parents=True, exist_ok=True)
    dictionary = Dictionary()
    for i in range(vocabulary - len(dictionary)):
        dictionary.add_symbol(f"t{i}", n=vocabulary - i)
    for lang in ("src", "tgt"):
        dictionary.save(str(directory / f"dict.{lang}.txt"))
    rng = np.random.default_rng(1)
    for lang in ("src", "tgt"):
        prefix = str(directory / f"train.src-tgt.{lang}")
        builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=vocabulary)
        for _ in range(sentences):
            ids = rng.integers(dictionary.nspecial, vocabulary, length)
            builder.add_item(torch.from_numpy(np.append(ids, dictionary.eos())))
        builder.finalize(prefix + ".idx")
    return directory


def measure(data: Path, table_scale: str, steps: int) -> dict:
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    teacher = {k: v for k, v in M2M_100_418M.items()}
    argv = [str(data), "--user-dir", str(Path(__file__).resolve().parent.parent / "wd_fairseq"),
            "--arch", "wd_transformer", "--teacher-config", json.dumps(teacher),
            "--wd-table-scale", table_scale, *STUDENT, *OPTIM, "--max-tokens", "2048"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    from fairseq import utils
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tables = sum(p.numel() for n, p in trainable.items() if "embed_tokens" in n)
    frozen = sum(p.numel() for p in model.teacher.parameters())
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    sample = next(task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=2048,
                                          required_batch_size_multiple=1, seed=1,
                                          disable_iterator_cache=True).next_epoch_itr(shuffle=False))
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        trainer.train_step([sample])
        if step:  # the first step allocates the optimizer state
            seconds.append(time.perf_counter() - start)
    state = trainer.optimizer.optimizer.state
    adam_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values()
                     if torch.is_tensor(t))
    return {"vocabulary": len(task.source_dictionary), "table_scale": table_scale,
            "trainable_M": round(sum(p.numel() for p in trainable.values()) / 1e6, 1),
            "table_generators_M": round(tables / 1e6, 1), "teacher_M": round(frozen / 1e6, 1),
            "adam_state_GiB": round(adam_bytes / 2**30, 2),
            "update_s": round(statistics.median(seconds), 1), "steps": steps,
            "batch_tokens": int(sample["ntokens"])}


def decoding_seconds(data: Path, steps: int, beam: int = 4, sentences: int = 16) -> float:
    """Median seconds of one beam search over ``sentences`` training sources with a stock
    ``transformer`` of the student's shape (random weights: every hypothesis runs to the
    same length limit, so vocabularies compare on equal work)."""
    from fairseq import options, tasks
    from fairseq.dataclass.configs import GenerationConfig
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [str(data), "--arch", "transformer", *STUDENT, *OPTIM]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model).eval()
    dataset = task.dataset("train")
    sample = dataset.collater([dataset[i] for i in range(sentences)])
    generator = task.build_generator([model], GenerationConfig(beam=beam, max_len_a=0, max_len_b=30))
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.no_grad():
            task.inference_step(generator, [model], sample)
        if step:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--trimmed-vocab", type=int, default=32000,
                        help="the trimmed vocabulary's size (what wd-trim-vocab keeps depends on "
                        "the data; default 32,000)")
    parser.add_argument("--steps", type=int, default=2, help="timed updates per setting (after one)")
    args = parser.parse_args()
    use_threads(args.threads)
    args.workdir = args.workdir or Path(__file__).resolve().parent.parent / "work" / "bench-big-teacher"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocabulary in (M2M_VOCABULARY, args.trimmed_vocab):
            data = data_bin(Path(tmp) / str(vocabulary), vocabulary)
            decode = decoding_seconds(data, args.steps)
            for table_scale in ("token", "shared"):
                rows.append(dict(measure(data, table_scale, args.steps), student_decode_s=round(decode, 2)))
                print(json.dumps(rows[-1]), flush=True)
    columns = ["vocabulary", "table_scale", "trainable_M", "table_generators_M", "teacher_M",
               "adam_state_GiB", "update_s", "student_decode_s"]
    print_table(rows, columns)
    load = [round(x, 2) for x in os.getloadavg()]
    results = {"command": "python " + " ".join(sys.argv), "environment": environment("cpu"),
               "load_average_at_end": load, "teacher": M2M_100_418M, "student": " ".join(STUDENT),
               "rows": rows}
    print(f"results: {write_results(args, 'big_teacher_cost', results)}")


if __name__ == "__main__":
    main()
