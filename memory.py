"""
What a stream's context holds as it grows, and when infer.Streams rebuilds it: the stream's memory.

    python infer.py --model out/sft-cb --ann data/synthetic/test.jsonl                                # Window (default)
    python infer.py --model out/sft-cb --ann data/synthetic/test.jsonl --memory decay --max_len 1500  # Decay
    python infer.py --speed --memory decay --max_len 1500       # its row beside the window's and the whole cache's

Window is SPEC section 1's sliding window; Decay is StreamBridge's round-decayed compression (SPEC section 6).
Before each turn Streams asks its memory whether the context must be rebuilt (due); a rebuild re-encodes
what the memory keeps of each row (keep) from each kept turn's frame as the ViT saw it at its turn (its
features, `vis`, kept in the turn: encode), which Decay averages. Each class states its own cost.
"""
import types
from typing import NamedTuple

import torch

import data
import model as M


class Window:
    """The system prompt, the question turn and the most recent turns (SPEC section 1). When the turns
    before the current one would number more than `window + chunk` (data.window_start, the schedule the
    vLLM backend shares), every row is rebuilt from its system prompt, its question turn and its last
    `window` turns.

    Cost: one prefill of `window` turns every `chunk + 1` turns, from their frames' features (no ViT): about
    window/chunk turn-prefills of the LM per frame amortised, for `chunk` extra turns of memory (chunk = 1
    re-encodes the window every other second; chunk = window halves the memory's headroom for a single rebuild
    per `window` frames). Memory: the KV of at most window + chunk + 1 turns, their frames' features (N x hidden
    each, 4 such with Qwen3-VL's deepstack levels, on the device) and pixel values (on the host); recording GRPO's
    segments (Streams(record=True)) keeps every turn's pixels, what its training forward reads."""

    def __init__(self, window, chunk):
        self.window, self.chunk = window, max(1, chunk)

    def due(self, S, sizes):
        cut = lambda k: data.window_start(k, self.window, self.chunk)
        return S.k > 0 and cut(S.k) > cut(S.k - 1)

    def see(self, S, images):
        return images  # pixels: the forward runs the ViT, and keeps its features in the turn

    def keep(self, S, b):
        ctx = S.ctx[b]
        q = next((i for i, r in enumerate(ctx) if r["question"]), -1)
        return [ctx[i] for i in data.window_turns(len(ctx), q, self.window)]


class Decay:
    """StreamBridge's round-decayed compression (SPEC section 6). Every turn stays in the context; when a row's
    context and its next user turn would pass `max_len` tokens, adjacent turns of its oldest rounds are merged
    until it holds at most KEEP (2/3) of max_len, and every row is re-encoded.

    Round (ours): what StreamBridge's multi-turn format calls one, <V_i> <A_i>: the turns after a response up to
    and including the next response (before the first: from the start). The question turn is kept whole, as the
    window keeps it, and so are the newest turns that fit in a quarter of max_len (ours; the slides: "preserve
    most recent frame tokens"). Merge (ours): two adjacent turns of a round become one turn of the format, with
    one time marker for the seconds both cover (<4s-6s>), one frame whose visual tokens are the mean of the frames
    it covers, token by token (average pooling over time; weighted by frames, so merging is associative: a turn
    that covers 4 s holds the mean of its 4 frames), and the answer given in it, or else the later decision.
    Order (compress): each pass walks the rounds from the earliest and merges their pairs (1,2), (3,4), ...,
    stopping as soon as the context fits; the next pass starts from the earliest again, so old rounds decay most.
    If the dialogue alone outgrows the budget, the oldest turns are dropped, as the window drops them (ours).

    Positions (ours): a compressed context is a sequence of turns like any other, and is re-encoded from the
    start: each chunk's rope index plus the running offset (Streams._forward), so a merged frame takes one
    temporal step, as any frame does, and the positions after it are renumbered: the time a merged turn covers is
    in its marker, not in its positions. A turn appended after a compression gives the logits of one full forward
    over the compressed sequence (test_decay_turns_equal_full_forward_over_the_compressed_sequence).

    Cost: the ViT runs once per frame (in the forward); its features (N x hidden floats per frame, Qwen3-VL's deepstack
    levels too) are kept for each turn in context instead of its pixels. A compression is host work (merging:
    means of N x hidden) and one re-prefill of every row from features, no ViT: at most 2/3 max_len tokens a
    row, and the next comes after at least max_len/3 tokens of new turns: about 2 turn-prefills per frame
    amortised, however long the stream. With several rows, a compression re-encodes all of them (one batched
    cache, whose length only a rebuild resets); a row under 2/3 max_len is re-encoded unchanged. Memory: at
    most max_len tokens of KV per row when each turn's decision is read (an answer decoded after it may pass
    it by up to --max_new tokens until the next turn), and the features of the turns in context (recording GRPO's
    segments, Streams(record=True), keeps every turn's, on the device: they grow with the stream)."""

    KEEP = 2 / 3  # what a compression leaves of max_len (ours: 2/3 re-encoded once per 1/3 added, as the window at W = 2 chunk)

    def __init__(self, max_len):
        self.max_len = max_len

    def tokens(self, S, b):
        """Row b's context: in the cache, or pending (each turn's ids hold its not yet fed tail)."""
        return len(S.system) + sum(len(r["ids"]) for r in S.ctx[b])

    def due(self, S, sizes):
        return any(n and self.tokens(S, b) + n > self.max_len for b, n in enumerate(sizes))

    def see(self, S, images):
        """The forward runs the ViT once per frame and keeps its features in the turn (S.cur, to be merged later); its
        pixels are not kept."""
        for b, im in enumerate(images):
            if im is not None:
                S.cur[b]["pv"] = None
        return images

    def keep(self, S, b):
        ctx, fmt = S.ctx[b], S.fmt
        size = lambda r: len(r["ids"])
        cut, newest = len(ctx), 0
        while cut and newest + size(ctx[cut - 1]) <= self.max_len // 4:
            cut -= 1
            newest += size(ctx[cut])
        budget = int(self.max_len * self.KEEP) - len(S.system) - newest
        rsp = fmt.decision_ids[data.RESPONSE]
        kept = compress(ctx[:cut], budget, size, lambda x, y: merge(fmt, x, y), lambda r: r["content"][:1] == [rsp],
                        lambda r: r["question"]) + ctx[cut:]
        held = len(S.system) + sum(map(size, kept))
        if held > self.max_len * self.KEEP:  # (only the system prompt, the question turn and the newest turns are left)
            raise data.UserError(f"--max_len {self.max_len}: too small; the system prompt and the turns kept whole (the question "
                                 f"turn, the newest quarter of max_len) take {held} tokens, over 2/3 of it")
        return kept


class Features(NamedTuple):
    """A frame as the LM reads it: the ViT's merged tokens (N, hidden), and Qwen3-VL's deepstack levels (each
    (N, hidden), added inside the LM's first layers; () for Qwen2.5-VL)."""
    embeds: torch.Tensor
    deep: tuple = ()

    @staticmethod
    def mean(parts):
        """The mean of frames' features, token by token: parts [(Features, frames it covers)]."""
        w = torch.tensor([n for _, n in parts], dtype=parts[0][0].embeds.dtype, device=parts[0][0].embeds.device)
        avg = lambda ts: (torch.stack(ts) * w[:, None, None]).sum(0) / w.sum()
        f = [p for p, _ in parts]
        return Features(avg([x.embeds for x in f]), tuple(avg([x.deep[i] for x in f]) for i in range(len(f[0].deep))))

    @staticmethod
    def cat(fs):
        return Features(torch.cat([f.embeds for f in fs]), tuple(torch.cat(level) for level in zip(*[f.deep for f in fs])))


def cat(images):
    """A row's frames (Features, grid) as one forward's: concatenated in order."""
    xs, grids = zip(*images)
    return Features.cat(xs), torch.cat(grids)


@torch.no_grad()
def encode(model, pvs, grids):
    """The ViT once over frames' pixels `pvs` with their grids (all of a turn's rows in one call): their Features, one
    per frame, as the LM reads them and a rebuild re-encodes them."""
    vis, dev, grid = model.model.visual, model.device, torch.cat(grids)
    kw = {k[len("image_"):]: v for k, v in M.vision_inputs(model, grid, dev).items()}  # the ViT's own names
    out = vis(torch.cat(pvs).to(dev).type(vis.dtype), grid_thw=grid.to(dev), **kw)
    sizes = (grid.prod(-1) // vis.spatial_merge_size ** 2).tolist()
    return per_frame((out.pooler_output, *(getattr(out, "deepstack_features", None) or ())), sizes)


def per_frame(parts, sizes):
    """A batch's visual outputs (embeds, deepstack levels...), cut into one Features per frame of `sizes` tokens: each
    its own copy, not a view of the batch's (a row that keeps a turn longer than the others keeps only its own; a CUDA
    graph writes over its outputs at its next replay)."""
    return [Features(e.clone(), tuple(d.clone() for d in deep)) for e, *deep in zip(*(t.split(sizes) for t in parts))]


def visual_inputs(xs, device):
    """The forward's keyword arguments for frames' Features `xs`: the model's precomputed encoder outputs
    (`mm_encoder_outputs`, which both families take in place of pixel values; no ViT)."""
    f = Features.cat(xs)
    out = types.SimpleNamespace(pooler_output=(f.embeds.to(device),), deepstack_features=[(d.to(device),) for d in f.deep])
    return {"mm_encoder_outputs": {"image": out}}


def compress(units, budget, size, merge, ends_round, pinned):
    """Round-decayed compression (Decay), a pure function: `units` oldest first -> fewer units whose sizes sum to
    at most `budget`, where merging, and last dropping, can get there. A round ends after each unit for which
    ends_round(u) holds; a pinned unit (the question turn) is a round of its own, never merged or dropped.
    Each pass walks the rounds from the earliest and merges the adjacent pairs (1,2), (3,4), ... of each round,
    merge(a, b) -> one unit, stopping as soon as the total fits; passes repeat while anything merges."""
    rounds, cur = [], []
    for u in units:
        if pinned(u):
            rounds += [cur, [u]]
            cur = []
        else:
            cur.append(u)
            if ends_round(u):
                rounds.append(cur)
                cur = []
    rounds.append(cur)
    total, merged = sum(map(size, units)), True
    while total > budget and merged:
        merged = False
        for r in rounds:
            i = 0
            while i + 1 < len(r) and total > budget:  # (a pinned unit is a round of one)
                m = merge(r[i], r[i + 1])
                total += size(m) - size(r[i]) - size(r[i + 1])
                r[i:i + 2] = [m]
                i, merged = i + 1, True
            if total <= budget:
                break
    out = [u for r in rounds for u in r]
    while total > budget and any(not pinned(u) for u in out):  # the dialogue alone is over budget: drop the oldest
        total -= size(out.pop(next(i for i, u in enumerate(out) if not pinned(u))))
    return out


def merge(fmt, a, b):
    """Two adjacent turns of a round as one (Decay): the seconds both cover in one marker ("<4s-" + "6s>"), the mean
    of their frames, and a's answer if it is one, else b's turn (its decision, or its answer)."""
    assert torch.equal(a["grid"], b["grid"]), "frames of one stream have one size"
    rsp = fmt.decision_ids[data.RESPONSE]
    said = a if a["content"][:1] == [rsp] and b["content"][:1] != [rsp] else b
    marker = a["marker"].split("-")[0] + "-" + b["marker"].split("-", 1)[1]
    n = a.get("frames", 1) + b.get("frames", 1)
    user = fmt.user_ids(marker, a["vis"].embeds.shape[0])
    return {"k": b["k"], "first": a.get("first", a["k"]), "marker": marker, "user": user, "content": list(said["content"]),
            "tail": list(said["tail"]), "ids": user + said["content"] + said["tail"], "logp": [None] * len(said["content"]),
            "vis": Features.mean([(a["vis"], a.get("frames", 1)), (b["vis"], b.get("frames", 1))]), "frames": n,
            "grid": a["grid"], "pv": None, "question": False}
