"""
What one SFT step and one streamed turn of the real 3B/4B architecture cost on a GPU, measured on a CPU:
the model runs on PyTorch's meta device (shapes, dtypes and sizes only: no weights, no values, no
compiled code) under a dispatch mode that counts what a GPU would do: kernels launched, host syncs
(a value read back: .item(), .tolist(), bool(tensor)), SDPA calls, and the allocated memory (live
storages, rounded to 512 B as the CUDA caching allocator counts them). The streamed turn is also run
through compiled.StaticTurn's code path (infer.py --compile), uncompiled: torch.compile does not run on
the meta device, but what it would be given to capture, and its syncs, are the same. The test suite holds
the budgets (test_core.py, last section); its command line prints them for a user:

    python costs.py qwen2.5-vl-3b --frames 200 --size 448
    python costs.py qwen3-vl-4b --frames 200 --size 448 --world 8

The memory is 'allocated': a lower bound of what nvidia-smi shows (no CUDA context, no allocator cache,
no kernel workspaces). SDPA is routed as an H100/H200 routes it (flash without a mask, memory-efficient
with one): a CPU build would take the math path, which holds the (heads x T x T) scores. A value read
from the device is counted; tensors made from host values (ids, masks, grids) keep them, so the
answer is the GPU's; one that depends on weights is answered with ones.
"""
import argparse
import collections
import contextlib
import functools
import itertools
import weakref

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import compiled
import data
import memory
import model as M

aten = torch.ops.aten
GIB = 2**30
LIMIT = 1 << 20  # tensors up to this many elements keep their values when they can (ids, masks, grids, positions)
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "select",
         "slice", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "narrow", "flatten", "unflatten", "detach",
         "alias", "lift_fresh", "diagonal", "_reshape_alias", "unfold", "view_as_real", "view_as_complex"}
ALLOCS = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "repeat_interleave", "unique_consecutive", "_unique2", "unique_dim"}


class Meter(TorchDispatchMode):
    """Counts the ops on meta tensors (the simulated GPU) and tracks their live storages."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.biggest, self.storages, self.known = 0, 0, 0, {}, {}
        self.reset()

    def reset(self):
        self.kernels, self.syncs, self.sdpa = 0, collections.Counter(), collections.Counter()
        self.peak = self.live

    def track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return
        st = t.untyped_storage()
        if st._cdata in self.storages:
            return
        n = -(-st.nbytes() // 512) * 512
        self.storages[st._cdata] = (n, weakref.ref(st, functools.partial(self._free, st._cdata)))
        self.live += n
        self.peak, self.biggest = max(self.peak, self.live), max(self.biggest, n)

    def _free(self, key, _):
        self.live -= self.storages.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        flat = [t for t in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(t, torch.Tensor)]
        dev = kwargs.get("device")
        to = torch.device(dev).type if dev is not None else None
        on_gpu = any(t.device.type == "meta" for t in flat) or to == "meta"
        if not on_gpu:
            return func(*args, **kwargs)
        if name in ("index", "index_put", "index_put_") and any(t is not None and t.dtype == torch.bool for t in args[1]):
            # a boolean index is a nonzero() on the device, a sync; its size is that of the known mask
            self.syncs["nonzero"] += 1
            mask = lambda t: self.known[id(t)].nonzero().unbind(1) if t is not None and t.dtype == torch.bool else (t,)
            args = (args[0], [self.meta(i) for t in args[1] for i in mask(t)], *args[2:])
            flat = [t for t in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(t, torch.Tensor)]
        value = self.value(func, args, kwargs, flat)
        if name in SYNCS or to == "cpu":  # a value read back by the host
            self.syncs[name] += 1
            if value is None:  # unknowable (it depends on weights): ones, so bool checks pass
                value = torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if name == "_local_scalar_dense" or to == "cpu":
                return value.item() if torch.is_tensor(value) and name == "_local_scalar_dense" else value
            out = pytree.tree_map_only(torch.Tensor, lambda v: v.to("meta"), value)
        else:
            out = func(*args, **kwargs)
        if not (func.is_view or name in VIEWS or name in ALLOCS or func.namespace == "prim"):
            self.kernels += 1
        for o, v in zip(pytree.tree_leaves(out), pytree.tree_leaves(value) if value is not None else itertools.repeat(None)):
            if isinstance(o, torch.Tensor) and o.device.type == "meta":
                self.track(o)
                if isinstance(v, torch.Tensor) and id(o) not in self.known:
                    self.known[id(o)] = v
                    weakref.finalize(o, self.known.pop, id(o), None)
        return out

    def meta(self, t):
        """A host tensor's copy on the simulated device, its values known."""
        if t is None or t.device.type == "meta":
            return t
        with torch.utils._python_dispatch._disable_current_modes():
            out = t.to("meta")
        self.track(out)
        self.known[id(out)] = t
        weakref.finalize(out, self.known.pop, id(out), None)
        return out

    def value(self, func, args, kwargs, flat):
        """The op run on the host copies of its device inputs when all of them are known: ids, masks, grids
        and positions keep their values on the simulated device, as they would on a GPU."""
        if any(t.device.type == "meta" and id(t) not in self.known for t in flat):
            return None
        if any(t.numel() > LIMIT for t in flat):
            return None
        host = lambda t: self.known[id(t)] if t.device.type == "meta" else t
        a, k = pytree.tree_map_only(torch.Tensor, host, (args, kwargs))
        if k.get("device") is not None and torch.device(k["device"]).type == "meta":
            k = {**k, "device": "cpu"}
        try:
            out = func(*a, **k)
        except Exception:
            return None
        ok = all(o.numel() <= LIMIT for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor))
        return out if ok else None


def routed_sdpa(meter):
    """F.scaled_dot_product_attention as a Hopper GPU dispatches it (flash: bf16, no mask, head dim <= 256;
    memory-efficient: a mask, no grouped heads; math otherwise)."""
    sdpa = F.scaled_dot_product_attention

    def route(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta":
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        grouped, small = k.shape[1] != q.shape[1], q.shape[-1] <= 256 and q.dim() == 4
        if q.dtype in (torch.bfloat16, torch.float16) and attn_mask is None and small:
            meter.sdpa["flash"] += 1
            return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[0]
        if not grouped and small:
            meter.sdpa["efficient"] += 1
            bias = attn_mask
            if bias is not None:
                bias = (torch.where(bias, 0.0, float("-inf")).to(q.dtype) if bias.dtype == torch.bool else bias)
                bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            return aten._scaled_dot_product_efficient_attention(q, k, v, bias, q.requires_grad, 0.0, is_causal, scale=scale)[0]
        meter.sdpa["math"] += 1
        return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return route


@contextlib.contextmanager
def simulated_gpu(meter):
    """The meter on, SDPA routed as on the GPU, and the foreach kernels a GPU uses for clipping and AdamW
    and the fused AdamW that sft.py asks for on CUDA (torch reserves them for CUDA-like devices; on meta
they would loop over the 440 tensors, and foreach AdamW holds a temporary copy of its states)."""
    import importlib
    opt = importlib.import_module("torch.optim.optimizer")  # holds its own name for the fused devices
    import torch.utils._foreach_utils as fu
    foreach, fused, sdpa = fu._get_foreach_kernels_supported_devices, fu._get_fused_kernels_supported_devices, F.scaled_dot_product_attention
    fu._get_foreach_kernels_supported_devices = lambda: foreach() + ["meta"]
    fu._get_fused_kernels_supported_devices = opt._get_fused_kernels_supported_devices = lambda: fused() + ["meta"]
    F.scaled_dot_product_attention = routed_sdpa(meter)
    tensor = torch.tensor

    def host_copy(data, *a, device=None, **k):  # torch.tensor(values, device=GPU): made on the host, copied over
        if isinstance(data, (list, tuple)):  # device scalars among the values: each one read back (a sync)
            data = pytree.tree_map_only(torch.Tensor, lambda t: t.item(), data)
        if device is None or torch.device(device).type != "meta":
            return tensor(data, *a, device=device, **k)
        meter.kernels += 1
        return meter.meta(tensor(data, *a, **k))
    torch.tensor = host_copy
    try:
        with meter:
            yield meter
    finally:
        torch.tensor = tensor
        fu._get_foreach_kernels_supported_devices = foreach
        fu._get_fused_kernels_supported_devices = opt._get_fused_kernels_supported_devices = fused
        F.scaled_dot_product_attention = sdpa


def build(name, size):
    """The released architecture `name` (model.REAL) on the meta device in bf16, set up as model.load
    sets it up, and a ChatFormat whose frames are meta tensors of the grid a `size`-px frame gets."""
    from transformers import Qwen2VLImageProcessorPil
    tok = M.tiny_tokenizer()
    M.add_decision_tokens(None, tok)
    family, text, vision = M.REAL[name]
    config, cls, patch = M.make_config(family, text, vision, tok, M.REAL_VOCAB)
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": M.MIN_PIXELS, "longest_edge": M.MAX_PIXELS})
    with torch.device("meta"):
        model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.config.vision_config._attn_implementation = "flash_windows"
    M.add_decision_tokens(model, tok)
    for n, p in model.model.visual.named_parameters():
        p.requires_grad = "merger" in n
    fmt = data.ChatFormat(M.Processor(tok, ip, M.CHAT_TEMPLATE), 1)
    h, w = data.smart_resize(size, size, fmt.factor, M.MIN_PIXELS, M.MAX_PIXELS)
    grid, row = [1, h // patch, w // patch], 3 * 2 * patch**2

    def images(chunks):
        n = len(chunks)
        return torch.empty(n * grid[1] * grid[2], row, device="meta"), torch.tensor([grid] * n), [grid[1] * grid[2] // 4] * n
    fmt.images = images
    return model, fmt


def conversation(fmt, frames):
    """A streaming SFT conversation of `frames` one-frame turns: the question at turn 10, an answer every 40 s."""
    q = min(10, frames - 1)
    answers = [{"time": float(t), "text": "The red square moved to the top left corner of the frame."} for t in range(q + 20, frames, 40)]
    s = {"id": "x", "query_time": float(q), "answers": answers, "question": "Tell me every time the red square moves.",
         "duration": float(frames)}
    return fmt.encode(data.build_conversation(s, frames, 1.0, 2), np.zeros((frames, 1, 1, 1, 3), np.uint8))


def sft_step(model, fmt, frames):
    """One SFT micro-batch as sft.py runs it for the presets without FSDP (bf16 parameters, LM checkpointed,
    ViT frozen, CB-Stream loss, fused AdamW): forward, backward, clipping and the AdamW step. Two steps are
    run: the first creates the AdamW states (its peak is `first`); the meter holds the second, the
    steady state, whose forward and backward run beside the states. Returns (meter, first, batch)."""
    import sft
    from losses import sft_loss
    args = sft.get_args(["--grad_ckpt", "--lr", "1e-5"])
    meter = Meter()
    for t in list(model.parameters()) + list(model.buffers()):
        meter.track(t)
    item = conversation(fmt, frames)
    dec = [fmt.decision_ids[t] for t in data.STATES[2]]
    with simulated_gpu(meter):
        dmodel, opt, params = sft.make_optimizer(model, args, False, "cuda")  # "cuda": fused AdamW, as on a GPU
        counts, n_sup, _ = sft.global_totals([item], dec, False)
        for step in range(2):
            if step:
                first = meter.peak
                meter.reset()
            logits, y, _ = sft.supervised_logits(dmodel, data.collate([item], fmt.tok.pad_token_id), "meta", contextlib.nullcontext())
            loss = sft_loss("cb", logits, y, dec, counts=counts, num_items=n_sup)
            with torch.autograd.set_multithreading_enabled(False):
                loss.backward()
            del logits, loss
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return meter, first, item


def streamed_turn(model, fmt, turns=3, rows=1, turn=None):
    """Silent turns of infer.Streams (a frame, a decision, its end of turn); the last one is measured.
    turn: a compiled.StaticTurn (infer.py --compile) to run them through."""
    import infer
    model.eval()
    frame = np.zeros((1, 8, 8, 3), np.uint8)
    meter = Meter()
    for t in list(model.parameters()) + list(model.buffers()):
        meter.track(t)
    policy, sil = infer.Greedy(fmt, 2), [fmt.decision_ids[data.SILENCE], fmt.eos_id]
    with simulated_gpu(meter), torch.no_grad():
        S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, rows, 200, 50, turn=turn)
        for k in range(turns):
            meter.reset()
            logits = S.observe([(frame, data.time_marker(k), "Tell me when it moves." if k == 1 else None)] * rows)
            policy.first(logits)
            for b in range(rows):
                S.end_turn(b, sil, 0)
    return meter, S


def rebuild(model, fmt, rows=16, window=200, chunk=50):
    """infer.Streams' window rebuild as a GRPO rollout reaches it (turn window + chunk + 1) with `rows`
    streams: every row holds window + chunk + 1 turns, silent but for one answer of a different length in
    each row (rows of unequal length, as sampled rollouts are), then _rebuild. Returns (meter, longest row)."""
    import infer
    model.eval()
    meter = Meter()
    for t in list(model.parameters()) + list(model.buffers()):
        meter.track(t)
    with simulated_gpu(meter), torch.no_grad():
        S = infer.Streams(model, fmt, data.SYSTEM_PROMPT, rows, window, chunk)
        pv, grid, n_img = fmt.images(np.zeros((1, 1, 8, 8, 3), np.uint8))
        vis = memory.encode(model, [pv], [grid])[0]  # the frame's features, as its turn keeps them for the rebuild
        for b in range(rows):
            for k in range(window + chunk + 1):
                u = fmt.user_ids(data.time_marker(k), n_img[0], "Tell me when it moves." if k == 1 else None)
                content = [fmt.decision_ids[data.SILENCE], fmt.eos_id] if k != window else \
                    [fmt.decision_ids[data.RESPONSE], *fmt.ids(" It moved." * (b + 1)), fmt.eos_id]
                S.ctx[b].append({"user": u, "content": content, "tail": list(fmt.asst_close_tail), "pv": pv, "grid": grid,
                                 "vis": vis, "question": k == 1, "ids": u + content + list(fmt.asst_close_tail)})
        meter.reset()
        S._rebuild()
    return meter, S.mask.shape[1]


def memory_split(model):
    """Bytes of the parameters, of the gradients and AdamW states of the trained ones (both in the
    parameters' dtype), and the largest decoder layer's parameters."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    layer = max(sum(p.numel() * p.element_size() for p in lay.parameters()) for lay in model.model.language_model.layers)
    return params, 3 * trained, layer


def estimate(name, frames, size, world=1):
    """Print what one SFT step and one silent streamed turn cost on one GPU (see the module docstring)."""
    model, fmt = build(name, size)
    sizes = M.flop_sizes(model)
    meter, first, item = sft_step(model, fmt, frames)
    T, grid = len(item["input_ids"]), item["image_grid_thw"]
    n_patches = int(grid.prod(-1).sum())
    flops = M.train_flops(sizes, [T], n_patches)
    params, states, layer = memory_split(model)
    peak = meter.peak
    if world > 1:  # the presets' FSDP2: fp32 parameters, gradients and AdamW states sharded; two decoder layers
        peak = peak - (params + states) + 2 * (params + states) / world + 2 * layer  # gathered in bf16 (one prefetched)
    print(f"{name}: {frames} frames of {size} px -> {grid[0, 1] * grid[0, 2] // 4} visual tokens per frame, {T:,} tokens; "
          f"LM checkpointed, ViT frozen, AdamW")
    print("  memory is ALLOCATED memory, a lower bound: no CUDA context, no allocator cache, no kernel workspaces")
    where = (f"FSDP over {world} GPUs as the presets run it: fp32 parameters, gradients and AdamW states "
             f"({2 * (params + states) / GIB:.1f} GiB in all) counted 1/{world} on each GPU, plus 2 decoder layers gathered "
             f"in bf16 ({2 * layer / GIB:.2f} GiB); the bf16 activations whole" if world > 1 else "one GPU, no FSDP, bf16 parameters")
    print(f"  SFT step: peak {peak / GIB:.2f} GiB allocated per GPU in a step after the first ({where})"
          + ("" if world > 1 else f"; in the first step, which creates the AdamW states at its end: {first / GIB:.2f} GiB"))
    print(f"            {flops / 1e12:,.0f} TFLOP (model.train_flops); {meter.kernels:,} kernels, {sum(meter.syncs.values())} host syncs, "
          f"{sum(meter.sdpa.values())} SDPA calls")
    meter, S = streamed_turn(model, fmt)
    L = S.mask.shape[1]
    n_lm, n_vit, layers, width = sizes
    turn_tokens = len(S.ctx[0][-1]["user"]) + 2
    tflop = (2 * n_lm * turn_tokens + 4 * layers * width * turn_tokens * L + 2 * n_vit * int(grid[0].prod())) / 1e12
    print(f"  streamed turn (silent, one stream, KV cache of {L} tokens, whole model on one GPU): peak {meter.peak / GIB:.2f} GiB "
          f"allocated; {tflop:.2f} TFLOP; {meter.kernels:,} kernels, {sum(meter.syncs.values())} host syncs (the decision's read-back included)")
    meter, S = streamed_turn(model, fmt, turn=compiled.StaticTurn(model, 1, backend=None))
    print(f"  the same turn through compiled.StaticTurn (infer.py --compile), uncompiled (torch.compile does not run on the meta "
          f"device): {sum(meter.syncs.values())} host sync, the decision's read-back, none inside the forward (so one CUDA graph "
          f"can hold it); {meter.kernels:,} kernels before inductor fuses them; static KV cache of {S.mask.shape[1] - 1:,} "
          f"positions (--window 200 --chunk 50): peak {meter.peak / GIB:.2f} GiB allocated")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(M.REAL), help="the released architecture (model.REAL), with no weights")
    p.add_argument("--frames", type=int, default=200, help="one-frame turns in the conversation")
    p.add_argument("--size", type=int, default=448, help="frame side in pixels, before the processor's resize")
    p.add_argument("--world", type=int, default=1, help="GPUs under FSDP")
    a = p.parse_args(data.cli_args())
    data.check_flags(a, positive=("frames", "size", "world"))
    estimate(a.name, a.frames, a.size, a.world)


if __name__ == "__main__":
    data.run_cli(main)
