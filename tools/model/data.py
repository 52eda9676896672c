"""Text for the fidelity model: the Python sources installed on the machine, and the evaluation tasks.

Corpus: every *.py file under the interpreter's standard library and site
directories (sysconfig + site), deduplicated by real path, sorted by path,
files of 1 KiB .. 256 KiB only (generated tables and stubs out). Every 20th file
in that order is held out: training never sees it; the evaluation tasks are cut
from it. The list, its size and a digest are recorded with the weights, so a
rebuild on another image says when its text differs.

Tasks (made from held-out text with a fixed seed, all byte strings):
  lm      a prefix of T bytes from one held-out file, then C bytes of the same file
          (next-byte accuracy and bits per byte on the continuation);
  needle  a held-out prefix with, early on, a block of assignments
          KEY_ab = "q7x2m9k4" (four random keys, random 8-character values), then code;
          the continuation repeats   KEY_ab = "   and is scored on the value (copying it back
          is what induction / retrieval heads do).
          The question comes after compression: the policy cannot know it;
  aware   the same, but the question ends the prefix (its last quote excepted), so it
          sits in SnapKV's observation window: the query-aware variant.
Every example splits at byte T: prefix = bytes[:T] (prefilled with full attention,
then compressed), continuation = bytes[T:] (attends over the compressed prefix).
Scored bytes are predictions made by continuation positions only, so every
score depends on the compressed cache (none comes from the uncompressed prefill).
"""

from __future__ import annotations

import hashlib
import os
import random
import site
import sysconfig
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

MIN_BYTES, MAX_BYTES, HOLD_OUT_EVERY = 1024, 256 * 1024, 20


def source_files() -> List[str]:
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:
        pass
    files = set()
    for root in sorted(roots):
        if not os.path.isdir(root):
            continue
        for directory, dirs, names in os.walk(root):
            dirs.sort()
            for name in names:
                if name.endswith(".py"):
                    path = os.path.realpath(os.path.join(directory, name))
                    try:
                        size = os.path.getsize(path)
                    except OSError:
                        continue
                    if MIN_BYTES <= size <= MAX_BYTES:
                        files.add(path)
    return sorted(files)


@dataclass
class Corpus:
    train: np.ndarray          # uint8, the training files joined by blank lines
    held_out: List[bytes]      # the held-out files, one by one
    files: int
    digest: str                # sha256 over (path, size) of the sorted list

    def describe(self):
        return {"files": self.files, "train_bytes": int(self.train.size),
                "held_out_files": len(self.held_out), "held_out_bytes": sum(map(len, self.held_out)),
                "list_sha256": self.digest}


def load_corpus(max_train_bytes: int = 160 << 20) -> Corpus:
    files = source_files()
    digest = hashlib.sha256()
    train_parts, held_out, total = [], [], 0
    for i, path in enumerate(files):
        digest.update(f"{path}\0{os.path.getsize(path)}\n".encode())
        held = i % HOLD_OUT_EVERY == 0
        if not held and total >= max_train_bytes:
            continue
        with open(path, "rb") as f:
            text = f.read()
        if held:
            held_out.append(text)
        else:
            train_parts.append(text + b"\n\n")
            total += len(text) + 2
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8).copy()
    return Corpus(train, held_out, len(files), digest.hexdigest())


# ---- evaluation tasks -------------------------------------------------------------

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class Task:
    name: str
    examples: List[bytes]          # each prefix_len + continuation bytes
    prefix_len: int
    scored: List[Tuple[int, int]]  # per example: [first, last) byte indices scored (all ≥ prefix_len + 1)


def _held_out_windows(held_out: List[bytes], rng: random.Random, length: int, count: int) -> List[bytes]:
    long_enough = [t for t in held_out if len(t) >= length]
    rng.shuffle(long_enough)
    out = []
    for text in long_enough[:count]:
        start = rng.randrange(0, len(text) - length + 1)
        out.append(text[start:start + length])
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} held-out files of {length} bytes or more; {count} wanted")
    return out


def make_tasks(held_out: List[bytes], prefix_len: int = 2048, continuation: int = 128, count: int = 32,
               seed: int = 1234) -> List[Task]:
    rng = random.Random(seed)
    T = prefix_len
    lm = _held_out_windows(held_out, rng, T + continuation, count)
    tasks = [Task("lm", lm, T, [(T + 1, T + continuation)] * count)]

    fillers = _held_out_windows(held_out, rng, 2 * T, count)
    agnostic, aware, scored_agnostic, scored_aware = [], [], [], []
    for filler in fillers:
        names = rng.sample([f"KEY_{a}{b}" for a in "ABCDEFGH" for b in "ABCDEFGH"], 4)
        values = ["".join(rng.choice(ALPHABET) for _ in range(8)) for _ in names]
        block = "".join(f'{n} = "{v}"\n' for n, v in zip(names, values)).encode()
        asked = rng.randrange(len(names))
        question = f'\n{names[asked]} = "'.encode()
        answer = values[asked].encode() + b'"\n'
        at = int(T * rng.uniform(0.1, 0.3))              # the block sits 10-30% into the prefix
        cut = filler.rfind(b"\n", 0, at) + 1             # on a line boundary
        head = filler[:cut] + b"\n" + block
        # query-agnostic: the question and answer follow the prefix
        body = head + filler[cut:]
        example = body[:T] + question + answer
        agnostic.append(example)
        first = T + len(question)
        scored_agnostic.append((first, first + 8))
        # query-aware: the question ends the prefix; its closing quote opens the continuation
        body = head + filler[cut:]
        example = body[:T - len(question) + 1] + question + answer
        aware.append(example)
        scored_aware.append((T + 1, T + 1 + 8))
    tasks.append(Task("needle", agnostic, T, scored_agnostic))
    tasks.append(Task("aware", aware, T, scored_aware))
    for task in tasks:
        for example, (first, last) in zip(task.examples, task.scored):
            assert first >= T + 1 and last <= len(example), (task.name, first, last, len(example))
    return tasks
