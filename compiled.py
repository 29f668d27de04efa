"""
The compiled turn (`python infer.py --compile`): infer.Streams' forward of every turn and of every
decoded token, run over a static KV cache in fixed shapes, so that torch.compile makes one graph of
each (on CUDA, CUDA graphs as mode="reduce-overhead": a replay per turn instead of ~3,000 kernel launches).

    python infer.py --model out/sft-cb --ann data/synthetic/test.jsonl --compile
    python infer.py --speed --compile        # the compiled row beside the eager ones, in the same run

Streams(..., turn=StaticTurn.of(model, n)) hands each forward, and each window rebuild's re-encoding, to the
StaticTurn, which keeps Streams' cache, mask and positions as its own; everything else (turns, decisions,
segments, what a rebuild keeps) stays in Streams. Inside, the model runs forms that do the same sums for less
(_static_forms: its attention over the static cache, its ViT's patch embedding as a matmul).
"""
import contextlib
import functools
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

import data
import model as M
from memory import Features, per_frame


class StaticTurn:
    """The forward of n streams over a static KV cache, in two compiled shapes.

    Shapes: a *turn* is each row's pending tokens and user turn (time marker, one frame) padded to T
    tokens, T being the longest such turn up to the marker of 999 s (past it, of 99,999 s: one recompile);
    a *step* is one decoded token per row. A row with nothing now takes part as a turn of padding (a blank
    frame, every slot masked). Anything else runs the same code eagerly over the same cache: the first turn (system prompt), the
    question turn, a longer chunk, another frame size. So the two graphs are compiled at the first turn
    and the first answer, and never again for this model and n.

    Cache (Slots): `slots` positions per row, sized from the window: the system prompt and window +
    chunk + 2 turns of T (the kept turns, those added until the next rebuild, the question turn), plus
    4 T for answers. Each forward writes its T (or 1) positions from the running offset, which then moves
    by the longest row's chunk, as in Streams: the next forward writes over the padding at the end, and
    a shorter row's padding stays masked out for good. Attention reads the cache up to the end of the
    write, rounded up (Slots.step; the graphs' one dynamic size), not the empty rest.
    Streams' window rebuild re-encodes every row here (refill: one causal forward from empty, eager, as
    Streams._refill without --compile). If long answers fill the cache, it grows x2 (a recompile).

    Cost per turn: one forward of n x T tokens against the used cache (its last layer attending only from
    each row's last token), the ViT of n frames, and on the host the ids, the positions (each chunk's rope
    index looked up by its layout and added to the row's running offset: ENVIRONMENT.md) and their copy to
    the device. No value is read back inside: the caller reads the decision once per turn (Greedy: one
    .tolist()). Each frame's features are kept in its row's turn (_keep). A rebuild: one forward of every row's
    kept context, its frames from those features (no ViT)."""

    def __init__(self, model, n, backend="inductor"):
        """backend: torch.compile's (None: the same code path uncompiled, what costs.py measures)."""
        self.model, self.n, self.dev = model, n, model.device
        self.cache, self.T, self.grid = None, None, None
        self.owner, self.off = None, 0
        self.templates = {}  # a chunk's layout -> its rope positions from 0 (3, L) and the offset it moves
        # inductor: CUDA graphs on a GPU (mode "reduce-overhead"), C++ kernels on a CPU; one graph per shape (dynamic=False),
        # the cache's read span their one dynamic size (Slots.aim). Left out: most of dynamo's guards on the model's modules
        # (_guards) and, on a CPU, inductor's re-checks of the inputs' sizes and alignment
        opts = {"guard_filter_fn": _guards}
        if backend == "inductor" and self.dev.type == "cuda":
            opts.update({"triton.cudagraphs": True})
        elif backend == "inductor":  # (on a GPU the checks stay: a misaligned input fails there)
            opts.update({"size_asserts": False, "alignment_asserts": False})
        compiler = functools.partial(torch.compile, backend=backend, fullgraph=True, dynamic=False, options=opts)
        self.graph = compiler(self._run) if backend else self._run
        self.patches = _Patches(model.model.visual.patch_embed.proj)
        lm = model.model.language_model
        if hasattr(lm, "_deepstack_process") and not isinstance(lm._deepstack_process, functools.partial):
            lm._deepstack_process = functools.partial(_deepstack, lm._deepstack_process)  # Qwen3-VL

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def of(model, n, backend="inductor"):
        """The StaticTurn of (model, n rows): one for all the Streams of a run, so nothing compiles twice."""
        return StaticTurn(model, n, backend)

    @torch.no_grad()
    def forward(self, S, chunks, images=None):
        """Streams._forward's contract: append `chunks` (with their images) to every row; return the logits
        of each row's last new token, (n, V)."""
        if self.cache is None:
            self._allocate(S, images)
        if S is not self.owner:
            self._load(S)
        kind = self._kind(chunks, images, self.T)
        if kind is None and self._widens(S, chunks, images):
            print(f"compiled turn: {self.widest} tokens a turn past 999 s, not {self.T} (one recompile)", file=sys.stderr)
            self.T, kind = self.widest, "turn"
        L = {"turn": self.T, "step": 1}.get(kind) or max(len(c) for c in chunks)
        if self.off + L > self.cache.slots:
            self._resize(max(2 * self.cache.slots, self.off + L), S)
        x = self._inputs(S, chunks, images, L, kind == "turn")
        with _static_forms(self.model, self.patches):
            logits, seen = (self.graph if kind else self._run)(**x)
        self.off += max(len(c) for c in chunks)  # the next forward writes over this one's padding at the end
        if kind and self.dev.type == "cuda":  # a CUDA graph reuses its outputs (seen: copied by _keep)
            logits = logits.clone()
        if seen:
            self._keep(S, images, seen, kind == "turn")
        return logits

    def _keep(self, S, images, seen, turn):
        """Each row's frame as the ViT saw it (its features: embeds, Qwen3-VL's deepstack levels), kept in the row's turn
        for the rebuilds to re-encode (Streams._rebuild); a padding row's blank frame is not (memory.per_frame: copies)."""
        framed = [b for b, im in enumerate(images) if im is not None or turn]  # the rows with a frame in this forward
        sizes = [int(images[b][1].prod()) // S.fmt.merge**2 if images[b] is not None else self.n_img for b in framed]
        for b, f in zip(framed, per_frame(seen, sizes)):
            if images[b] is not None:
                S.cur[b]["vis"] = f

    # -------------------------------------------------------------------------
    # the static memory: allocated once, emptied for each new Streams, refilled after each rebuild

    def _allocate(self, S, images):
        fmt = S.fmt
        pv, self.grid = next(im for im in images if im is not None)
        self.n_img = int(self.grid.prod()) // fmt.merge**2
        self.blank = torch.zeros_like(pv)
        # a user turn and what is pending before it (the decision, end of turn, tail), up to the marker of 999 s first:
        # each padded token is a query in every layer (T for 99,999 s pads a turn at 100 s by 5 tokens, at 20 s by 7)
        self.T, self.widest = (len(fmt.user_ids(data.time_marker(k), self.n_img)) + 2 + len(fmt.asst_close_tail)
                               for k in (999, 99999))
        turns = S.window + S.chunk + 2 if 0 < S.window < 10**5 else 64
        self.cache = Slots(self.model, self.n, -(-(len(S.system) + (turns + 4) * self.T) // 256) * 256)
        self.vision = self._vision([self.grid] * self.n)

    def _resize(self, slots, S):
        print(f"compiled turn: the static cache grows from {self.cache.slots} to {slots} positions (one recompile)",
              file=sys.stderr)
        old, self.cache = self.cache, Slots(self.model, self.n, slots)
        self.cache.put(old, old.valid[:, : self.off], self.off)
        S.cache, S.mask = self.cache, self.cache.valid

    def _load(self, S):
        """A new Streams starts empty."""
        self.cache.put(None, None, 0)
        self.off = 0
        S.cache, S.mask = self.cache, self.cache.valid
        self.owner = S

    @torch.no_grad()
    def refill(self, S, chunks, images):
        """Streams._refill's contract (a window rebuild): every row's context re-encoded from empty. One forward of all the
        rows, each right-padded to the longest: causal with no mask, since a row's padding comes after its tokens; eager
        (its length changes with every rebuild), through the same forms as the turns (_static_forms), from the frames'
        features kept at their turns (no ViT). Positions: each row's from 0, by layout (_whole), as Streams._refill's."""
        if S is not self.owner:
            self._load(S)
        L = max(len(c) for c in chunks)
        if L > self.cache.slots:  # (x2, as forward grows it: at exactly L the next turn would grow it again)
            self._resize(max(2 * self.cache.slots, L), S)
        self.cache.put(None, None, 0)
        x = self._whole(S, chunks, images, L)
        with _static_forms(self.model, self.patches):
            self._run(**x, fresh=True)
        self.off = L  # the next forward writes after the longest row; a shorter row's padding stays masked out

    # -------------------------------------------------------------------------
    # host inputs

    def _kind(self, chunks, images, T):
        """"turn" (fits T tokens), "step" or None (eager, at the chunks' own length)."""
        if not images:
            return "step" if all(len(c) <= 1 for c in chunks) else None
        fits = all((not c and im is None) or (im is not None and len(c) <= T and torch.equal(im[1], self.grid))
                   for c, im in zip(chunks, images))
        return "turn" if fits else None

    def _widens(self, S, chunks, images):
        """Turns without a question that fit only the widest turn: a stream past 999 s."""
        plain = not any(r and r["question"] for r in S.cur)
        return self.T < self.widest and plain and self._kind(chunks, images, self.widest) is not None

    def _inputs(self, S, chunks, images, L, turn):
        """What the forward needs, made on the host; rows' positions advance here."""
        n, img = self.n, S.fmt.image_token_id
        ids = torch.full((n, L), S.pad, dtype=torch.long)
        new = torch.zeros(n, L, dtype=torch.bool)
        pos = S.pos[None, :, None].repeat(3, 1, L)  # padding: any position, it is never attended
        at, pvs, grids = [], [], []
        for b, c in enumerate(chunks):
            im = images[b] if images else None
            if im is not None:
                rel, top = self._template(S, c, im[1])
                at.append(b * L + c.index(img) + torch.arange(int(im[1].prod()) // S.fmt.merge**2))
                pvs.append(im[0])
                grids.append(im[1])
            elif turn:  # a row with no turn now: a blank frame in an all-masked chunk
                at.append(b * L + torch.arange(self.n_img))
                pvs.append(self.blank)
            if not c:
                continue
            if im is None:  # text only (a decoded token): the three mrope axes are plain positions
                rel, top = torch.arange(len(c)), len(c)
            ids[b, : len(c)], new[b, : len(c)] = torch.tensor(c), True
            pos[:, b, : len(c)] += rel
            S.pos[b] += top
        x = {"ids": ids, "new": new, "pos": pos, "last": torch.tensor([max(len(c) - 1, 0) for c in chunks])}
        if pvs:
            x.update(pixel_values=torch.cat(pvs), image_at=torch.cat(at))
        x = self._sent(x, self.off, L)
        if pvs:  # what the ViT derives from the frames' grids
            x["vision"] = self.vision if turn else self._vision(grids)
        return x

    def _whole(self, S, chunks, images, L):
        """refill's inputs: each row's chunk, its frames (Features) anywhere in it, from position 0. Positions: the text
        before the first frame counts up; each span from a frame's first token to the next frame's is looked up by its
        layout (_template) and added to the running offset (the model's function over the whole chunk: ~5 ms at 50 turns)."""
        n, img = self.n, S.fmt.image_token_id
        ids, new = torch.full((n, L), S.pad, dtype=torch.long), torch.zeros(n, L, dtype=torch.bool)
        pos = torch.zeros(3, n, L, dtype=torch.long)  # padding: any position, it is never attended
        at, seen = [], []
        for b, c in enumerate(chunks):
            t = torch.tensor(c)
            ids[b, : len(c)], new[b, : len(c)], is_img = t, True, t == img
            starts = is_img & ~torch.cat([torch.zeros(1, dtype=torch.bool), is_img[:-1]])  # each frame's first token
            ends = starts.nonzero()[:, 0].tolist() + [len(c)]
            pos[:, b, : ends[0]], off = torch.arange(ends[0]), ends[0]
            for i, (s, e) in enumerate(zip(ends, ends[1:])):
                rel, top = self._template(S, c[s:e], images[b][1][i:i + 1])
                pos[:, b, s:e] = rel + off
                off += top
            S.pos[b] = off
            if images[b] is not None:
                at.append(b * L + is_img.nonzero()[:, 0])
                seen.append(images[b][0])
        x = {"ids": ids, "new": new, "pos": pos, "last": torch.tensor([len(c) - 1 for c in chunks])}
        if seen:
            x["image_at"] = torch.cat(at)
        x = self._sent(x, 0, L)
        if seen:
            f = Features.cat(seen)
            x["seen"] = tuple(t.to(self.dev, non_blocking=True) for t in (f.embeds, *f.deep))
        return x

    def _sent(self, x, off, L):
        """_inputs' and _whole's end: the forward's inputs on the device, the cache aimed at off .. off + L."""
        self.cache.aim(off, L)
        return {k: v.to(self.dev, non_blocking=True) for k, v in x.items()}

    def _template(self, S, chunk, grid):
        """A chunk's rope positions from 0 and the offset it moves its row by, kept by layout: the model's
        own function, once per layout (Streams._forward calls it for every chunk)."""
        start = chunk.index(S.fmt.image_token_id)
        key = (len(chunk), start, tuple(grid[0].tolist()))
        if key not in self.templates:
            t = torch.tensor(chunk)
            p, _ = self.model.model.get_rope_index(t[None], (t == S.fmt.image_token_id).long()[None], image_grid_thw=grid)
            self.templates[key] = (p[:, 0], int(p.max()) + 1)
        return self.templates[key]

    def _vision(self, grids):
        """The ViT's keyword arguments for these frames (model.vision_inputs: made on the host, once)."""
        grid = torch.cat(grids)
        made = M.vision_inputs(self.model, grid, self.dev)  # keys as the model's forward takes them: image_...
        return {"grid_thw": grid.to(self.dev), **{k[len("image_"):]: v for k, v in made.items()}}

    # -------------------------------------------------------------------------
    # the forward: compiled for the two shapes, eager otherwise

    def _run(self, ids, new, pos, last, pixel_values=None, image_at=None, vision=None, seen=None, fresh=False):
        """The logits of each row's `last` token, and the frames' features (embeds, Qwen3-VL's deepstack levels): the ViT's
        of `pixel_values` (a turn), or `seen`, the features given (a refill: those kept at the frames' turns)."""
        m = self.model.model
        h = m.get_input_embeddings()(ids)
        extra = {}
        if pixel_values is not None:
            out = m.visual(pixel_values.type(m.visual.dtype), **vision)
            seen = (out.pooler_output, *(getattr(out, "deepstack_features", None) or ()))
        if seen is not None:  # each frame's visual tokens where its placeholders are
            h = h.flatten(0, 1).index_copy(0, image_at, seen[0].to(h.dtype)).view_as(h)
            if len(seen) > 1:
                extra = {"visual_pos_masks": image_at, "deepstack_visual_embeds": list(seen[1:])}
        mask = self.cache.mask(new, fresh)
        out = m.language_model(inputs_embeds=h, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                               use_cache=True, static_read=None if fresh else last, **extra)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return self.model.lm_head(out.last_hidden_state[rows, last]).float(), seen


class Slots:
    """A static KV cache: per layer, keys and values of (n, kv heads, slots, head dim) allocated once and
    written in place, with `valid` (n, slots): the positions that hold a token (not padding, not empty).
    Before each forward, aim() sets where it writes (`at`: offset .. offset + L) and how far attention
    reads (`span`: the positions up to the offset + L, rounded up to `step`; its length is the graph's one
    dynamic size). transformers calls update() in every attention layer."""

    def __init__(self, model, n, slots):
        cfg = model.config.get_text_config()
        heads, dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # one position more than is ever read: a span as long as the tensors would be specialised (recompiled)
        new = lambda: torch.zeros(n, heads, slots + 1, dim, dtype=model.dtype, device=model.device)
        self.layers = [_Layer(new(), new()) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(n, slots + 1, dtype=torch.bool, device=model.device)
        self.positions = torch.arange(slots + 1, device=model.device)
        self.written = torch.zeros(slots + 1, dtype=torch.long, device=model.device)  # `at`'s storage (aim)
        for t in [self.valid, self.positions, self.written] + [t for a in self.layers for t in (a.keys, a.values)]:
            torch._dynamo.mark_static_address(t)  # fixed addresses: CUDA graphs write in place
        # the span grows by `step`: CUDA graphs are recorded once per span, so eight of them there; on a CPU
        # a span costs nothing, and its attention is the turn's largest cost (the tiny model: ~40% of it)
        self.slots, self.used, self.step = slots, 0, -(-slots // 8) if model.device.type == "cuda" else 64

    def aim(self, off, L):
        # from the start of its own buffer, not a view of `positions` at `off`: an input that starts at an odd int64 is
        # misaligned for the GPU kernels inductor generates, which assume 16-byte aligned inputs ("CUDA error:
        # misaligned address" on an H200 after turn 20; a CPU's kernels do not mind)
        self.at = torch.arange(off, off + L, out=self.written[:L])
        self.span = self.positions[: min(self.slots, -(-(off + L) // self.step) * self.step)]
        torch._dynamo.mark_dynamic(self.span, 0)
        self.used = off + L

    def mask(self, new, fresh=False):
        """(n, 1, L, span): a query attends to the valid positions up to its own (causal). Fresh (StaticTurn.refill: every
        row written from position 0, its padding after its tokens): None, plain causal attention (_static_attention)."""
        self.valid.index_copy_(1, self.at, new)
        if fresh:
            return None
        K = self.span.shape[0]
        return self.valid[:, None, None, :K] & (self.span[None, :] <= self.at[:, None])[None, None]

    def update(self, keys, values, layer, *args, **kwargs):
        a, K = self.layers[layer], self.span.shape[0]
        a.keys.index_copy_(2, self.at, keys)
        a.values.index_copy_(2, self.at, values)
        return a.keys[:, :, :K], a.values[:, :, :K]

    def put(self, src, valid, L):
        """Hold the first L positions of `src` (a DynamicCache or Slots; None: nothing) with their mask."""
        self.valid.zero_()
        if src is not None:
            for a, b in zip(self.layers, src.layers):
                a.keys[:, :, :L], a.values[:, :, :L] = b.keys[:, :, :L], b.values[:, :, :L]
            self.valid[:, :L] = valid.bool()
        self.used = L


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


def _guards(entries):
    """Which of dynamo's guards the compiled turn keeps: all but those on the model's modules (their hooks, dicts and
    identities: ~1,000 checks a call, ~0.1 ms on a CPU, for a model that does not change under a StaticTurn), except
    their types and the constants read from them (the config), which say what code the graph is. Every StaticTurn
    compiles the same function (_run), so these are what keep a second model of another architecture (Qwen3-VL after
    Qwen2.5-VL, in one process) from running the first one's graph."""
    keep = ("TYPE_MATCH", "CONSTANT_MATCH", "EQUALS_MATCH")
    return [not e.orig_guard.source.is_unspecialized_nn_module() or e.guard_type in keep for e in entries]


def _static_attention(module, query, key, value, mask, scaling=None, static_read=False, **kwargs):
    """The LM's attention over Slots: SDPA with the cache's boolean mask, or with none after a refill from empty (causal,
    over the new positions only). On a CPU with the model's own kv heads (enable_gqa), where transformers' SDPA path
    repeats each kv head per query head first whenever a mask is given: a copy of all the keys and values read, in
    every layer of every turn (~0.2 ms a layer at 2,000 positions here). A GPU's kernel for a mask (memory-efficient)
    takes no grouped heads: there they are repeated, as transformers does.
    The last layer attends only from the token read after it (`static_read`: each row's last, whose logits are taken;
    None in a refill, which reads nothing): the other tokens' outputs there would go nowhere, their keys and values
    being made before attention. The tiny model's 2 layers make that half the turn's attention; the 3B's 36, 1/36."""
    n, heads, L, dim = query.shape
    if static_read is not False and module.layer_idx == module.config.num_hidden_layers - 1:
        out = query.new_zeros(n, L, heads, dim)
        if static_read is not None:
            rows = torch.arange(n, device=query.device)
            read = _static_attention(module, query[rows, :, static_read, None], key, value, mask[rows, :, static_read, None],
                                     scaling)[0]
            out[rows, static_read] = read[:, 0]
        return out, None
    if mask is None:
        key, value = key[:, :, :L], value[:, :, :L]
    gqa = mask is None or query.device.type == "cpu"
    if not gqa:
        key, value = (repeat_kv(t, query.shape[1] // t.shape[1]) for t in (key, value))
    with sdpa_kernel(_SDPA) if query.device.type == "cuda" else contextlib.nullcontext():  # (a CPU's turn: no cost)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                               is_causal=mask is None, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


# Not cuDNN's attention: inductor picked it for the masked turn on an H200 (torch 2.11), where it failed between turns 20
# and 100 ("mha_graph.execute(...).is_good()"; perhaps from the misaligned `at`, since fixed: Slots.aim). Without it the
# compiled turn took 23 ms a turn there instead of 61 (turn 20), until that misalignment stopped it (STUDY.md: speed)
_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


AttentionInterface.register("static_cache", _static_attention)


@contextlib.contextmanager
def _static_forms(model, patches):
    """Inside, the model runs the forms that suit the static turn, the same sums: its LM's attention is _static_attention,
    its ViT's patch embedding the matmul it is (`patches`). Outside (its eager rows), its own."""
    cfg, embed = model.config.get_text_config(), model.model.visual.patch_embed
    old = cfg._attn_implementation, embed.proj
    cfg._attn_implementation, embed.proj = "static_cache", patches
    try:
        yield
    finally:
        cfg._attn_implementation, embed.proj = old


class _Patches(torch.nn.Module):
    """A ViT's patch embedding, a Conv3d whose kernel is its stride and whose input is one kernel per patch, as the matmul
    it is: mkldnn's conv3d took 0.24 ms for one 84-px frame's 36 patches on this CPU, the matmul 0.04 ms."""

    def __init__(self, conv):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x):
        y = torch.nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)
        return y[:, :, None, None, None]


def _deepstack(original, hidden, where, embeds):
    """Qwen3-VL adds its deepstack features at the visual positions found by a boolean mask (a host sync
    and a graph break). Given their flat indices instead (StaticTurn), the same sums without either."""
    if where.dtype == torch.bool:
        return original(hidden, where, embeds)
    return hidden.flatten(0, 1).index_add(0, where, embeds.to(hidden.dtype)).view_as(hidden)
