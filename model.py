"""
Model and processor loading shared by sft.py, grpo.py and infer.py, the distributed setup they share,
and the stand-in models that need no download.

    python model.py --tiny qwen2_5_vl --out out/tiny-qwen2_5_vl      # random tiny Qwen2.5-VL + tokenizer (CPU default)
    python model.py --tiny qwen3_vl --out out/tiny-qwen3_vl
    python model.py --tiny qwen2_5_vl --frames_per_turn 1 --out out/tiny1-qwen2_5_vl  # one frame per turn (vLLM)
    python model.py --random qwen2.5-vl-3b --out /tmp/m3b              # the real architecture, random weights (GPU checks)
    python model.py --random qwen3-vl-4b --out /tmp/m4b
    python model.py --show 1                                       # one training conversation as the model reads it
    python model.py --show 1 --states 3 --split val --model out/tiny-qwen2_5_vl

`load` takes a local directory or a hub id (Qwen2.5-VL-3B-Instruct, Qwen3-VL-4B-Instruct, a checkpoint
written by sft.py or grpo.py, or a model made here) and returns (model, processor) with the decision
tokens in the vocabulary and the vision encoder frozen, as both papers train.
"""
import argparse
import contextlib
import functools
import itertools
import json
import os
import shutil

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForImageTextToText

import data
import synthetic
from data import DECISION_TOKENS, cli_args

MIN_PIXELS, MAX_PIXELS = 3136, 100352  # SPEC section 1: at most 128 visual tokens per frame


class Processor:
    """What the scripts use of a HF processor: tokenizer, image processor and chat template. Built
    from those parts because AutoProcessor also insists on the video processor, which needs
    torchvision, and torchvision cannot be installed beside the CPU torch (ENVIRONMENT.md). Frames
    always enter as images (one per turn, SPEC section 1), so the video processor is never needed."""

    def __init__(self, tokenizer, image_processor, chat_template, video_config=None):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template
        self.video_config = video_config  # the source's video processor config, carried into checkpoints
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    @classmethod
    def from_pretrained(cls, path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
        from transformers import AutoImageProcessor, AutoTokenizer
        from transformers.utils import cached_file
        tok = AutoTokenizer.from_pretrained(path)
        ip = AutoImageProcessor.from_pretrained(path)
        ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        template = tok.chat_template  # the processor's own template file wins where there is one
        for name in ("chat_template.jinja", "chat_template.json"):
            f = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
            if f:
                text = open(f).read()
                template = json.loads(text)["chat_template"] if name.endswith("json") else text
                break
        if template is None:
            raise ValueError(f"{path}: no chat template found (chat_template.jinja/.json or in the tokenizer)")
        return cls(tok, ip, template, cached_file(path, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def save_pretrained(self, out):
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:
            f.write(self.chat_template)
        if self.video_config:  # AutoProcessor and vLLM read it; carried over from the model we started from
            shutil.copy(self.video_config, os.path.join(out, "video_preprocessor_config.json"))


def load(path, dtype=torch.float32, device="cpu", attn="sdpa", freeze_vision=True,
         min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    path = resolve(path)
    processor = Processor.from_pretrained(path, min_pixels, max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
    if "flash" not in attn:  # the ViT's windows and frames batched into one attention call (window_attention)
        model.config.vision_config._attn_implementation = "flash_windows"
    add_decision_tokens(model, processor.tokenizer)
    if freeze_vision:  # the ViT stays frozen; the merger (projector) and the LLM are trained
        # (ours) except a tiny model's projector, which is random: Adam's steps on it (even at 1e-4)
        # scrambled the visual tokens faster than the LM learned to read them (STUDY.md: tiny models)
        tiny = getattr(model.config, "streampro_tiny", False)
        for name, p in model.model.visual.named_parameters():
            p.requires_grad = "merger" in name and not tiny
    return model, processor


def resolve(path):
    """The directory to load for `path`: its checkpoint (or `path.old`, when a save was cut off mid-swap),
    a hub id as it is, or an error that says what a local directory holds instead of a checkpoint (a run
    that died before its first save leaves only log.jsonl)."""
    path = os.fspath(path)
    found = latest(path)
    if found:
        return found
    local = os.path.isdir(path) or path.startswith((".", "/", "~")) or os.path.isdir(os.path.dirname(path) or ".")
    if not local:
        return path  # a hub id ("org/name")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    held = ", ".join(sorted(os.listdir(path))) or "nothing"
    cut = f"; {path}.tmp is a save that was cut off before it finished" if os.path.isdir(path + ".tmp") else ""
    raise FileNotFoundError(f"{path} holds no checkpoint (no config.json); it holds: {held}{cut}")


def check_model(path, flag="--model"):
    """resolve(path) for a flag checked before any work starts: a missing directory, or one without a
    checkpoint, is bad input that names the flag."""
    try:
        return resolve(path)
    except FileNotFoundError as e:
        raise data.UserError(f"{flag} {e}") from None


def window_attention(module, q, k, v, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     attention_plans=None, **kw):
    """The vision tower's attention over its windows (Qwen2.5-VL) or frames (Qwen3-VL), listed by
    `cu_seq_lens_q`, with one SDPA call per distinct segment length instead of one per segment: the
    default made 51,492 calls per forward for a 200-frame conversation (ENVIRONMENT.md). transformers
    hands cu_seqlens to an attention function whose name contains "flash". The layout comes from
    `attention_plans` (vision_inputs: made on the host, keyed by the number of segments, which a layer
    knows without reading the device) or else from one read of the lengths, kept on the tensor for the
    other layers. q, k, v: (1, heads, S, dim); returns (1, S, heads, dim), equal to the per-window loop."""
    plan = (attention_plans or {}).get(cu_seq_lens_q.shape[0] - 1) or getattr(cu_seq_lens_q, "plan", None)
    if plan is None:
        plan = cu_seq_lens_q.plan = attention_plan(cu_seq_lens_q.diff().tolist(), q.device)
    order, inverse, groups = plan
    _, H, S, D = q.shape
    if order is not None:
        q, k, v = (t[:, :, order] for t in (q, k, v))
    out = q.new_empty(S, H, D)
    for a, n, L in groups:  # equal segments lie back to back: views, no copy
        f = lambda t: t[0, :, a:a + n * L].reshape(H, n, L, D).transpose(0, 1)
        o = F.scaled_dot_product_attention(f(q), f(k), f(v), scale=scaling)
        out[a:a + n * L].view(n, L, H, D).copy_(o.transpose(1, 2))
    return (out if order is None else out[inverse])[None], None


def attention_plan(lengths, device, order=None):
    """(order, inverse, groups): how window_attention runs segments of `lengths` tokens lying back to
    back (after the token permutation `order`, if given): sorted by length, longest first, so equal ones
    lie together; `order` the permutation that does it and `inverse` its undoing (None when nothing
    moves), `groups` (start, count, length) in that layout."""
    starts = [0, *itertools.accumulate(lengths)][:-1]
    by = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    if by != sorted(by):
        perm = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in by])
        order = perm if order is None else order[perm]
    groups, a = [], 0
    for L, run in itertools.groupby(lengths[i] for i in by):
        n = len(list(run))
        groups.append((a, n, L))
        a += n * L
    if order is None:
        return None, None, groups
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return order.to(device), inverse.to(device), groups


def vision_inputs(model, grid, device):
    """What the vision tower derives from image_grid_thw `grid` (a host tensor), computed on the host (see
    _vision_inputs), kept for the grids seen last: a stream's turns, a batch's micro-batches repeat them."""
    return _vision_inputs(unwrap(model).model.visual, tuple(map(tuple, grid.tolist())), str(device))


@functools.lru_cache(maxsize=16)
def _vision_inputs(visual, grid, device):
    """What the vision tower derives from image_grid_thw `grid`, computed here on the host with
    transformers' own functions, as keyword arguments of the model's forward (transformers
    strips the image_ prefix, accepts_precomputed_kwargs; FSDP and DDP carry them to the device). On the
    device they cost ~10 host syncs and hundreds of small kernels per forward, and model.window_attention
    read the window lengths in every layer (issue 19). Qwen2.5-VL's windows are put in order of length,
    so equal windows lie together in every windowed layer; its 4 full-attention layers gather the frames."""
    from transformers import vision_utils as V
    grid = torch.tensor(grid)
    merge, unit = visual.spatial_merge_size, visual.spatial_merge_size ** 2
    cu = V.get_vision_cu_seqlens(grid)
    frames = cu.diff()
    out = {"position_ids": V.get_vision_position_ids(grid, merge), "cu_seqlens": cu, "max_seqlen": int(frames.max())}
    plans, order = {}, None
    if hasattr(visual, "window_size"):
        index, cu_w = V.get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
        sizes = (cu_w.diff() // unit).tolist()
        runs = sorted(zip(torch.split(index, sizes), sizes), key=lambda r: -r[1])
        index, windows = torch.cat([r for r, _ in runs]), torch.tensor([n for _, n in runs]) * unit
        out.update(window_index=index, cu_window_seqlens=F.pad(windows.cumsum(0), (1, 0)).int(),
                   max_window_seqlen=int(windows.max()))
        if len(frames) not in (1, len(windows)):  # (a frame that is one window: the window plan serves both)
            frame_of = torch.repeat_interleave(torch.arange(len(frames)), frames // unit)[index]
            order = (torch.argsort(frame_of, stable=True)[:, None] * unit + torch.arange(unit)).flatten()
        plans[len(windows)] = attention_plan(windows.tolist(), device)
    else:
        out["interp_indices"], out["interp_weights"] = V.get_vision_interpolation_indices_and_weights(
            grid, visual.num_grid_per_side, visual.interpolation_mode, visual.interpolation_align_corners, merge)
    if len(frames) not in plans:
        plans[len(frames)] = attention_plan(frames.tolist(), device, order)
    out = {"image_" + k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}
    out["image_attention_plans"] = plans
    return out


def rope_positions(model, input_ids, mm_token_type_ids, image_grid_thw, attention_mask):
    """The LM's mrope position ids (3, B, L) of a right-padded batch, computed on the host by the model's
    own function: on the device it costs ~4 .item() calls and ~15 kernels per image (806 host syncs
    in a 201-frame SFT step, issue 19). Padding positions are 0, as the model sets them."""
    return unwrap(model).model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                              attention_mask=attention_mask)[0]


AttentionInterface.register("flash_windows", window_attention)


def add_decision_tokens(model, tok):
    """Add </Silence> </Standby> </Response> as single special tokens (all three, so one checkpoint
    serves both the 2- and 3-state formats): add_special_tokens."""
    add_special_tokens(model, tok, DECISION_TOKENS)


def add_special_tokens(model, tok, tokens):
    """Add `tokens` as single special tokens (the decision tokens; activation.py's <ACT>) and give their embeddings
    the mean of the existing ones. Real Qwen checkpoints have spare embedding rows beyond len(tokenizer): new ids
    land there and the matrix keeps its size; a tiny model's matrix is grown to fit. `model` None: a tokenizer alone."""
    new = [t for t in tokens if t not in tok.get_vocab()]
    if not new:
        return
    n_old = len(tok)
    tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    if model is None:  # a tokenizer alone (show)
        return
    emb = model.get_input_embeddings()
    if len(tok) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        ids = tok.convert_tokens_to_ids(new)
        for e in {model.get_input_embeddings(), model.get_output_embeddings()}:
            e.weight[ids] = e.weight[:n_old].mean(0)


@contextlib.contextmanager
def logits_at(model, keep):
    """Within the block, the model's forward returns logits (1, N, V) at the N True positions of the
    bool (B, L) mask `keep` only (row-major order), not (B, L, V): a conversation's whole logits
    (29k x 152k in fp32 at 3B) were the first out-of-memory on a GPU. A forward pre-hook on lm_head
    selects its input rows, inside the wrapped forward (DDP, FSDP2 and checkpointing see one ordinary
    forward); transformers' own 2-D `logits_to_keep` exists only from 5.23, and vLLM needs < 5.21."""
    rows = keep.reshape(-1).nonzero()[:, 0]  # on the host when `keep` is: a boolean index on the device is a sync
    handle = unwrap(model).lm_head.register_forward_pre_hook(lambda m, a: (a[0].flatten(0, 1)[rows.to(a[0].device)][None],))
    try:
        yield
    finally:
        handle.remove()


def frames_per_turn(model_or_path):
    """Frames in one turn's visual chunk, as the model was built and trained (data.load_video): 1 for
    the paper's models, 2 for the tiny ones (ours, see there)."""
    if isinstance(model_or_path, str):
        with open(os.path.join(model_or_path, "config.json")) as f:
            return json.load(f).get("streampro_frames_per_turn", 1)
    return getattr(unwrap(model_or_path).config, "streampro_frames_per_turn", 1)


def unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 keeps it in place


# -----------------------------------------------------------------------------
# torchrun, and what a log line says about the hardware (shared by sft.py, grpo.py, infer.py)


def setup_dist():
    """(ddp, rank, world, device) under torchrun, or (False, 0, 1, device) for one process. One process
    group serves both kinds of tensor, NCCL for CUDA ones and gloo for CPU ones (counters, objects): the
    first GPU run stopped at an all_reduce of a CPU tensor under NCCL alone. On a CPU it is gloo alone."""
    import torch.distributed as dist
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("cuda:nccl,cpu:gloo")
        device = f"cuda:{local}"
    else:
        dist.init_process_group("cpu:gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        device = "cpu"
    return True, dist.get_rank(), dist.get_world_size(), device


def teardown_dist(ddp):
    """Leave together: every rank waits until the others are done (rank 0 writes the checkpoints alone)
    before the group is destroyed, so no process exits while another still works or talks to it."""
    import torch.distributed as dist
    if ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


H100_PEAK_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s of one H100 SXM


def flop_sizes(model):
    """(LM layer parameters, ViT parameters, layers, attention width): what train_flops needs of a model.
    The attention width is heads x head_dim, which is not the hidden size in Qwen3-VL-4B (32 x 128 = 4096
    against 2560)."""
    m, text = unwrap(model).model, unwrap(model).config.text_config
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    return (sum(p.numel() for p in m.language_model.layers.parameters()), sum(p.numel() for p in m.visual.parameters()),
            text.num_hidden_layers, width)


def train_flops(sizes, seq_lens, n_patches):
    """FLOPs of one forward + backward over sequences of `seq_lens` tokens with `n_patches` ViT patches,
    nanoGPT's estimate: 6 N per token for the N parameters of the LM's layers (forward 2N, backward 4N;
    the embedding is a lookup and the lm_head runs at the supervised positions only, so both are left
    out), plus 12 * layers * width * T per token of a T-token sequence for attention (width = heads x
    head_dim; causal masking not discounted, as in nanoGPT), plus 2 N_vit per patch for the frozen ViT's forward. Recomputation under
    activation checkpointing is not counted: this is model FLOPs, for MFU."""
    n_lm, n_vit, layers, width = sizes
    return sum(6 * n_lm * T + 12 * layers * width * T * T for T in seq_lens) + 2 * n_vit * n_patches


def hw_stats(device, flops=None, seconds=None):
    """' | mfu <percent> | mem <GiB>' for a log line: MFU on CUDA (this GPU's FLOPs against H100_PEAK_FLOPS), the
    peak memory so far: allocated GPU memory on CUDA, the process's resident set on a CPU."""
    if device.startswith("cuda"):
        mfu = f" | mfu {100 * flops / seconds / H100_PEAK_FLOPS:.1f}%" if flops and seconds else ""
        return mfu + f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    import resource
    return f" | mem {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss: KiB on Linux


@contextlib.contextmanager
def full_params(model):
    """Whole parameters for code that calls submodules directly (infer.py's streaming engine): a
    no-op for plain and DDP models; under FSDP2 every sharded module is gathered once for the duration.
    The layers must not reshard after each forward: ranks run different numbers of forwards (their own
    streams), and a layer that all-gathers again would wait forever for the other ranks. Run on CPU
    with gloo (test_torchrun_two_processes_match_one); not run with NCCL on GPUs."""
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if isinstance(model, FSDPModule):  # FSDP2 takes the first module to run forward as its root: make it
        model._get_fsdp_state()._lazy_init()  # the model before a layer runs alone (private API, torch 2.13)
    for m in sharded:
        if m is not model:  # (the root never reshards after forward)
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)


def latest(out):
    """The checkpoint directory to read: `out`, or `out.old` when a save was cut off mid-swap."""
    out = os.fspath(out)
    for d in (out, out + ".old"):
        if d and os.path.isfile(os.path.join(d, "config.json")):
            return d
    return None


def save_checkpoint(out, model, processor, optimizer=None, extra=None, rank=0):
    """Write a checkpoint atomically: model + processor in save_pretrained layout (what `load`,
    infer.py, grpo.py and vLLM read) plus trainer_state.pt (optimizer, step, RNG, config). It is
    written to out.tmp, whose trainer_state.pt is renamed into place last, and swapped in, so a crash
    leaves the old checkpoint, the new one, or a whole out.tmp that finish_save swaps in.
    Call it on every rank: under FSDP gathering the full state dict is a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    if rank != 0:
        return
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, state_dict=msd)
    processor.save_pretrained(tmp)
    state = os.path.join(tmp, "trainer_state.pt")
    torch.save({**(extra or {}), "optimizer": osd}, state + ".part")
    os.replace(state + ".part", state)  # out.tmp is whole from here on
    _swap(out)


def finish_save(out):
    """Complete a save that a crash cut off mid-swap (out.tmp whole, its trainer_state.pt in place): it
    is the newest checkpoint. Rank 0 only, before any rank reads `out`."""
    if os.path.isfile(os.path.join(out + ".tmp", "trainer_state.pt")):
        _swap(out)


def _swap(out):
    tmp, old = out + ".tmp", out + ".old"
    if os.path.exists(out):
        for name in os.listdir(out):  # what else lives there (log.jsonl, predictions) moves along
            if not os.path.exists(os.path.join(tmp, name)):
                os.replace(os.path.join(out, name), os.path.join(tmp, name))
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def open_log(out, step):
    """The run's log.jsonl opened for appending, without the records after `step`: a run resumed from
    its step-`step` checkpoint redoes those steps, so every step appears once (a fresh run, step -1,
    starts an empty log, also when a run killed before its first checkpoint left one; a line cut off by a
    crash is dropped too)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "log.jsonl")
    keep = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line.rstrip("\n") + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def load_trainer_state(ckpt):
    """trainer_state.pt of a checkpoint, memory-mapped: set_optimizer_state reads each rank's shard of the
    full optimizer state from the file's pages, so no rank holds the whole of it (about 30 GB at 3B; every
    rank loaded all of it before, issue 19)."""
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False, mmap=True)


def set_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def vocab_rows(path):
    """Rows of a checkpoint's output embedding (its config's vocabulary size), without loading it."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg)["vocab_size"]


def vocab_mask(model, tok):
    """True for the ids a policy must never emit: embedding rows beyond the tokenizer (padding) and
    special tokens (vision placeholders, <|im_start|>, ...), except the decision tokens and the end
    of turn. A sampled <|image_pad|> would even break the rope index of the turns after it. `model`: a
    model, or its number of output rows (vocab_rows)."""
    V = model if isinstance(model, int) else model.get_output_embeddings().weight.shape[0]
    m = torch.zeros(V, dtype=torch.bool)
    m[len(tok):] = True
    keep = set(tok.convert_tokens_to_ids(list(DECISION_TOKENS) + ["<|im_end|>"]))
    for i, t in tok.added_tokens_decoder.items():
        if t.special and i not in keep and i < V:
            m[i] = True
    return m


# -----------------------------------------------------------------------------
# Tiny models: random weights, a tokenizer trained offline, a processor; no download anywhere

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template (system default, image/video placeholders), written out so tiny models
# render conversations exactly like the real checkpoints do.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size=1024):
    """Byte-level BPE trained on the synthetic benchmark's text, with Qwen2's pre-tokenizer and Qwen's
    special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    n_special = len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(synthetic.corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # like a released Instruct tokenizer, no decision tokens yet: `load` adds them
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]}, replace_extra_special_tokens=False)
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    return tok


# The released models' architecture numbers (config.json of Qwen2.5-VL-3B-Instruct and Qwen3-VL-4B-Instruct):
# `python model.py --random NAME` builds them with random weights and the tiny tokenizer, the vocabulary padded
# to the real 151,936 rows, so memory and speed can be checked on a GPU without any download.
REAL = {
    "qwen2.5-vl-3b": ("qwen2_5_vl",
                      dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                           num_key_value_heads=2, rope_theta=1e6, mrope_section=[16, 24, 24]),
                      dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen3-vl-4b": ("qwen3_vl",
                    dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rope_theta=5e6, mrope_section=[24, 20, 20]),
                    dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                         num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")),
}
REAL_VOCAB = 151936


def make_config(family, text, vision, tok, vocab_size=None):
    """A Qwen2.5-VL / Qwen3-VL config from architecture numbers (`text` may hold rope_theta and
    mrope_section), with `tok`'s special-token ids. Returns (config, model class, patch size)."""
    text, vision = dict(text), dict(vision)
    theta, section = text.pop("rope_theta"), text.pop("mrope_section")
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                                         ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text.update(vocab_size=vocab_size or len(tok), max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id, bos_token_id=None)
    vision.update(spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as C, Qwen2_5_VLForConditionalGeneration as cls
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "mrope_section": section}
        vision.update(patch_size=14, tokens_per_second=2)
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig as C, Qwen3VLForConditionalGeneration as cls
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "mrope_section": section, "mrope_interleaved": True}
        vision.update(patch_size=16)
    else:
        raise ValueError(f"unknown family {family!r}: qwen2_5_vl or qwen3_vl")
    return C(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids), cls, vision["patch_size"]


def save_model(family, config, cls, patch, tok, out, dtype=torch.float32, device="cpu"):
    """Random weights for `config`, saved with the tiny processor in the layout `load` reads."""
    from transformers import Qwen2VLImageProcessorPil
    with torch.device(device):
        model = cls(config).to(dtype)
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    Processor(tok, image_processor, CHAT_TEMPLATE).save_pretrained(out)
    # Written by hand (no torchvision here to build the class): what AutoProcessor / vLLM read on a GPU
    # machine. Not exercised on CPU; the CPU path reads the parts above through Processor.
    with open(os.path.join(out, "video_preprocessor_config.json"), "w") as f:
        json.dump({"video_processor_type": "Qwen2VLVideoProcessor" if family == "qwen2_5_vl" else "Qwen3VLVideoProcessor",
                   "processor_class": "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen3VLProcessor",
                   "patch_size": patch, "merge_size": 2, "temporal_patch_size": 2,
                   "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}}, f, indent=1)
    return out


def build_tiny(family="qwen2_5_vl", out="out/tiny-qwen2_5_vl", seed=0, hidden=128, layers=2, heads=4,
               vision_hidden=64, vision_depth=2, vocab_size=None, frames_per_turn=2):
    """A random tiny Qwen2.5-VL or Qwen3-VL (the CPU default). Head dim 32 keeps it inside vLLM's CPU
    attention kernels (ENVIRONMENT.md). `vocab_size` pads the embedding rows beyond the tokenizer, as the
    real checkpoints have (the memory tests pad to 151,936)."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    hd = hidden // heads
    text = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads // 2, rope_theta=1e6 if family == "qwen2_5_vl" else 5e6)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2, out_hidden_size=hidden)
    if family == "qwen2_5_vl":
        text["mrope_section"] = [hd // 8, 3 * hd // 16, 3 * hd // 16]
        vision.update(window_size=112, fullatt_block_indexes=[vision_depth - 1])
    else:
        text.update(head_dim=hd, mrope_section=[6 * hd // 32, 5 * hd // 32, 5 * hd // 32])
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    config, cls, patch = make_config(family, text, vision, tok, vocab_size)
    config.streampro_tiny = True  # load() keeps a tiny model's random projector frozen (see there)
    # (ours) 2-frame turns: a one-frame turn left the tiny LM to find a change by comparing two turns'
    # visual tokens 30 tokens apart, which it did not learn within the CPU budget (STUDY.md). One frame per
    # turn is the paper's format and the only one vLLM takes (one image per turn): the vLLM tests use it.
    config.streampro_frames_per_turn = frames_per_turn
    return save_model(family, config, cls, patch, tok, out)


def build_random(name, out, device=None):
    """The real architecture `name` (REAL) with random bf16 weights, the tiny tokenizer and the real
    vocabulary size; one frame per turn, projector trainable: what the paper's models look like to our
    code, without a download. Built on the GPU when there is one (seconds; a minute or two on a CPU)."""
    family, text, vision = REAL[name]
    config, cls, patch = make_config(family, text, vision, tiny_tokenizer(), REAL_VOCAB)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return save_model(family, config, cls, patch, tiny_tokenizer(), out, torch.bfloat16, device)


def ensure_tiny(family="qwen2_5_vl", root="out"):
    """The default tiny model directory, built on first use (a few seconds)."""
    out = os.path.join(root, f"tiny-{family}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        build_tiny(family, out)
    return out


def show(n, root, split, states, fps, path=None):
    """Print the n-th conversation of a split, tokenised as training sees it (data.show); the synthetic
    benchmark and the tiny model are made first where they are missing."""
    if root == data.DEFAULT_DATA:
        synthetic.ensure(root)
    samples = data.load_annotations(os.path.join(root, f"{split}.jsonl"))
    if n >= len(samples):
        raise data.UserError(f"--show {n}: {root}/{split}.jsonl has {len(samples)} samples (0 to {len(samples) - 1})")
    s = samples[n]
    path = path or ensure_tiny()
    processor = Processor.from_pretrained(path)
    add_decision_tokens(None, processor.tokenizer)
    fmt = data.ChatFormat(processor, frames_per_turn(path))
    frames, _ = fmt.video(s["video_path"], fps, s["duration"])
    print(f"{s['id']}  task {s['task']}  level {s.get('level')}  query_time {s['query_time']}  duration {s['duration']}")
    for ans in s["answers"]:
        when = f"t={ans['time']}" if "time" in ans else f"[{ans['start']}, {ans['end']}]"
        print(f"  answer {when}: {ans['text']}")
    data.show(fmt.encode(data.build_conversation(s, len(frames), fps, states), frames), processor.tokenizer)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tiny", choices=["qwen2_5_vl", "qwen3_vl"])
    g.add_argument("--random", choices=list(REAL), help="the real architecture with random weights")
    g.add_argument("--show", type=int, metavar="N", help="print the N-th conversation of --split, tokenised (data.show)")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames_per_turn", type=int, default=2, choices=[1, 2], help="--tiny: 2 (the CPU default) or 1 (vLLM)")
    p.add_argument("--data", default=data.DEFAULT_DATA, help="--show: the annotation folder")
    p.add_argument("--split", default="train")
    p.add_argument("--states", type=int, default=2, choices=[2, 3])
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--model", default=None, help="--show: tokenizer/processor to use (default: the tiny Qwen2.5-VL, built if missing)")
    a = p.parse_args(cli_args())
    if a.show is not None:
        data.check_flags(a, positive=("fps",), non_negative=("show",))
        return show(a.show, a.data, a.split, a.states, a.fps, a.model and check_model(a.model))
    if a.random:
        torch.manual_seed(a.seed)
        out = build_random(a.random, a.out or f"out/random-{a.random}")
    else:
        out = build_tiny(a.tiny, a.out or f"out/tiny-{a.tiny}", a.seed, frames_per_turn=a.frames_per_turn)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    n = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"wrote {out}: {cfg['model_type']}, text hidden {cfg['text_config']['hidden_size']} x {cfg['text_config']['num_hidden_layers']} "
          f"layers, vocabulary rows {cfg['text_config']['vocab_size']}, weights {n / 2**30:.2f} GiB")


if __name__ == "__main__":
    data.run_cli(main)
