"""
Streaming inference: the model watches a video one frame per second and decides every second
whether to stay silent or to respond (SPEC sections 1, 3, 6).

    python infer.py --model out/sft-cb --video clip.mp4 --question "Tell me when the square turns red." --ask_at 3
    python infer.py --model out/sft-cb --video clip.mp4 --question "..." --realtime   # paced like a live feed
    python infer.py --model out/sft-cb --ann data/synthetic/test.jsonl               # -> out/sft-cb/preds-test.jsonl
    torchrun --standalone --nproc_per_node=8 infer.py --model CKPT --ann ANN.jsonl   # samples sharded over ranks
    python infer.py --offline_model /models/Qwen2.5-VL-7B-Instruct --ann ANN.jsonl   # SPEC 3's Wait protocol
    python infer.py --backend vllm --model CKPT --ann ANN.jsonl                      # GPU, vLLM with prefix caching
    python infer.py --speed                                                          # O(1)-per-frame benchmark
    python infer.py --speed --compile                                                # + each turn one compiled graph (compiled.py)
    python infer.py --speed --compile --model /tmp/m3b --speed_side 448              # the same on a GPU (python model.py --random ...)
    python infer.py --model out/sft-cb --ann ANN.jsonl --memory decay --max_len 8000 # StreamBridge's round-decayed memory (memory.py)
    python infer.py --model out/sft-cb --ann ANN.jsonl --activation out/act          # StreamBridge's activation model decides (activation.py)
    python infer.py --speed --memory decay --max_len 1500                            # + the decayed memory's row

Each second appends one user turn (time marker, frame, the question when it is asked) to a
persistent KV cache with explicit multimodal (mrope) position ids, then decodes the assistant turn:
one decision token and, after </Response>, the answer up to the end of turn. Decoded tokens stay in
the cache. Several streams advance together in one batched forward; a row whose chunk is shorter
is padded, and its padding slots stay masked out for good.
"""
import argparse
import collections
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch
from transformers import DynamicCache

import activation as A
import compiled
import data
import model as M
import synthetic
from memory import Decay, Features, Window, cat, encode, visual_inputs

DEFAULT_MODEL = "out/sft-cb"
WAIT_PROMPT = (  # SPEC section 3: offline models answer through a decision tree, "Wait" meaning silence
    "You are watching a video stream frame by frame; each frame is labelled with the seconds it covers. "
    "Before the question is asked, just watch and reply Wait. After the question is asked, at every frame follow "
    "these steps. 1. If what you have seen so far is not enough to answer the question without guessing, "
    "reply Wait. 2. Otherwise, if your answer is the same as the last answer you gave, reply Wait. 3. Otherwise "
    "reply with the new or updated answer. Reply with either Wait or the answer, and nothing else."
)


class Streams:
    """n video streams advancing one turn at a time through one batched, incremental KV-cache forward.

    A turn costs one forward of its ~35 tokens (and a decoded token one of 1) against the cache, the ViT of
    its frames, and attention over the row's context. What that context holds as the stream grows, and what
    rebuilding it costs, is its memory's (memory.py, each class with its own cost): memory.Window, the sliding
    window of SPEC section 1 (the default: `window`, `chunk`), or memory.Decay, StreamBridge's round-decayed
    compression (SPEC section 6, --memory decay). A rebuild re-encodes every row from what its memory keeps,
    each frame from the ViT's features kept at its turn (no ViT again).

    With `record`, every row also logs its trajectory as segments of token ids (a segment = one rebuilt prefix +
    the turns appended after it), the exact sequences the policy saw, for GRPO training (grpo.py). They hold every
    turn of the stream, its pixels (Decay: its features) with it; without them a turn that leaves the context is
    freed, and a stream's memory stays bounded however long it runs."""

    def __init__(self, model, fmt, system, n, window=200, chunk=50, turn=None, memory=None, record=False):
        self.model, self.fmt, self.n = model, fmt, n
        self.window, self.chunk = window, max(1, chunk)  # (compiled.StaticTurn sizes its cache from them)
        self.memory = memory or Window(window, chunk)
        self.system = fmt.system_ids(system)
        self.pad = fmt.tok.pad_token_id
        self.cache, self.mask = DynamicCache(), torch.zeros(n, 0, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(n, dtype=torch.long)  # next mrope position of each row
        self.pending = [list(self.system) for _ in range(n)]  # decided tokens not yet in the cache
        self.ctx = [[] for _ in range(n)]  # turns in the cache: {"k", "ids", "pv", "grid", "question", ...}
        self.segments = [[{"prefix": list(self.system), "images": [], "turns": []}] for _ in range(n)] if record else None
        self.cur = [None] * n
        self.rebuilds, self.latency = 0, []  # latency: seconds of each turn (run_streams)
        self.k = 0  # the turn observed next
        # the forward of each turn and decoded token: _forward below, or a compiled.StaticTurn's (--compile)
        self.step = self._forward if turn is None else functools.partial(turn.forward, self)
        self.refill = self._refill if turn is None else functools.partial(turn.refill, self)  # a rebuild's re-encoding

    @torch.no_grad()
    def _forward(self, chunks, images=None):
        """Append per-row token chunks (with the images their placeholders stand for) to the cache.
        Positions: each chunk's own rope index (the model's function) plus the row's running offset,
        so cached logits equal a full-sequence forward (ENVIRONMENT.md: letting the model infer them
        is silently wrong). Returns the logits of each row's last new token (zeros for empty rows)."""
        n, L = len(chunks), max(len(c) for c in chunks)
        dev = self.model.device
        ids = torch.full((n, L), self.pad, dtype=torch.long)
        types = torch.zeros(n, L, dtype=torch.long)
        pos = torch.zeros(3, n, L, dtype=torch.long)
        new = torch.zeros(n, L, dtype=torch.long)
        pvs, grids, rows = [], [], []
        for b, c in enumerate(chunks):
            pos[:, b] = self.pos[b]  # padding slots: any position, they are never attended
            if not c:
                continue
            t = torch.tensor(c)
            ids[b, : len(c)], new[b, : len(c)] = t, 1
            types[b, : len(c)] = (t == self.fmt.image_token_id).long()
            grid = images[b][1] if images and images[b] is not None else None
            if grid is not None:
                pvs.append(images[b][0])
                grids.append(grid)
                rows.append(b)
                p, _ = self.model.model.get_rope_index(t[None], types[b : b + 1, : len(c)], image_grid_thw=grid)
                pos[:, b, : len(c)] = p[:, 0] + self.pos[b]
            else:  # text only (a decoded token): the three mrope axes are plain positions
                pos[:, b, : len(c)] = torch.arange(len(c)) + self.pos[b]
            self.pos[b] = pos[:, b, : len(c)].max() + 1
        self.mask = torch.cat([self.mask, new.to(dev)], 1)  # kept on the device: it grows with the context
        if pvs and not isinstance(pvs[0], Features):  # a turn's frames: the ViT once, its features kept for rebuilds
            pvs = encode(self.model, pvs, grids)
            for b, f in zip(rows, pvs):
                self.cur[b]["vis"] = f
        kw = visual_inputs(pvs, dev) if pvs else {}
        out = self.model.model(input_ids=ids.to(dev), attention_mask=self.mask, position_ids=pos.to(dev),
                               past_key_values=self.cache, use_cache=True, mm_token_type_ids=types.to(dev), **kw)
        self.cache = out.past_key_values
        last = torch.tensor([max(len(c) - 1, 0) for c in chunks])
        return self.model.lm_head(out.last_hidden_state[torch.arange(n), last.to(dev)]).float()

    def _rebuild(self):
        """Re-encode every row's context as its memory keeps it (refill: _refill below, or a compiled.StaticTurn's)."""
        chunks, images = [], []
        for b in range(self.n):
            old, keep = self.ctx[b], self.memory.keep(self, b)
            kept = set(map(id, keep))
            for r in old:
                if id(r) not in kept:
                    self._unsee(r)
            self.ctx[b] = keep
            ids = list(self.system) + [i for r in keep for i in r["ids"]]
            chunks.append(ids)
            images.append(cat([(r["vis"], r["grid"]) for r in keep]) if keep else None)  # as the ViT saw them: no ViT again
            if self.segments is not None:  # what training reads (grpo.py): the pixels (Window), else the features (Decay)
                seen = [(r["vis"] if r["pv"] is None else r["pv"], r["grid"]) for r in keep]
                self.segments[b].append({"prefix": ids, "images": seen, "turns": []})
            self.pending[b] = []
        self.refill(chunks, images)
        self.rebuilds += 1

    @staticmethod
    def _unsee(r):
        """A turn out of the context gives its features back (the device's memory); its pixels stay, what training reads.
        (Decay's turns keep theirs: their features are all they have of their frames.)"""
        if r["pv"] is not None:
            r["vis"] = None

    def close(self):
        """The streams are over: every turn gives its features back (_unsee); a GRPO update holds the turns for a while."""
        for ctx in self.ctx:
            for r in ctx:
                self._unsee(r)

    def _refill(self, chunks, images):
        """The rows' contexts, chunks with their images, re-encoded from empty one row at a time: rows padded to a common
        length made transformers build a dense (n, 1, L, L) mask, 13.5 GB at 16 rows of 29k tokens (issue 19). The rows'
        caches are then right-padded into one."""
        caches, pos = [], torch.zeros(self.n, dtype=torch.long)
        for b in range(self.n):
            self.cache, self.mask, self.pos = DynamicCache(), self.mask[:1, :0], torch.zeros(1, dtype=torch.long)
            self._forward(chunks[b:b + 1], images[b:b + 1])
            caches.append(self.cache)
            pos[b] = self.pos[0]
        L = max(len(c) for c in chunks)
        self.cache, self.pos = DynamicCache(), pos
        self.mask = torch.zeros(self.n, L, dtype=torch.long, device=self.mask.device)
        for b, c in enumerate(chunks):
            self.mask[b, : len(c)] = 1
        for i in range(len(caches[0].layers)):  # layer by layer: the rows' caches are freed as the batch's grows
            kv = [(c.layers[i].keys, c.layers[i].values) for c in caches]
            for c in caches:
                c.layers[i].keys = c.layers[i].values = None
            pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[2]))
            self.cache.update(torch.cat([pad(k) for k, _ in kv]), torch.cat([pad(v) for _, v in kv]), i)

    def observe(self, inputs):
        """inputs: per row (frame uint8 HxWx3, marker, question or None), or None for a row with no
        turn now. Makes each row's user turn, rebuilds the context first if the memory says so, feeds the
        previous turn's pending tokens and this user turn; returns the logits of each row's first assistant token."""
        images = []
        for b, x in enumerate(inputs):
            if x is not None:
                frame, marker, question = x
                pv, grid, n_img = self.fmt.images(frame[None])
                self.cur[b] = {"k": self.k, "marker": marker, "user": self.fmt.user_ids(marker, n_img[0], question), "pv": pv,
                               "grid": grid, "question": question is not None, "content": [], "logp": []}
            images.append((pv, grid) if x is not None else None)
        if self.memory.due(self, [len(self.cur[b]["user"]) if x is not None else 0 for b, x in enumerate(inputs)]):
            self._rebuild()
        self.k += 1
        chunks = []
        for b, x in enumerate(inputs):
            chunks.append(self.pending[b] + self.cur[b]["user"] if x is not None else [])
            if x is not None:
                self.pending[b] = []
        return self.step(chunks, self.memory.see(self, images))

    def feed(self, tokens):
        """One token per row (None: nothing) -> logits after it."""
        return self.step([[t] if t is not None else [] for t in tokens])

    def end_turn(self, b, content, n_fed, logp=None):
        """Row b's assistant turn is `content` (decision token ... end-of-turn token), of which the first
        n_fed tokens are in the cache; the rest and the tail go in with the next turn."""
        r = self.cur[b]
        r.update(content=list(content), logp=list(logp) if logp else [None] * len(content), tail=list(self.fmt.asst_close_tail))
        r["ids"] = r["user"] + r["content"] + r["tail"]
        self.pending[b] = list(content[n_fed:]) + r["tail"]
        self.ctx[b].append(r)
        if self.segments is not None:
            self.segments[b][-1]["turns"].append(r)
        self.cur[b] = None

    def cache_bytes(self):
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None)


# -----------------------------------------------------------------------------
# Decoding one turn for every row: a policy picks tokens, the streams feed them


class Greedy:
    """The first assistant token is the most likely decision token (ours: a stream must decide every
    second, so the choice is among the decision tokens of the format), or </Response> whenever
    p(</Response>) >= threshold; the answer text is greedy. Each call takes the logits of all the rows
    that decode now, (n, V), and returns n tokens and their log-probabilities: one host sync per token
    step for the whole batch, not one per row."""

    def __init__(self, fmt, states=2, threshold=None, max_new=64, never=None):
        self.fmt, self.threshold, self.max_new = fmt, threshold, max_new
        self.dec = [fmt.decision_ids[t] for t in data.STATES[states]]
        self.rsp, self.sil = fmt.decision_ids[data.RESPONSE], fmt.decision_ids[data.SILENCE]
        self.never, self.masks = never, {}  # never: model.vocab_mask, ids no policy emits

    def mask(self, logits, answer=True):
        """The ids to rule out, as a bool (V,) on the logits' device (built once per device): `never`, and
        inside an answer the decision tokens too."""
        key = (logits.device, answer)
        if key not in self.masks:
            m = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            if self.never is not None:
                m |= self.never.to(logits.device)
            if answer:
                m[list(self.fmt.decision_ids.values())] = True
            self.masks[key] = m
        return self.masks[key]

    def first(self, logits):
        dec = torch.tensor(self.dec, device=logits.device)
        if self.threshold is None:
            return dec[logits[:, dec].argmax(-1)].tolist(), [0.0] * len(logits)
        others = dec[dec != self.rsp]
        pick = torch.where(torch.softmax(logits.float(), -1)[:, self.rsp] >= self.threshold, self.rsp, others[logits[:, others].argmax(-1)])
        return pick.tolist(), [0.0] * len(logits)

    def next(self, logits):
        return logits.masked_fill(self.mask(logits), -float("inf")).argmax(-1).tolist(), [0.0] * len(logits)

    def ends_turn(self, first):
        return first != self.rsp


class Answer(Greedy):
    """--activation: the decision is the activation model's (StreamBridge; run_streams keeps the rows where it does not
    fire silent), so every turn decoded here is an answer: </Response>, then greedy text. The main model's own
    decision tokens are not used."""

    def first(self, logits):
        return [self.rsp] * len(logits), [0.0] * len(logits)


class FreeText(Greedy):
    """SPEC section 3's offline-model protocol: the whole turn is free greedy text ("Wait" or an answer)."""

    def first(self, logits):
        return self.next(logits)

    def ends_turn(self, first):
        return first == self.fmt.eos_id


def decode_turn(S, logits, rows, policy, silent=()):
    """Decode the assistant turn of each row in `rows`; `silent` rows are forced to stay silent (the
    decision and the end of turn, log-probability None: not sampled, not trained). Returns
    {row: (content ids, log-probabilities)}."""
    eos = S.fmt.eos_id
    content = {b: [policy.sil, eos] for b in rows if b in silent}
    logp = {b: [None, None] for b in content}
    speak = [b for b in rows if b not in silent]
    live = []
    for b, t, lp in zip(speak, *(policy.first(logits[speak]) if speak else ([], []))):
        content[b], logp[b] = [t], [lp]
        if not policy.ends_turn(t):
            live.append(b)
        elif t != eos:  # a silent turn: its end of turn is forced, nothing to decode
            content[b].append(eos)
            logp[b].append(None)
    for b in rows:
        if b not in live:
            S.end_turn(b, content[b], 0, logp[b])
    while live:
        out = S.feed([content[b][-1] if b in live else None for b in range(S.n)])
        still = []
        for b, t, lp in zip(live, *policy.next(out[live])):
            if len(content[b]) >= policy.max_new:
                t, lp = eos, None  # cut off: the turn is closed (a forced token)
            content[b].append(t)
            logp[b].append(lp)
            if t == eos:
                S.end_turn(b, content[b], len(content[b]) - 1, logp[b])
            else:
                still.append(b)
        live = still
    return {b: (content[b], logp[b]) for b in rows}


def response_text(fmt, content):
    """(decision token, answer text) of an assistant turn's ids."""
    return data.split_decision(fmt.tok.decode(content, skip_special_tokens=False).replace(fmt.tok.decode([fmt.eos_id]), ""))


def memory_of(args):
    """--memory: the sliding window (--window, --chunk) or StreamBridge's round-decayed compression (--max_len)."""
    return Decay(args.max_len) if getattr(args, "memory", "window") == "decay" else Window(args.window, args.chunk)


def gate_for(model, args, n):
    """--activation: the activation model's n streams beside the main model's, on its device (activation.Gate)."""
    act, fmt, threshold = A.load(M.resolve(args.activation), str(model.device), dtype_of(args))
    system = data.SYSTEM_PROMPT_3 if args.states == 3 else data.SYSTEM_PROMPT  # (as sft.py trained it)
    S = Streams(act, fmt, system, n, args.window, args.chunk, memory=memory_of(args))
    return A.Gate(S, threshold if args.act_threshold is None else args.act_threshold)


def run_streams(model, fmt, batch, args, policy=None, on_turn=None, record=False):
    """Stream a batch of (sample, frames) together. Returns per sample {"responses", "p_response"}:
    the responses (decision time, text) and p(</Response>) at every turn's decision position (with --activation:
    the activation model's probability, where the main model answers only if it fires), and the Streams
    (with `record`, their segments: GRPO's rollouts)."""
    offline = getattr(args, "offline_model", False)
    gate = gate_for(model, args, len(batch)) if getattr(args, "activation", None) else None
    policy = policy or (FreeText if offline else Answer if gate else Greedy)(
        fmt, args.states, getattr(args, "threshold", None), args.max_new, M.vocab_mask(model, fmt.tok))
    system = WAIT_PROMPT if offline else data.build_conversation(batch[0][0], 1, states=args.states)["system"]
    turn = compiled.StaticTurn.of(model, len(batch), args.compile) if getattr(args, "compile", None) else None
    S = Streams(model, fmt, system, len(batch), args.window, args.chunk, turn=turn, memory=memory_of(args), record=record)
    out = [{"responses": [], "p_response": [], "decisions": []} for _ in batch]
    q = [data.question_turn(s["query_time"], args.fps) for s, _ in batch]
    rsp = fmt.decision_ids[data.RESPONSE]
    for k in range(max(len(f) for _, f in batch)):
        rows = [b for b, (_, f) in enumerate(batch) if k < len(f)]
        inputs = [(f[k], data.time_marker(k, args.fps), s["question"] if k == q[b] else None) if k < len(f) else None
                  for b, (s, f) in enumerate(batch)]
        t0 = time.perf_counter()  # (after the frames arrived: --realtime waits for them)
        logits = S.observe(inputs)
        early = {b for b in rows if k < q[b]} if args.silent_before_question else set()
        if gate:  # StreamBridge: the main model answers only where the activation model fires
            p = gate.observe(inputs)
            early |= {b for b in rows if p[b] < gate.threshold}
        if offline:  # before the question the offline model only watches: its turn is a forced "Wait"
            turns = {b: (fmt.ids("Wait") + [fmt.eos_id], None) for b in early}
            for b, (content, _) in turns.items():
                S.end_turn(b, content, 0)
            turns.update(decode_turn(S, logits, [b for b in rows if b not in early], policy))
        else:
            turns = decode_turn(S, logits, rows, policy, silent=early)
        probs = p if gate else torch.softmax(logits.float(), -1)[:, rsp].tolist()
        S.latency.append(time.perf_counter() - t0)
        for b in rows:
            content = turns[b][0]
            t = round((k + 1) / args.fps, 6)  # the decision time of turn k
            if offline:
                text = fmt.tok.decode(content, skip_special_tokens=True).strip()
                dec = data.RESPONSE if text.strip(" .!").lower() not in ("wait", "") else data.SILENCE
            else:
                dec, text = response_text(fmt, content)
            said = dec == data.RESPONSE
            out[b]["p_response"].append(round(probs[b], 5))
            out[b]["decisions"].append(dec or data.SILENCE)  # a malformed turn counts as silence
            if said:
                out[b]["responses"].append({"time": t, "text": text})
                if on_turn:
                    on_turn(b, t, text)
    S.close()
    return out, S


# -----------------------------------------------------------------------------
# Batch inference over an annotation file: resumable, sharded over torchrun ranks


def read_done(path):
    """Predictions already written, by id. A line cut short by an interrupted run is dropped (that
    sample is redone) and the file gets its newline back, so appending stays line by line."""
    from metric import read_jsonl
    return {r["id"]: r for r in read_jsonl(path) if isinstance(r, dict) and "id" in r}


def predict_file(args):
    """Predictions for every sample of args.ann, written one JSON line per sample as soon as its
    stream ends; a rerun skips the ids already written; a sample that fails is reported (id, cause)
    in PREDS.errors.jsonl and the others go on, then the run fails naming them (check_failures) unless
    --allow_failed. Under torchrun each rank writes its shard, rank 0 merges."""
    import torch.distributed as dist
    # a directory without a checkpoint is named before anything is written
    M.check_model(args.offline_model or args.model, "--offline_model" if args.offline_model else "--model")
    ddp, rank, world, device = M.setup_dist()
    samples = data.load_annotations(args.ann, check_videos=False)
    final = args.out
    done = read_done(final)
    shard = f"{final}.rank{rank}" if ddp else final
    done.update(read_done(shard))
    todo = [s for s in samples if s["id"] not in done][rank::world]
    todo.sort(key=lambda s: s.get("duration", 0))  # streams of a batch end together
    if rank == 0:
        print(f"{args.ann}: {len(samples)} samples, {len(done)} already predicted, {len(todo)} to go on rank 0 of {world}")
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    if todo and args.backend == "vllm":
        run_batches(*vllm_runner(args, todo), todo, args, shard, rank)
    elif todo:
        model, processor = load_model(args, device)
        fmt = data.ChatFormat(processor, M.frames_per_turn(model))

        def hf(batch):
            outs, S = run_streams(model, fmt, batch, args)
            return outs, S.latency
        run_batches(hf, fmt, todo, args, shard, rank)
    if ddp:
        dist.barrier()
        if rank == 0:  # merge the shards into the final file, in annotation order
            merged = read_done(final)
            for r in range(world):
                merged.update(read_done(f"{final}.rank{r}"))
            with open(final + ".tmp", "w") as f:
                for s in samples:
                    if s["id"] in merged:
                        f.write(json.dumps(merged[s["id"]]) + "\n")
            os.replace(final + ".tmp", final)
            for r in range(world):
                if os.path.exists(f"{final}.rank{r}"):
                    os.remove(f"{final}.rank{r}")
    M.teardown_dist(ddp)  # (all ranks leave together first: an error on rank 0 below leaves no rank waiting)
    if rank == 0:
        check_failures(samples, final, getattr(args, "allow_failed", False))
    return final


def errors_path(preds):
    """PREDS.errors.jsonl: why each sample without a prediction failed (one file for all the ranks' shards)."""
    return os.path.splitext(preds.split(".rank")[0])[0] + ".errors.jsonl"


def check_failures(samples, path, allow_failed=False):
    """After a run, the samples that have no prediction in `path`: PREDS.errors.jsonl is rewritten to hold
    each one's latest error (removed when none is left, so a rerun that streams them leaves no stale one).
    Any such sample ends the run with one line, how many of how many, grouped by reason, unless
    --allow_failed: then it is a warning and bench.py scores them as silent, saying so on its score line.
    The predictions that did stream stay: a rerun keeps them and retries only the failed samples."""
    from metric import read_jsonl
    errors, done = errors_path(path), read_done(path)
    why = {r["id"]: r for r in read_jsonl(errors) if isinstance(r, dict) and "id" in r}
    failed = [why.get(s["id"], {"id": s["id"], "reason": "no prediction", "error": "not streamed"}) for s in samples if s["id"] not in done]
    if not failed:
        if os.path.exists(errors):
            os.remove(errors)
        return
    with open(errors + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in failed)
    os.replace(errors + ".tmp", errors)
    first = {}  # the first sample of each reason, for the message
    for r in failed:
        first.setdefault(r["reason"], r)
    counts = collections.Counter(r["reason"] for r in failed)
    msg = (f"{len(failed)} of {len(samples)} samples failed to stream ("
           + "; ".join(f"{r}: {c}, e.g. {first[r]['id']} {first[r].get('video', '')}".rstrip() for r, c in counts.most_common())
           + f"); their errors are in {errors}, the {len(done)} predictions made in {path}")
    if not allow_failed:
        raise data.UserError(f"{msg}; rerun to stream the failed ones (the others are kept), or pass --allow_failed to score them as silent")
    print(f"warning: {msg}; --allow_failed: bench.py scores them as silent", file=sys.stderr, flush=True)


def run_batches(run, fmt, todo, args, path, rank=0):
    """Stream `todo` in batches of args.streams with `run` (batch of (sample, frames) -> (outputs, per-turn
    latencies): the HF streams or vLLM), appending each prediction to `path` as its batch ends.
    A video that cannot be read is reported and skipped; one whose times disagree with its annotation is
    warned about (data.check_video_times). Ends with the per-turn latency and streams per second."""
    from tqdm import tqdm
    errors = errors_path(path)
    bar = tqdm(total=len(todo), desc=f"streams (rank {rank})", file=sys.stdout)
    latency, t0, n = [], time.time(), 0
    with open(path, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), args.streams):
            batch = []
            for s in todo[i:i + args.streams]:
                try:
                    frames, _ = fmt.video(s["video_path"], args.fps, s.get("duration"))
                    for warning in data.check_video_times(s, data.video_duration(s["video_path"])):
                        print(f"warning: {warning}", file=sys.stderr)
                    batch.append((s, frames))
                except data.VideoError as e:
                    print(f"sample {s['id']}: {e}", file=sys.stderr)
                    reason = str(e).removeprefix(s["video_path"] + ": ").split(" (")[0]  # what check_failures groups by
                    with open(errors, "a") as g:
                        g.write(json.dumps({"id": s["id"], "video": s["video_path"], "reason": reason, "error": str(e)}) + "\n")
                    bar.update(1)
            if not batch:
                continue
            outs, lat = run(batch)
            latency += lat
            for (s, frames), o in zip(batch, outs):
                f.write(json.dumps({"id": s["id"], "responses": o["responses"], "p_response": o["p_response"]}) + "\n")
            f.flush()
            n += len(batch)
            bar.update(len(batch))
    bar.close()
    if latency:
        print(f"rank {rank}: {n} streams in {time.time() - t0:.1f} s, {n / (time.time() - t0):.2f} streams/s; " + latency_line(latency, args.streams))


def latency_line(latency, streams):
    """Per-turn latency of the batched streams: one turn = every stream's frame in and decision out."""
    ms = np.percentile(latency, [50, 90]) * 1000
    return f"per-turn latency p50 {ms[0]:.1f} ms, p90 {ms[1]:.1f} ms (up to {streams} streams per turn)"


def dtype_of(args):
    """--dtype, or bf16 on a GPU and fp32 on a CPU; the same for both backends."""
    return getattr(args, "dtype", None) or ("bfloat16" if torch.cuda.is_available() else "float32")


def load_model(args, device):
    path = args.offline_model if getattr(args, "offline_model", None) else args.model
    dtype = getattr(torch, dtype_of(args))
    model, processor = M.load(path, dtype=dtype, device=device)
    model.eval()
    return model, processor


# -----------------------------------------------------------------------------
# vLLM backend: the same turns, decisions and records as run_streams, through vllm_engine


def vllm_runner(args, todo):
    """(run, fmt) for run_batches with vLLM and prefix caching. Every turn is one greedy decision step
    over the window's prompt (p of each decision token read exactly), and a response is continued to its
    end of turn in a second call; --threshold, --max_new and forced silence before the question as in
    Greedy and decode_turn. Run against the HF backend in test_vllm.py."""
    import vllm_engine as V
    path = M.resolve(args.model)
    fmt = data.ChatFormat(M.Processor.from_pretrained(path), M.frames_per_turn(path))
    system = data.SYSTEM_PROMPT_3 if args.states == 3 else data.SYSTEM_PROMPT
    n_turns = max(data.num_turns(s.get("duration") or data.video_duration(s["video_path"]), args.fps) for s in todo) \
        if args.window <= 0 else args.window + args.chunk + 2
    q_len = max(len(fmt.ids(s["question"])) for s in todo)
    llm = V.make_engine(path, fmt, dtype_of(args), V.max_model_len(fmt, args.window, args.chunk, n_turns, args.max_new, q_len, system),
                        V.turns_in_context(args.window, args.chunk, n_turns), seed=0)
    first = V.decision_params(fmt, args.states)
    rest = V.answer_params(fmt, args.max_new, bias=V.ban(M.vocab_mask(M.vocab_rows(path), fmt.tok).nonzero()[:, 0].tolist()
                                                      + list(fmt.decision_ids.values())))
    names = data.STATES[args.states]
    rsp, eos = fmt.decision_ids[data.RESPONSE], fmt.eos_id

    def decide(lps):
        p = {t: math.exp(lps[fmt.decision_ids[t]].logprob) for t in names}
        if args.threshold is not None:
            return data.RESPONSE if p[data.RESPONSE] >= args.threshold else max((t for t in names if t != data.RESPONSE), key=p.get), p
        return max(names, key=p.get), p

    def run(batch):
        rows = [V.Row(fmt, fmt.system_ids(system), data.question_turn(s["query_time"], args.fps)) for s, _ in batch]
        outs, latency = [{"responses": [], "p_response": [], "decisions": []} for _ in batch], []
        for k in range(max(len(f) for _, f in batch)):
            t0 = time.perf_counter()
            live = [b for b, (_, f) in enumerate(batch) if k < len(f)]
            for b in live:
                s, f = batch[b]
                rows[b].add(f[k][-1], data.time_marker(k, args.fps), s["question"] if k == rows[b].q else None)
            res = llm.generate([rows[b].prompt(args.window, args.chunk) for b in live], first, use_tqdm=False)
            speak = []
            for b, r in zip(live, res):
                dec, p = decide(r.outputs[0].logprobs[0])
                if args.silent_before_question and k < rows[b].q:
                    dec = data.SILENCE
                rows[b].turns[k]["content"] = [fmt.decision_ids[dec], eos]
                outs[b]["p_response"].append(round(p[data.RESPONSE], 5))
                if dec == data.RESPONSE:
                    speak.append(b)
            if speak:
                res = llm.generate([rows[b].prompt(args.window, args.chunk, [rsp]) for b in speak], rest, use_tqdm=False)
                for b, r in zip(speak, res):
                    ids = list(r.outputs[0].token_ids)
                    rows[b].turns[k]["content"] = [rsp] + ids + ([eos] if not ids or ids[-1] != eos else [])
            latency.append(time.perf_counter() - t0)
            for b in live:
                dec, text = response_text(fmt, rows[b].turns[k]["content"])
                outs[b]["decisions"].append(dec or data.SILENCE)
                if dec == data.RESPONSE:
                    outs[b]["responses"].append({"time": round((k + 1) / args.fps, 6), "text": text})
        return outs, latency

    return run, fmt


# -----------------------------------------------------------------------------
# Speed: per-frame latency and memory, cache vs re-encoding everything every second


def speed(args):
    """--model (by default the tiny one), random frames of --speed_side px, --speed_turns turns of one stream, forced
    silence (the per-frame cost of watching). Compares the incremental cache with a window, without one, with
    StreamBridge's round-decayed memory (--memory decay --max_len N), through the compiled turn (--compile), and a
    naive loop that re-encodes the whole context every second. On a GPU where there is one (bf16 unless --dtype);
    each turn's time ends with its decision read back, as a streamed turn's does."""
    torch.manual_seed(0)
    path = (M.latest(DEFAULT_MODEL) or M.ensure_tiny()) if args.model == DEFAULT_MODEL else M.resolve(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = M.load(path, dtype=getattr(torch, dtype_of(args)), device=device)
    model.eval()
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    rng = np.random.default_rng(0)
    side = args.speed_side
    frames = rng.integers(0, 255, (args.speed_turns, fmt.frames_per_turn, side, side, 3), dtype=np.uint8)
    silence = [fmt.decision_ids[data.SILENCE], fmt.eos_id]
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def incremental(runs, repeats=3):
        """runs: name -> (window, chunk, compiled turn or None, memory or None). Each repeat streams every run once,
        in turn, so a busy machine slows them alike; per turn, the fastest of the repeats: OS noise out, rebuilds
        (deterministic) in. Returns name -> (latency per turn, cache bytes per turn, rebuilds, log-probs per turn,
        context tokens per turn, the last Streams)."""
        lat, out = {name: [] for name in runs}, {}
        for _ in range(repeats):
            for name, (window, chunk, turn, memory) in runs.items():
                S = Streams(model, fmt, data.SYSTEM_PROMPT, 1, window, chunk, turn=turn, memory=memory)
                lat[name].append([])
                mem, logp, tokens = [], [], []
                for k in range(args.speed_turns):
                    t = time.perf_counter()
                    logits = S.observe([(frames[k], data.time_marker(k), "Tell me when the square turns red." if k == 0 else None)])
                    int(logits[0].argmax())  # the decision, read back
                    S.end_turn(0, silence, 0)
                    lat[name][-1].append(time.perf_counter() - t)
                    mem.append(S.cache_bytes())
                    tokens.append(int(S.mask[0].sum()))
                    logp.append(torch.log_softmax(logits[0], -1))
                out[name] = (np.min(lat[name], axis=0), np.array(mem), S.rebuilds, torch.stack(logp), np.array(tokens), S)
        return out

    def naive(turns):
        conv = {"system": data.SYSTEM_PROMPT, "q_turn": 0, "turns": [
            {"k": k, "marker": data.time_marker(k), "question": "Tell me when the square turns red." if k == 0 else None,
             "target": data.SILENCE} for k in range(turns)]}
        lat = {}
        for k in (20, 180):
            enc = fmt.encode(dict(conv, turns=conv["turns"][: k + 1]), frames)
            b = data.model_inputs(data.collate([enc], fmt.tok.pad_token_id))
            b = {**{key: v.to(device) for key, v in b.items()}, **M.vision_inputs(model, b["image_grid_thw"], device)}
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                with torch.no_grad():
                    model(**b, logits_to_keep=1)
                sync()
                ts.append(time.perf_counter() - t)
            lat[k] = min(ts)  # the forward alone: tokenising the whole context again would cost more still
        return lat

    W, C = args.window, args.chunk
    print(f"model {path} ({device}, {dtype_of(args)}); {args.speed_turns} turns of one stream, {side}-px frames; window {W}, "
          f"rebuild chunk {C}")
    runs = {"cache + window": (W, C, None, None), "cache, no window": (10**9, 1, None, None)}
    if args.memory == "decay":  # StreamBridge's memory (memory.Decay), in the same run
        runs[f"decay, max_len {args.max_len}"] = (W, C, None, Decay(args.max_len))
    if args.compile:  # the same streams through compiled.StaticTurn (its first turns compile it: the first repeat's)
        runs["compiled + window"] = (W, C, compiled.StaticTurn.of(model, 1, args.compile), None)
    speed_table(incremental(runs), naive(181), args)


def around(t, chunk):
    """The turns speed's "turn t" is the mean of, as a range: whole rebuild periods around t, at least 20 turns."""
    span = chunk * math.ceil(20 / chunk)
    return t - span // 2, t - span // 2 + span


def speed_table(res, nv, args):
    """speed's rows. Turn 20: mean of turns 10-29 (no rebuild yet); turns 180 and 600: means over whole rebuild
    periods around them, so the amortised cost of the rebuilds is in (a span that holds no rebuild would flatter the
    cache); turn 600 needs --speed_turns 613. Cache: the KV cache's peak by turns 50/150/300/600; tokens: the peak context."""
    at20 = lambda lat: float(np.mean(lat[10:30])) * 1000

    def at(lat, t):
        first, end = around(t, args.chunk)
        return float(np.mean(lat[first:end])) * 1000 if end <= len(lat) else float("nan")
    marks = [t for t in (50, 150, 300, 600) if t <= args.speed_turns]
    ms = lambda x: f"{x:.1f}" if x == x else "-"
    print(f"{'':22} {'turn 20 ms':>11} {'turn 180 ms':>12} {'turn 600 ms':>12} {'180/20':>7} {'peak tokens':>12} "
          f"{'peak cache MB by ' + '/'.join(map(str, marks)):>34}")
    for name, (lat, mem, _, _, tokens, _) in res.items():
        a, b = at20(lat), at(lat, 180)
        peaks = "/".join(f"{mem[:t].max() / 2**20:.1f}" for t in marks)
        print(f"{name:22} {a:11.1f} {b:12.1f} {ms(at(lat, 600)):>12} {b / a:7.2f} {tokens.max():12,d} {peaks:>34}")
    print(f"{'re-encode (naive)':22} {nv[20] * 1000:11.1f} {nv[180] * 1000:12.1f} {'-':>12} {nv[180] / nv[20]:7.2f}")
    (lat_w, mem_w, rebuilds, logp_w, *_), mem_n = res["cache + window"], res["cache, no window"][1]
    print(f"at turn 180: cache + window is {nv[180] * 1000 / at(lat_w, 180):.1f}x faster than re-encoding; "
          f"{rebuilds} window rebuilds; median turn without a rebuild {np.median(lat_w[150:]) * 1000:.1f} ms; "
          f"peak cache {mem_w.max() / 2**20:.1f} MB with the window, {mem_n.max() / 2**20:.1f} MB without")
    for name, (lat, mem, n, _, tokens, S) in res.items():
        if name.startswith("decay"):
            kept = sum(f.numel() * f.element_size() for r in S.ctx[0] for f in (r["vis"].embeds, *r["vis"].deep))
            print(f"{name}: {n} compressions; turn 180 {at(lat, 180) / at(lat_w, 180):.2f}x the window's; context at most "
                  f"{tokens.max():,} tokens; at the end {len(S.ctx[0])} turns in context cover {sum(r.get('frames', 1) for r in S.ctx[0])} "
                  f"of the {args.speed_turns} s, "
                  f"their features {kept / 2**20:.2f} MB beside the cache")
    if args.compile:
        lat_c, logp_c = res["compiled + window"][0], res["compiled + window"][3]
        print(f"compiled: turn 180 {at(lat_c, 180) / at(lat_w, 180):.2f}x the eager one, median turn without a rebuild "
              f"{np.median(lat_c[150:]) * 1000:.1f} ms; log-probs of every turn within {(logp_c - logp_w).abs().max():.1e} of the eager ones")


# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (sft.py / grpo.py output) or hub id")
    p.add_argument("--offline_model", default=None, help="an instruction model without decision tokens: SPEC 3's Wait protocol")
    p.add_argument("--ann", default=None, help="annotation JSONL to predict")
    p.add_argument("--out", default=None, help="predictions JSONL (default: MODEL/preds-<ann name>.jsonl)")
    p.add_argument("--video", default=None, help="stream one video file")
    p.add_argument("--question", default=None)
    p.add_argument("--ask_at", type=float, default=0.0, help="seconds into the video the question is asked")
    p.add_argument("--realtime", action="store_true", help="pace the stream at the video's own speed")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="both backends (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--states", type=int, default=2, choices=[2, 3])
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--window", type=int, default=200, help="turns kept besides the question turn (SPEC 5: 200)")
    p.add_argument("--chunk", type=int, default=50, help="turns dropped at once when the window overflows")
    p.add_argument("--streams", type=int, default=8, help="streams decoded together in one batch")
    p.add_argument("--max_new", type=int, default=64, help="most tokens in one answer")
    p.add_argument("--threshold", type=float, default=None, help="respond when p(</Response>) >= this (default: argmax)")
    p.add_argument("--speak_before_question", dest="silent_before_question", action="store_false",
                   help="let the model respond before the question is asked (default: forced silence)")
    p.add_argument("--speed", action="store_true", help="latency/memory benchmark (the tiny model unless --model; on the GPU "
                   "where there is one)")
    p.add_argument("--speed_turns", type=int, default=300)
    p.add_argument("--speed_side", type=int, default=synthetic.SIZE, help="--speed: the random frames' side in pixels "
                   "(default: the synthetic data's; the processor resizes them as it does a video's)")
    p.add_argument("--allow_failed", action="store_true", help="--ann: samples whose video fails are left out (bench.py "
                   "scores them as silent) instead of failing the run")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND", help="HF backend: each turn's "
                   "forward is one compiled graph over a static KV cache (compiled.py; torch.compile's backend, default "
                   "inductor); with --speed, adds its row")
    # StreamBridge (SPEC section 6): its memory, and its activation model gating this one
    p.add_argument("--memory", default="window", choices=["window", "decay"], help="what a stream's context keeps: the "
                   "sliding window (--window, --chunk) or the round-decayed compression (--max_len; memory.py); with --speed, adds its row")
    p.add_argument("--max_len", type=int, default=None, help="--memory decay: the most tokens a stream's context holds at a decision")
    p.add_argument("--activation", default=None, metavar="CKPT", help="an activation model (sft.py --activation) decides when "
                   "--model answers: only on the turns where it fires (activation.py); p_response is then its probability")
    p.add_argument("--act_threshold", type=float, default=None, help="--activation: fire when its probability >= this "
                   "(default: the checkpoint's, chosen on the validation split)")
    return p.parse_args(data.cli_args(argv))


def check_args(args):
    """Flags that cannot work, named before a model loads: sizes, files that exist, --ask_at within the video."""
    data.check_flags(args, positive=("fps", "chunk", "streams", "max_new", "max_len", "speed_side"), non_negative=("window",),
                     fractions=("threshold", "act_threshold"))
    if args.memory == "decay" and args.max_len is None:
        raise data.UserError("--memory decay needs --max_len N: the most tokens a stream's context may hold")
    if args.backend == "vllm" and (args.memory == "decay" or args.activation):
        flag = "--memory decay" if args.memory == "decay" else "--activation"  # (the HF forward takes merged frames as features)
        raise data.UserError(f"{flag} runs on the HF backend (StreamBridge's memory and gate are infer.Streams'): drop --backend vllm")
    if args.speed:
        if args.window == 200:
            args.window, args.chunk = 50, 25  # W=50 over 300 turns; rebuild every W/2 turns
        if args.model != DEFAULT_MODEL:  # (the default falls back to the tiny model where it has not been trained)
            M.check_model(args.model)
        first, end = around(180, args.chunk)
        if args.speed_turns < end:
            raise data.UserError(f"--speed_turns {args.speed_turns}: must be >= {end} (turn 180 is the mean of turns "
                                 f"{first}-{end - 1}, whole rebuild periods of --chunk {args.chunk})")
        return
    if not (args.ann or args.video):
        raise data.UserError("give --ann ANN.jsonl, --video FILE --question TEXT, or --speed")
    if args.video and not args.question:
        raise data.UserError("--video needs --question")
    if args.compile and args.memory == "decay":
        raise data.UserError("--compile runs the window memory (its static cache): drop --memory decay or --compile")
    if args.backend == "vllm" and args.compile:
        raise data.UserError("--compile (a compiled HF turn) runs on the HF backend: drop --backend vllm (vLLM compiles its own)")
    if args.backend == "vllm" and args.offline_model:
        raise data.UserError("--offline_model (the Wait protocol) runs on the HF backend: drop --backend vllm")
    if args.backend == "vllm" and int(os.environ.get("RANK", -1)) != -1:
        raise data.UserError("--backend vllm runs in one process (vLLM spreads a model over GPUs itself): drop torchrun")
    M.check_model(args.offline_model or args.model, "--offline_model" if args.offline_model else "--model")
    if args.activation:
        A.check(args.activation)
    if args.video:
        try:
            seconds = data.video_duration(args.video)
        except data.VideoError as e:
            raise data.UserError(f"--video {e}") from None
        if not 0 <= args.ask_at < seconds:  # (a question after the last frame is never asked: 0 responses, no word)
            raise data.UserError(f"--ask_at {args.ask_at:g}: must be within the video, 0 <= t < {seconds:.1f} s ({args.video})")
    elif not os.path.isfile(args.ann):
        raise data.UserError(f"--ann {args.ann}: annotation file not found")


def main(args):
    check_args(args)
    if args.speed:
        return speed(args)
    if args.video:
        return watch(args)
    args.out = args.out or os.path.join(args.offline_model or args.model, f"preds-{os.path.basename(args.ann).rsplit('.', 1)[0]}.jsonl")
    path = predict_file(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {path}")


def watch(args):
    """Stream one video and print each response as it happens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_model(args, device)
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    frames, _ = fmt.video(args.video, args.fps)
    sample = {"id": os.path.basename(args.video), "question": args.question, "query_time": args.ask_at, "answers": []}
    print(f"{args.video}: {len(frames)} s at {args.fps:g} fps; question at {args.ask_at:g}s: {args.question}")
    start = time.time()

    def show(b, t, text):
        print(f"[{t:7.1f}s] {text}", flush=True)

    class Paced(list):  # frames that arrive no faster than real time
        def __getitem__(self, k):
            if args.realtime:
                time.sleep(max(0.0, start + k / args.fps - time.time()))
            return list.__getitem__(self, k)

    out, S = run_streams(model, fmt, [(sample, Paced(frames) if args.realtime else frames)], args, on_turn=show)
    n = len(out[0]["responses"])
    print(f"done: {n} response{'s' * (n != 1)} in {len(frames)} turns, {time.time() - start:.1f} s; {latency_line(S.latency, 1)}")


if __name__ == "__main__":
    data.run_cli(main, get_args())
