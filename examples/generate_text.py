"""Long greedy text generation that resumes mid-sequence, from a checkpointed KV cache, after a crash.

    python examples/generate_text.py [--sequences 4] [--chunks 48] [--tokens 32] [--out DIR] [--short]

A tiny decoder-only transformer (random seeded weights, no download) generates ``--chunks`` x
``--tokens`` tokens for each of ``--sequences`` seeded prompts, greedily, with a KV cache. The work is
cut into chunks: batch ``b`` generates the next ``--tokens`` tokens of sequence ``b % S`` (its chunk
``b // S``). The pipeline is stateful and the runtime routes batch ``b`` to slot ``b % 2`` in id order;
with ``S`` even, every sequence always lands on the same slot, in chunk order. A slot's state holds,
per sequence, the tokens so far, the next token and the KV cache tensors, and it is checkpointed every
2 batches of the slot (to ``DIR/ckpt-a`` and ``DIR/ckpt-b``). Each chunk's new tokens go to a
``tensors`` `resilient.io.FileSink` under ``DIR/tokens``.

Once a slot has a checkpoint and 40% of the chunks are committed, one worker actor process is
SIGKILLed by PID. Its replacement loads the slot's checkpoint (partial sequences and their KV caches)
and goes on from there instead of generating its sequences again from the prompt. The script then
checks that every chunk was committed exactly once, that every final sequence is identical to an
uninterrupted greedy generation in this process, and that the replacement resumed mid-sequence, and
reports how many tokens per sequence it resumed from. Exit status: 0 if all hold, 1 if not, 2 if the
job ended before the crash.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import resilient
from resilient.testing import kill_worker
from resilient.errors import ConfigError

__all__ = ["SLOTS", "ChunkedGenerator", "TinyLM", "main", "make_batches"]

SLOTS = 2
SEED = 3
VOCAB, DIM, HEADS, LAYERS, MAX_LEN = 256, 64, 4, 3, 4096
PROMPT = 12


class TinyLM(torch.nn.Module):
    """A pre-norm decoder-only transformer with learned positions and a KV cache.

    The cache is two tensors ``(LAYERS, HEADS, length, DIM // HEADS)`` (keys, values) covering every
    position fed so far.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Embedding(MAX_LEN, DIM)
        self.ln1 = torch.nn.ModuleList(torch.nn.LayerNorm(DIM) for _ in range(LAYERS))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(DIM, 3 * DIM) for _ in range(LAYERS))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(DIM, DIM) for _ in range(LAYERS))
        self.ln2 = torch.nn.ModuleList(torch.nn.LayerNorm(DIM) for _ in range(LAYERS))
        self.mlp = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(DIM, 4 * DIM), torch.nn.GELU(), torch.nn.Linear(4 * DIM, DIM))
            for _ in range(LAYERS)
        )
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)

    @staticmethod
    def empty_cache() -> tuple[torch.Tensor, torch.Tensor]:
        shape = (LAYERS, HEADS, 0, DIM // HEADS)
        return torch.zeros(shape), torch.zeros(shape)

    def forward(self, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` (1-D) after the ``keys.shape[2]`` cached positions; return the logits of the
        last one and the extended cache."""
        past, n = keys.shape[2], len(tokens)
        x = self.tok(tokens) + self.pos(torch.arange(past, past + n))
        mask = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)
        new_k, new_v = [], []
        for i in range(LAYERS):
            q, k, v = self.qkv[i](self.ln1[i](x)).view(n, 3, HEADS, DIM // HEADS).permute(1, 2, 0, 3)
            k, v = torch.cat([keys[i], k], dim=1), torch.cat([values[i], v], dim=1)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.proj[i](att.transpose(0, 1).reshape(n, DIM))
            x = x + self.mlp[i](self.ln2[i](x))
            new_k.append(k)
            new_v.append(v)
        return self.head(self.norm(x[-1])), torch.stack(new_k), torch.stack(new_v)


def build_model() -> TinyLM:
    torch.manual_seed(SEED)
    model = TinyLM().eval()
    with torch.no_grad():
        model.tok.weight.mul_(2.0)  # livelier random text than the default scale gives
    return model


class ChunkedGenerator:
    """Greedy generation, ``tokens`` tokens per batch; state: each sequence's tokens, next token and KV
    cache.

    A batch is ``{"seq", "chunk", "prompt"}``; chunk 0 feeds the prompt first. A chunk that does not
    follow the sequence's previous one is refused (ValueError): the state would not match it.
    """

    def __init__(self, tokens: int) -> None:
        torch.set_num_threads(1)
        self.tokens = tokens
        self.model = build_model()
        self.seqs: dict[str, dict[str, Any]] = {}

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        seq, chunk = int(batch["seq"]), int(batch["chunk"])
        with torch.no_grad():
            if chunk == 0:
                prompt = torch.as_tensor(np.asarray(batch["prompt"]), dtype=torch.int64)
                logits, k, v = self.model(prompt, *TinyLM.empty_cache())
                self.seqs[str(seq)] = {"tokens": prompt, "next": int(logits.argmax()), "k": k, "v": v}
            s = self.seqs.get(str(seq))
            if s is None or len(s["tokens"]) != PROMPT + chunk * self.tokens:
                have = None if s is None else len(s["tokens"])
                raise ValueError(f"sequence {seq} chunk {chunk}: the state holds {have} tokens")
            new = []
            for _ in range(self.tokens):
                new.append(s["next"])
                logits, s["k"], s["v"] = self.model(torch.tensor([s["next"]]), s["k"], s["v"])
                s["next"] = int(logits.argmax())
            s["tokens"] = torch.cat([s["tokens"], torch.tensor(new)])
        return {"seq": seq, "chunk": chunk, "tokens": torch.tensor(new)}

    def state_dict(self) -> dict[str, Any]:
        return {"seqs": self.seqs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seqs = {name: dict(s) for name, s in state["seqs"].items()}


#: The resilient job: stateful, two slots, a slot checkpoint every 2 of its batches.
generate = resilient.pipeline(ChunkedGenerator, num_actors=SLOTS, actor_cpus=0.25, standby=0, checkpoint_every=2)


def make_batches(sequences: int, chunks: int) -> list[dict[str, Any]]:
    """Batch ``b``: chunk ``b // sequences`` of sequence ``b % sequences`` (with its seeded prompt)."""
    rng = np.random.default_rng(SEED)
    prompts = rng.integers(0, VOCAB, (sequences, PROMPT))
    return [{"seq": b % sequences, "chunk": b // sequences, "prompt": prompts[b % sequences]}
            for b in range(sequences * chunks)]


def uninterrupted(prompt: np.ndarray, n: int) -> list[int]:
    """Greedy generation of ``n`` tokens after ``prompt`` in one go, in this process (one thread, as in
    the actors)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model = build_model()
        with torch.no_grad():
            logits, k, v = model(torch.as_tensor(prompt, dtype=torch.int64), *TinyLM.empty_cache())
            out = [int(t) for t in prompt]
            for _ in range(n):
                out.append(int(logits.argmax()))
                logits, k, v = model(torch.tensor([out[-1]]), k, v)
        return out
    finally:
        torch.set_num_threads(threads)


def kill_after_checkpoint(handle: resilient.JobHandle, store: resilient.CheckpointStore, after: int,
                          say: Any) -> int | None:
    """Once `after` batches are committed and the first actor's slot has a checkpoint, SIGKILL that actor
    by PID; return its slot (None if the job ended first)."""
    victim = kill_worker(handle, after=after,
                         ready=lambda a: store.latest(f"{handle.job_id}/slot-{a['slot']}") is not None)
    if victim is None:
        return None
    say(f"killed worker pid {victim['pid']} (slot {victim['slot']}) after "
        f"{handle.progress()['committed']} committed chunks")
    return int(victim["slot"])


def resumed_tokens(cursor: int, slot: int, sequences: int, tokens: int) -> dict[int, int]:
    """Tokens each of `slot`'s sequences held in a checkpoint at `cursor` (the slot's batches below it
    were applied): ``PROMPT + chunks done * tokens``, or 0 for a sequence not started."""
    out = {}
    for q in range(slot, sequences, SLOTS):
        done = math.ceil((cursor - q) / sequences) if cursor > q else 0
        out[q] = PROMPT + done * tokens if done else 0
    return out


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the example; return 0 when every guarantee held (see the module docstring).

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).
        environ: where ``RESILIENT_*`` settings are read (``os.environ`` when None).
    """
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sequences", type=int, default=4, help=f"sequences (a multiple of {SLOTS})")
    ap.add_argument("--chunks", type=int, default=48, help="chunks per sequence")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per chunk")
    ap.add_argument("--out", default=None, help="a new or empty directory for outputs and checkpoints")
    ap.add_argument("--short", action="store_true", help="a small, fast run (4 sequences x 16 chunks x 16)")
    args = ap.parse_args(argv)
    if args.short:
        args.sequences, args.chunks, args.tokens = 4, 16, 16
    if args.sequences < SLOTS or args.sequences % SLOTS:
        raise ConfigError("--sequences", args.sequences, f"a positive multiple of {SLOTS}")
    if not 0 < PROMPT + args.chunks * args.tokens <= MAX_LEN:
        raise ConfigError("--chunks x --tokens", args.chunks * args.tokens, f"1 to {MAX_LEN - PROMPT} tokens")
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="resilient-generate-"))
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError("--out", out, "a new or empty directory (this one holds an earlier run)")
    say = print

    batches = make_batches(args.sequences, args.chunks)
    storage = [os.path.join(out, "ckpt-a"), os.path.join(out, "ckpt-b")]
    settings = resilient.Settings.from_env(environ, storage=storage)
    sink = resilient.io.FileSink(os.path.join(out, "tokens"), format="tensors")
    total = args.chunks * args.tokens
    say(f"{args.sequences} sequences x {total} tokens in {len(batches)} chunks of {args.tokens}")

    import ray

    owns_ray = not ray.is_initialized()
    try:
        with resilient.CheckpointStore(settings) as store:
            handle = generate.run(batches, sink, job_id="generate-text", settings=settings,
                                  init_kwargs={"tokens": args.tokens})
            victim = kill_after_checkpoint(handle, store, int(len(batches) * 0.4), say)
            result = handle.wait()
        starts = [e.cursor for e in handle.events() if e.kind == "started" and e.slot == victim]
    finally:
        if owns_ray:
            ray.shutdown()

    chunks: collections.Counter = collections.Counter()
    generated: dict[int, dict[int, list[int]]] = collections.defaultdict(dict)
    for b, o in sink.read_all():
        chunks[b] += 1
        ok = (o["seq"], o["chunk"]) == (b % args.sequences, b // args.sequences)
        generated[o["seq"]][o["chunk"]] = o["tokens"].tolist() if ok else []
    exactly_once = sorted(chunks) == list(range(len(batches))) and set(chunks.values()) == {1}
    prompts = {q: batches[q]["prompt"] for q in range(args.sequences)}
    same = exactly_once and all(
        [int(t) for t in prompts[q]] + sum((generated[q][c] for c in range(args.chunks)), [])
        == uninterrupted(prompts[q], total)
        for q in range(args.sequences)
    )
    resumed = resumed_tokens(starts[-1], victim, args.sequences, args.tokens) if victim is not None and len(
        starts) > 1 else {}
    mid_sequence = any(PROMPT < n < PROMPT + total for n in resumed.values())
    say(f"chunks {result.committed}/{result.total}, restarts {result.restarts}, dead letters "
        f"{len(result.dead_letters)}")
    say(f"slot {victim}'s replacement resumed from a checkpoint at cursor {starts[-1] if resumed else 'none'}: "
        + ", ".join(f"sequence {q} at {n} of {PROMPT + total} tokens" for q, n in resumed.items())
        + f" (not regenerated: {sum(max(0, n - PROMPT) for n in resumed.values())} tokens)")
    say(f"every chunk exactly once: {exactly_once}; sequences identical to an uninterrupted greedy "
        f"generation: {same}; resumed mid-sequence: {mid_sequence}")
    first = generated.get(0, {}).get(0, [])
    say("sequence 0, first generated tokens: " + " ".join(str(t) for t in first[:24]))
    say(f"outputs: {sink.url}")
    if victim is None:
        say("the job finished before a worker could be killed: run more --chunks")
        return 2
    return 0 if exactly_once and same and mid_sequence and result.restarts >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
