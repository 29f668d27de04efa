"""
Supervised fine-tuning for the streaming format (SPEC sections 2 and 5). Three stages, one script:

  --stage offline  single-turn perception SFT (plain CE) that turns a tiny random model into a tiny
                   *base* VLM that can see. Tiny models only: Qwen-VL-Instruct already sees.
  --stage narrate  (ours, tiny models) the base learns to watch: short frame streams captioned turn by
                   turn, so it reads the latest frame among several (STUDY.md: tiny models).
  --stage stream   streaming SFT with --loss cb (CB-Stream, default) | focal (Streamo) | ce: the paper's stage.

    python sft.py                                    # CPU: tiny base and narrator first if missing -> streaming SFT
    python sft.py --loss focal --out out/sft-focal   # the Streamo baseline at the same budget
    python sft.py --stage offline                    # only the tiny base model (then --stage narrate)
    python sft.py --activation --model out/sft-cb    # StreamBridge's activation model (activation.py) -> out/act
    torchrun --standalone --nproc_per_node=2 sft.py  # 2 CPU processes (gloo), same result as 1
    torchrun --standalone --nproc_per_node=8 sft.py --preset qwen2.5-vl-3b \\
        --model /models/Qwen2.5-VL-3B-Instruct --data /data/sft.jsonl --val /data/val.jsonl --out out/sft-3b
    # multi-node: torchrun --nnodes=8 --node_rank=$NODE --master_addr=$HOST --master_port=29500 --nproc_per_node=8 sft.py ...

One optimisation step = `--batch` conversations (global, over all ranks), split into micro-batches of
`--micro_batch` per rank with gradient accumulation. The loss of a step is normalised by the global
number of supervised tokens and the class-balanced weights use the global class counts, so the
update does not depend on how the batch is split (test_core.py checks 1 vs 2 processes).
"""
import argparse
import json
import math
import os
import random
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import activation as A
import data
import model as M
from losses import bce_loss, class_counts, sft_loss

# -----------------------------------------------------------------------------
# Config: defaults run the tiny model on the synthetic benchmark on a CPU

PRESETS = {  # SPEC section 5; (ours): warmup, micro-batch, window, eval cadence
    "qwen2.5-vl-3b": dict(lr=1e-5, batch=512, micro_batch=1, epochs=1, max_steps=0, warmup=30, dtype="bfloat16",
                          fsdp=True, grad_ckpt=True, window=200, eval_every=200, save_every=200, log_every=1),
    "qwen3-vl-4b": dict(lr=1e-5, batch=512, micro_batch=1, epochs=1, max_steps=0, warmup=30, dtype="bfloat16",
                        fsdp=True, grad_ckpt=True, window=200, eval_every=200, save_every=200, log_every=1),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what")
    g.add_argument("--stage", default="stream", choices=["stream", "offline", "narrate"])
    g.add_argument("--preset", default=None, choices=list(PRESETS), help="the paper's settings for a backbone")
    g.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"], help="tiny default model family")
    g.add_argument("--model", default=None, help="start from (default: out/narrator-{family} for stream, out/base-{family} "
                   "for narrate, the tiny random model for offline; made first when missing)")
    g.add_argument("--out", default=None, help="checkpoint directory (default out/sft-{loss}, out/base-{family}, out/narrator-{family})")
    g.add_argument("--resume", action="store_true", help="continue from --out's trainer state")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.path.join(data.DEFAULT_DATA, "train.jsonl"))
    g.add_argument("--val", default=os.path.join(data.DEFAULT_DATA, "val.jsonl"))
    # The paper's SFT tasks (StreamPro 4.3, B.2): EC, AC, EU, OU, TP, TG. (ours) The synthetic data has no EC/AC:
    # the narrate stage stands for them (captions of what happens); levels 0-1 are OU. AA and GP are GRPO's, RF
    # is held out of both and only tested. Real data with other task names: --levels '' --tasks ''.
    g.add_argument("--levels", default="0,1,2", help="synthetic difficulty levels to train on ('' = all)")
    g.add_argument("--tasks", default="EC,AC,EU,OU,TP,TG", help="tasks to train on, with --levels ('' = all)")
    g.add_argument("--states", type=int, default=2, choices=[2, 3])
    g.add_argument("--fps", type=float, default=1.0)
    g.add_argument("--window", type=int, default=200, help="turns kept besides the question turn (0 = all)")
    g.add_argument("--skip_bad", action="store_true", help="report and skip samples that fail to load")
    g.add_argument("--narration", type=float, default=0.0, help="offline/narrate: share of captioned frame streams in a batch")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="cb", choices=["cb", "focal", "ce"])
    g.add_argument("--beta", type=float, default=0.9999)
    g.add_argument("--lambda_text", type=float, default=2.0)
    g.add_argument("--gamma", type=float, default=2.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min_lr_ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=20, help="linear warmup steps, then cosine decay")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--batch", type=int, default=8, help="conversations per optimisation step, all ranks together")
    g.add_argument("--micro_batch", type=int, default=4, help="conversations per forward pass per rank")
    g.add_argument("--max_steps", type=int, default=300, help="0 = run --epochs")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--stop_at", type=int, default=0, help="save and exit after this step (to fit a job slot); --resume goes on")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("system")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per decoder layer (3B/4B on GPUs)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing")
    g.add_argument("--train_vision", action="store_true", help="train the ViT too (both papers freeze it)")
    g.add_argument("--projector_lr", type=float, default=None,
                   help="learning rate of the vision-language projector (default: --lr; the tiny models keep theirs frozen)")
    g.add_argument("--eval_every", type=int, default=150)
    g.add_argument("--eval_samples", type=int, default=60)
    g.add_argument("--save_every", type=int, default=50)
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--cache_gb", type=float, default=2.0, help="decoded frames kept in memory")
    g = p.add_argument_group("activation model (StreamBridge, SPEC 6; activation.py)")
    g.add_argument("--activation", action="store_true", help="train an activation model instead (stream stage): a score "
                   "head on an added <ACT> token after each frame, BCE; default --out out/act")
    g.add_argument("--act_last", type=float, default=0.1, help="P: the share of each answer's segment labelled positive "
                   "(ours: 0.1, so in the synthetic data's segments, median 7 turns, only the answer's own turn)")
    words = data.cli_args(argv)
    args = p.parse_args(words)
    if args.preset:  # a preset fills in what the command line did not give
        data.fill_defaults(args, words, PRESETS[args.preset])
    stage_defaults = {"offline": dict(lr=2e-3, batch=32, micro_batch=32, max_steps=1000, warmup=50, eval_every=500, save_every=500),
                      "narrate": dict(lr=2e-3, batch=32, micro_batch=16, max_steps=600, warmup=50, eval_every=200, save_every=200,
                                      narration=1.0)}
    data.fill_defaults(args, words, stage_defaults.get(args.stage, {}))
    if args.activation:
        args.out = args.out or "out/act"
    args.out = args.out or {"offline": f"out/base-{args.family}", "narrate": f"out/narrator-{args.family}"}.get(args.stage, f"out/sft-{args.loss}")
    return args


def check_args(args):
    """Flags that cannot work, named before anything loads. Every rank runs this before the process group
    forms, so a bad flag stops all of them alike and none waits at a barrier for the others."""
    data.check_flags(args, positive=("batch", "micro_batch", "lr", "fps", "save_every", "log_every"),
                     non_negative=("max_steps", "epochs", "stop_at", "warmup", "window", "eval_every", "eval_samples",
                                   "grad_clip", "weight_decay", "gamma", "lambda_text", "cache_gb", "projector_lr"),
                     fractions=("narration", "beta", "min_lr_ratio"))
    if args.activation and args.stage != "stream":
        raise data.UserError(f"--activation trains on the streaming conversations: drop --stage {args.stage}")
    if args.activation and not 0 < args.act_last <= 1:
        raise data.UserError(f"--act_last {args.act_last:g}: must be within (0, 1]")
    check_run(args, files=args.stage == "stream")
    if args.model and not (args.resume and M.latest(args.out)):
        M.check_model(args.model)


def check_run(args, files=True):
    """What both trainers check before anything loads (grpo.py too): the batch over the processes, something
    to train, --levels and --tasks, and that a --data or --val given exists (the default synthetic files are made on
    first use; a --val with a typo would otherwise train without evaluation, without a word)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch % world:
        raise data.UserError(f"--batch {args.batch}: must be a multiple of the number of processes ({world})")
    if not args.max_steps and not args.epochs:
        raise data.UserError("--max_steps 0 and --epochs 0: nothing to train")
    try:
        data.parse_filter(args.levels, args.tasks)
    except ValueError:
        raise data.UserError(f"--levels {args.levels}: expected levels such as 0,1 ('' for all samples)") from None
    for flag in ("data", "val") if files else ():
        path = getattr(args, flag)
        if path and not path.startswith(data.DEFAULT_DATA) and not os.path.isfile(path):
            raise data.UserError(f"--{flag} {path}: annotation file not found" + (" (--val '': no evaluation)" if flag == "val" else ""))


# -----------------------------------------------------------------------------
# Pure helpers


def lr_at(step, max_steps, lr, warmup, min_lr_ratio):
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_indices(step, batch, n, seed):
    """The global batch of step `step`: a fresh seeded permutation of the n samples per epoch, so the
    data position is a function of the step (exact resume) and every rank agrees without talking."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[i]))
    return out


# -----------------------------------------------------------------------------
# Data: conversations for the streaming stage, perception pairs for the offline stage


class StreamData:
    """Annotated videos -> encoded conversations, with decoded frames cached in memory."""

    def __init__(self, path, fmt, args):
        samples = data.select(data.load_annotations(path), *data.parse_filter(args.levels, args.tasks))
        if not samples:
            raise data.UserError(f"{path}: no samples of --levels {args.levels!r} and --tasks {args.tasks!r} "
                             "(pass --levels '' --tasks '' to take every sample)")
        self.samples, self.fmt, self.args = samples, fmt, args
        self.cache, self.cache_bytes, self.bad = OrderedDict(), 0, set()

    def frames(self, s):
        if s["id"] in self.cache:
            self.cache.move_to_end(s["id"])
            return self.cache[s["id"]]
        f, _ = self.fmt.video(s["video_path"], self.args.fps, s["duration"])
        self.cache[s["id"]], self.cache_bytes = f, self.cache_bytes + f.nbytes
        while self.cache_bytes > self.args.cache_gb * 2**30:
            self.cache_bytes -= self.cache.popitem(last=False)[1].nbytes
        return f

    def encode(self, i):
        """Conversation i, encoded. A sample that fails to load stops the run with its id and cause,
        or with --skip_bad is reported once and replaced by the next sample, so every rank keeps the
        same number of micro-batches."""
        for j in range(len(self.samples)):
            s = self.samples[(i + j) % len(self.samples)]
            if s["id"] in self.bad:
                continue
            try:
                frames = self.frames(s)
                conv = data.build_conversation(s, len(frames), self.args.fps, self.args.states)
                return self.fmt.encode(conv, frames, self.args.window)
            except (data.VideoError, ValueError, RuntimeError) as e:
                if not self.args.skip_bad:
                    raise data.UserError(f"sample {s['id']} ({s['video_path']}): {e}; rerun with --skip_bad to skip such samples")
                print(f"skipping sample {s['id']}: {e}", flush=True)
                self.bad.add(s["id"])
        raise SystemExit("no sample could be loaded")


@torch.no_grad()
def center_projector(model, fmt, seed, n=128):
    """(ours, tiny models only) Data-dependent init: shift the projector's output bias so the visual
    tokens of a sample of frames have zero mean. A random ViT's tokens share a large common
    component that hides their content; with it the tiny LM did not learn to read colours in
    1500 steps, without it in ~200 (STUDY.md: tiny models)."""
    from synthetic import perception_pairs
    frames = np.concatenate([p["frames"] for p in perception_pairs(n, [seed, 1])])
    pv, grid, _ = fmt.images(frames)
    feats = torch.cat(model.model.get_image_features(pv.to(model.device), grid.to(model.device)).pooler_output)
    last = [m for m in model.model.visual.merger.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.bias -= feats.mean(0)


def perception_batch(fmt, n, seed, narration=0.0):
    """The offline stage's examples: single-turn perception pairs, and a `narration` share of short
    streams captioned turn by turn (synthetic.narration; 2-frame models only)."""
    from synthetic import narration as streams, perception_pairs
    m = int(round(n * narration)) if fmt.frames_per_turn == 2 else 0
    out = [fmt.encode_single(p["frames"], p["prompt"], p["answer"]) for p in perception_pairs(n - m, seed)]
    for x in streams(m, seed):
        turns = [{"k": k, "marker": data.time_marker(k), "question": "Say what changes, every second." if k == 0 else None,
                  "target": c} for k, c in enumerate(x["captions"])]
        out.append(fmt.encode({"system": "You are a helpful assistant.", "q_turn": 0, "turns": turns}, x["frames"]))
    return out


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_stream(dmodel, fmt, val, args, rank, world, device, pad_id, autocast):
    """Val metrics. Teacher-forced: CE of the supervised tokens (comparable across losses).
    Free-running, through infer.py (the model's own outputs stay in its context, as in deployment):
    per-class decision accuracy and response precision / recall / rate over the turns from the
    question on, StreamPro-F1 (offline judge), and the threshold-free ROC-AUC of p(</Response>) at
    every decision: a class-balanced loss mostly moves the decision threshold, and the AUC tells that
    apart from better perception. `tf_auc` is the same AUC teacher-forced (the true conversation in
    context): a model that sees the change but derails on its own outputs has tf_auc >> auc."""
    import infer
    import metric
    dmodel.eval()
    idx = list(range(min(args.eval_samples, len(val.samples))))[rank::world]
    ce = torch.zeros(2, dtype=torch.float64)
    iargs = infer.get_args(["--states", str(args.states), "--fps", str(args.fps), "--window", str(args.window)])
    judge, rows, tf = metric.OfflineJudge.from_samples(val.samples), [], []
    # ranks hold different numbers of samples, so no forward may talk to the other ranks: the whole
    # model is gathered once and called unwrapped (no DDP hooks, no FSDP all-gather per layer)
    with M.full_params(dmodel) as model:
        model = M.unwrap(model)
        rsp = fmt.decision_ids[data.RESPONSE]
        for j in range(0, len(idx), args.micro_batch):
            items = [val.encode(i) for i in idx[j:j + args.micro_batch]]
            logits, y, keep = supervised_logits(model, data.collate(items, pad_id), device, autocast)
            ce += torch.tensor([torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item(), len(y)])
            row = torch.full(keep.shape, -1, dtype=torch.long)
            row[keep] = torch.arange(int(keep.sum()))
            p = torch.softmax(logits.float(), -1)[:, rsp].cpu()
            for i, x in enumerate(items):  # p(</Response>) at each decision from the question on, teacher-forced
                q = next(t["k"] for t in x["turns"] if t["question"])
                tf += [(p[row[i, d - 1]].item(), t["decision"] == data.RESPONSE) for (_, d, _), t in zip(x["turn_spans"], x["turns"]) if t["k"] >= q]
        for j in range(0, len(idx), iargs.streams):
            batch = [(val.samples[i], val.frames(val.samples[i])) for i in idx[j:j + iargs.streams]]
            outs, _ = infer.run_streams(model, fmt, batch, iargs)
            for (s, frames), o in zip(batch, outs):
                conv = data.build_conversation(s, len(frames), args.fps, args.states)
                q = conv["q_turn"]
                rows.append(([t["decision"] for t in conv["turns"]][q:], o["decisions"][q:], o["p_response"][q:],
                             metric.score_sample(s, o["responses"], judge)))
    if world > 1:
        dist.all_reduce(ce)
        gathered = [None] * world
        dist.all_gather_object(gathered, (rows, tf))
        rows, tf = [r for g in gathered for r in g[0]], [x for g in gathered for x in g[1]]
    dmodel.train()
    lab = [x for r in rows for x in r[0]]
    pred = [x for r in rows for x in r[1]]
    hit = sum(p == l == data.RESPONSE for p, l in zip(pred, lab))
    out = {"val_ce": ce[0].item() / max(1, ce[1].item()),
           "rsp_precision": hit / max(1, pred.count(data.RESPONSE)), "rsp_recall": hit / max(1, lab.count(data.RESPONSE)),
           "rsp_rate": pred.count(data.RESPONSE) / max(1, len(pred)), "true_rate": lab.count(data.RESPONSE) / max(1, len(lab)),
           "auc": metric.roc_auc([x for r in rows for x in r[2]], [l == data.RESPONSE for l in lab]),
           "tf_auc": metric.roc_auc(*zip(*tf)) if tf else float("nan"),
           "f1": float(np.mean([r[3]["f1"] for r in rows])) if rows else float("nan")}
    for t in data.STATES[args.states]:
        n = lab.count(t)
        out[f"acc_{t[2:-1].lower()}"] = sum(p == l == t for p, l in zip(pred, lab)) / max(1, n)
    return out


@torch.no_grad()
def eval_activation(dmodel, fmt, val, args, rank, world, device, pad_id, autocast):
    """Val metrics of an activation model (--activation). Its context holds none of its own outputs, so a
    teacher-forced forward is what it reads streaming: its probability at every <ACT> from the question on, against
    the turns that should respond (`auc`: the main format's labels, as bench.py scores p_response) and against its
    own training labels (`act_auc`: the last --act_last of each segment); val_bce. `threshold` (ours) fires on as
    many val turns as should respond (saved in the checkpoint: infer.py's default --act_threshold); the response
    rate, precision and recall at it."""
    import metric
    dmodel.eval()
    idx = list(range(min(args.eval_samples, len(val.samples))))[rank::world]
    got = []  # (probability, should respond, act label) per turn from the question on
    with M.full_params(dmodel) as model:
        model = M.unwrap(model)
        for j in range(0, len(idx), args.micro_batch):
            items = [val.encode(i) for i in idx[j:j + args.micro_batch]]
            with A.scoring(model):
                scores, y, _ = supervised_logits(model, data.collate(items, pad_id), device, autocast)
            rsp = [t["decision"] == data.RESPONSE for x in items for (_, d, _), t in zip(x["turn_spans"], x["turns"]) if x["labels"][d] != -100]
            got += zip(torch.sigmoid(scores[:, 0].float()).tolist(), rsp, y.tolist())
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, got)
        got = [x for g in gathered for x in g]
    dmodel.train()
    p, rsp, y = (np.array(v, dtype=float) for v in zip(*got))
    threshold = float(np.sort(p)[::-1][max(int(rsp.sum()) - 1, 0)])
    fire = p >= threshold
    hit = float((fire * rsp).sum())
    bce = -np.mean(y * np.log(np.clip(p, 1e-12, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-12, 1)))
    return {"val_bce": float(bce), "auc": metric.roc_auc(p.tolist(), rsp.astype(bool).tolist()),
            "act_auc": metric.roc_auc(p.tolist(), y.astype(bool).tolist()), "threshold": threshold,
            "rsp_rate": float(fire.mean()), "true_rate": float(rsp.mean()),
            "rsp_precision": hit / max(1.0, float(fire.sum())), "rsp_recall": hit / max(1.0, float(rsp.sum()))}


CAPTION_KINDS = {"turned": "colour", "moved": "move", "vanished": "vanish", "flash": "flash"}  # synthetic.narration's captions


@torch.no_grad()
def eval_offline(model, fmt, n, seed, device):
    """Greedy answers on held-out perception pairs -> slot accuracies (chance: colour set 1/4-1/12,
    change 1/7), and for 2-frame models the share of turns of held-out captioned streams whose caption
    is right token by token, teacher-forced, apart for turns with a change and turns without one, and per
    kind of change (colour, move, vanish, flash)."""
    from synthetic import COLOURS, DIRS, SHAPES, perception_pairs
    model.eval()
    hits = {"colour": [], "shape": [], "change": []}
    for p in perception_pairs(n, seed):
        enc = fmt.encode_single(p["frames"], p["prompt"], "")
        L = len(enc["input_ids"]) - 1 - len(fmt.asst_close_tail)  # the prompt: all but end-of-turn and tail
        ids = enc["input_ids"][None, :L].to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc["pixel_values"].to(device),
                             image_grid_thw=enc["image_grid_thw"].to(device), mm_token_type_ids=enc["mm_token_type_ids"][None, :L].to(device),
                             max_new_tokens=20, do_sample=False, eos_token_id=fmt.eos_id, pad_token_id=fmt.tok.pad_token_id)
        text = fmt.tok.decode(out[0, L:], skip_special_tokens=True).lower()
        words = text.replace(".", " ").split()
        if p["prompt"] == "Describe the frame.":
            hits["colour"].append(sorted(w for w in words if w in COLOURS) == p["slots"]["colours"])
            hits["shape"].append(sorted(w for w in words if w in SHAPES) == p["slots"]["shapes"])
        else:
            said = [w for w in words if w in COLOURS or w in DIRS] or (["none"] if "nothing" in words else [])
            hits["change"].append(said == [p["slots"]["change"]])
    if fmt.frames_per_turn == 2:  # captioned streams, teacher-forced: is every token of a turn's caption the argmax?
        hits["stream_change"], hits["stream_still"] = [], []
        for x in perception_batch(fmt, n // 2, seed, narration=1.0):
            logits, y, _ = supervised_logits(model, data.collate([x], fmt.tok.pad_token_id), device, nullcontext())
            right = (logits.argmax(-1) == y).tolist()
            for (_, d, e), t in zip(x["turn_spans"], x["turns"]):  # each turn's supervised tokens, in order
                n_sup = int((x["labels"][d:e] != -100).sum())
                ok = all(right[:n_sup])
                hits["stream_still" if t["target"] == "Nothing changed." else "stream_change"].append(ok)
                kind = next((k for w, k in CAPTION_KINDS.items() if w in t["target"]), None)
                if kind:
                    hits.setdefault(f"stream_{kind}", []).append(ok)
                right = right[n_sup:]
    model.train()
    return {f"{k}_acc": float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


# -----------------------------------------------------------------------------
# Training


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def log_line(log, rec):
    """Append a record to log.jsonl: rank 0 holds the file, the other ranks pass None."""
    if log:
        log.write(data.json_line(rec))
        log.flush()


def wrap(model, args, ddp, device):
    """DDP for small models; FSDP2 (fully_shard per decoder layer, bf16 compute, fp32 reduce) for
    the 3B/4B backbones. FSDP2 with activation checkpointing is tested on CPU with gloo in fp32
    (test_torchrun_two_processes_match_one)."""
    if args.grad_ckpt:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not getattr(args, "train_vision", False):
            # The frozen ViT needs neither checkpointing nor the hook that makes its input require grad: with
            # them the whole frozen tower went into the backward (22% of the CUDA time at 3B, ENVIRONMENT.md).
            # The LM's trained embedding makes its own input require grad without the hook.
            model.disable_input_require_grads()
            for block in model.model.visual.blocks:
                block.gradient_checkpointing = False
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, args.dtype), reduce_dtype=torch.float32)
        for layer in model.model.language_model.layers:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device] if device.startswith("cuda") else None)
    return model


def set_grad_sync(model, flag):
    """Gradient all-reduce only on the last micro-batch of a step."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = flag
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(flag)


def autocast_for(device, args):
    """bf16 autocast on CUDA without FSDP (FSDP2's mixed-precision policy casts by itself)."""
    on = device.startswith("cuda") and args.dtype == "bfloat16" and not args.fsdp
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else nullcontext()


def supervised_logits(model, b, device, autocast):
    """Logits (N, V) at the N positions whose next token is supervised, those tokens (N,) and the
    positions (a bool (B, L) mask whose True entries are the N rows, in row-major order). The
    lm_head runs at those positions only: a conversation's whole [T, V] logits (29k x 152k in fp32 at
    3B) were the first out-of-memory on a GPU."""
    nxt = b["labels"][:, 1:]
    keep = torch.zeros_like(b["labels"], dtype=torch.bool)
    keep[:, :-1] = nxt != -100
    # the LM's and the ViT's positions and indices from the host batch: on the device they cost 811
    # host syncs per 201-frame step (issue 19)
    inputs = data.model_inputs(b)
    if "position_ids" not in inputs:  # (the training loop's prefetch thread made them: with_positions)
        inputs["position_ids"] = M.rope_positions(model, b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"], b["attention_mask"])
    inputs = {**{k: v.to(device) for k, v in inputs.items()}, **M.vision_inputs(model, b["image_grid_thw"], device)}
    with autocast, M.logits_at(model, keep):
        logits = model(**inputs, logits_to_keep=0).logits[0]
    return logits, nxt[nxt != -100].to(device), keep


def with_positions(model, items):
    """The encoded items with their mrope positions (data.collate pads them), made in the prefetch thread
    instead of before each forward: ~0.1 s of host time for a 201-frame conversation."""
    for x in items:
        x["position_ids"] = M.rope_positions(model, x["input_ids"][None], x["mm_token_type_ids"][None], x["image_grid_thw"], None)[:, 0]
    return items


def resume_point(args, rank, ddp):
    """The checkpoint --resume continues from, or None (then it says what --out holds). A save cut off
    mid-swap is completed first, before any rank reads --out."""
    if rank == 0:
        M.finish_save(args.out)
    if ddp:
        dist.barrier()
    if not args.resume:
        return None
    ckpt = M.latest(args.out)
    if ckpt and os.path.isfile(os.path.join(ckpt, "trainer_state.pt")):
        return ckpt
    held = ", ".join(sorted(os.listdir(args.out))) if os.path.isdir(args.out) else None
    print0(f"--resume: {args.out} holds no checkpoint yet ({'it holds: ' + held if held else 'it does not exist'}); "
           f"starting from {args.model}")
    return None


def stage_data(args, model, fmt, ckpt, rank, world):
    """The stage's training and validation data, its number of steps, and load_step(step): this rank's
    share of a step's conversations, a pure function of the step (so resuming is exact)."""
    if args.stage == "stream":
        train = StreamData(args.data, fmt, args)
        val = StreamData(args.val, fmt, args) if args.val and os.path.isfile(args.val) else None
        max_steps = args.max_steps or math.ceil(args.epochs * len(train.samples) / args.batch)
        load_step = lambda step: with_positions(model, [train.encode(i) for i in batch_indices(step, args.batch, len(train.samples), args.seed)[rank::world]])
        return train, val, max_steps, load_step
    load_step = lambda step: with_positions(model, perception_batch(fmt, args.batch, [args.seed, step], args.narration)[rank::world])
    if not ckpt and not os.path.isfile(os.path.join(M.resolve(args.model), "trainer_state.pt")):  # a random model, not a base to continue
        center_projector(model, fmt, args.seed)
    return None, None, args.max_steps, load_step


def make_optimizer(model, args, ddp, device):
    """The wrapped model and AdamW over what trains; the projector may have its own learning rate."""
    proj_lr = args.lr if args.projector_lr is None else args.projector_lr  # (a tiny model's stays frozen: model.load)
    if proj_lr == 0:
        for p in model.model.visual.merger.parameters():
            p.requires_grad = False
    model.train()
    dmodel = wrap(model, args, ddp, device)
    named = [(n, p) for n, p in dmodel.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "visual" not in n], "lr_scale": 1.0},
              {"params": [p for n, p in named if "visual" in n], "lr_scale": proj_lr / args.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay, fused=device.startswith("cuda"))
    return dmodel, opt, [p for _, p in named]


def clip_and_step(opt, params, grad_clip, step):
    """Clip the gradients' global norm and take the optimizer step; a step whose norm is not finite is
    skipped (clip_grad_norm_ would scale every gradient by NaN). Returns the norm (None: no clipping)."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item() if grad_clip > 0 else None
    if gnorm is not None and not math.isfinite(gnorm):
        print0(f"step {step + 1}: gradient norm {gnorm}: update skipped")
        opt.zero_grad(set_to_none=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore(ckpt, dmodel, opt):
    """Optimizer and RNG states of a checkpoint; returns its trainer state ({"step": 0} without one)."""
    if not ckpt:
        return {"step": 0}
    state = M.load_trainer_state(ckpt)
    M.set_optimizer_state(dmodel, opt, state["optimizer"])
    random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"]), torch.set_rng_state(state["rng"]["torch"])
    print0(f"resumed {ckpt} at step {state['step']}")
    return state


def global_totals(items, decision_ids, ddp):
    """Decision-class counts, supervised tokens and tokens of the whole global batch (all ranks), known
    before any backward: CB-Stream's weights and the loss normaliser are global (SPEC section 2)."""
    labels = torch.cat([x["labels"][1:] for x in items])
    totals = torch.cat([class_counts(labels, decision_ids),
                        torch.tensor([(labels != -100).sum().item(), sum(len(x["input_ids"]) for x in items)], dtype=torch.float64)])
    if ddp:
        dist.all_reduce(totals)  # a CPU tensor: gloo's half of the process group (model.setup_dist)
    return totals[:-2], int(totals[-2]), int(totals[-1])


def forward_backward(dmodel, items, args, counts, n_sup, decision_ids, pad_id, device, world, autocast, ddp):
    """This rank's share of the step in micro-batches of similar length (less padding), gradients
    all-reduced on the last one. Returns the step's loss (global: every micro-batch's loss is already
    normalised by the global number of supervised tokens)."""
    items = sorted(items, key=lambda x: len(x["input_ids"]))
    micro = [items[j:j + args.micro_batch] for j in range(0, len(items), args.micro_batch)]
    total = torch.zeros((), dtype=torch.float64, device=device)
    for j, mb in enumerate(micro):
        set_grad_sync(dmodel, j == len(micro) - 1)
        with A.scoring(dmodel) if args.activation else nullcontext():  # (the activation model's head: its scores)
            logits, targets, _ = supervised_logits(dmodel, data.collate(mb, pad_id), device, autocast)
        if args.activation:
            loss = bce_loss(logits, targets, num_items=n_sup)
        else:
            loss = sft_loss(args.loss if args.stage == "stream" else "ce", logits, targets, decision_ids,
                            counts=counts, num_items=n_sup, beta=args.beta, lambda_text=args.lambda_text, gamma=args.gamma)
        (loss * world).backward()  # DDP/FSDP average gradients over ranks; the loss is already global
        total += loss.detach()
        del logits, loss  # freed before the next micro-batch's forward, not after it
    if ddp:
        dist.all_reduce(total)
    return total.item()


class Meter:
    """Tokens per second and MFU since the last read, and the peak memory so far (model.hw_stats)."""

    def __init__(self, model, device):
        self.sizes, self.device = M.flop_sizes(model), device
        self.restart()

    def restart(self):
        self.t, self.tokens, self.flops = time.time(), 0, 0

    def add(self, tokens, seq_lens, n_patches):
        """`tokens`: the global batch's; `seq_lens`, `n_patches`: this rank's share (MFU is per GPU)."""
        self.tokens += tokens
        self.flops += M.train_flops(self.sizes, seq_lens, n_patches)

    def read(self):
        dt = max(time.time() - self.t, 1e-9)
        out = self.tokens / dt, M.hw_stats(self.device, self.flops, dt)
        self.restart()
        return out


# -----------------------------------------------------------------------------
# main: the default chain of stages, then the loop


def main(args):
    check_args(args)
    ddp, rank, world, device = M.setup_dist()
    torch.manual_seed(args.seed + rank)
    if rank == 0:  # the default pipeline makes what it needs: synthetic data, tiny random model
        if args.data.startswith(data.DEFAULT_DATA):
            import synthetic
            synthetic.ensure()
        if args.model is None:
            M.ensure_tiny(args.family)
    if args.model is None:  # the default chain: tiny random -> offline (sees) -> narrate (watches) -> streaming SFT
        chain = ["offline", "narrate", "stream"]
        start = {"offline": f"out/tiny-{args.family}", "narrate": f"out/base-{args.family}", "stream": f"out/narrator-{args.family}"}
        args.model = start[args.stage]
        if ddp:
            dist.barrier()
        for stage in chain[:chain.index(args.stage)]:
            before = get_args(["--stage", stage, "--family", args.family, "--seed", str(args.seed), "--resume"])
            before.model = start[stage]
            print0(f"the {stage} stage first ({before.out}): made if missing, finished if cut off")
            run(before, ddp, rank, world, device)
    run(args, ddp, rank, world, device)
    M.teardown_dist(ddp)


def run(args, ddp, rank, world, device):
    ckpt = resume_point(args, rank, ddp)
    if args.stage != "stream" and not args.resume and M.latest(args.out):
        print0(f"{args.out} exists: {args.stage} stage skipped (delete it or pass --resume to continue)")
        return
    model, processor = M.load(ckpt or args.model, device=device, freeze_vision=not args.train_vision)
    if args.activation:  # <ACT>, the score head (its weights where the checkpoint has them), the <ACT> turn format
        fmt = A.attach(model, processor, ckpt or args.model, args.act_last)
    else:
        fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    pad_id = processor.tokenizer.pad_token_id
    decision_ids = A.CLASSES if args.activation else [fmt.decision_ids[t] for t in data.STATES[args.states]]
    train, val, max_steps, load_step = stage_data(args, model, fmt, ckpt, rank, world)
    dmodel, opt, params = make_optimizer(model, args, ddp, device)
    start = step = restore(ckpt, dmodel, opt)["step"]
    cfg = vars(args).copy()
    print0(json.dumps(cfg))
    print0(f"{args.stage} stage: {args.model} -> {args.out}, {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters, "
           f"{world} process(es), {max_steps} steps")
    log = M.open_log(args.out, step if ckpt else -1) if rank == 0 else None  # no checkpoint: a fresh log
    autocast = autocast_for(device, args)

    def evaluate():
        if args.stage == "stream":
            evaluate_stream = eval_activation if args.activation else eval_stream
            return evaluate_stream(dmodel, fmt, val, args, rank, world, device, pad_id, autocast) if val else {}
        return eval_offline(model, fmt, 96, seed=10**6 + args.seed, device=device) if rank == 0 else {}

    def save():
        M.save_checkpoint(args.out, dmodel, processor, opt, {"step": step, "config": cfg, "rng": rng_state()}, rank)

    meter = Meter(model, device)
    # the next step's conversations are encoded in a thread while this step trains (data position is a
    # function of the step, so resuming stays exact); eval and save wait for it (they share the tokenizer)
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(load_step, step) if step < max_steps else None
        while step < max_steps:
            items = nxt.result()
            nxt = pool.submit(load_step, step + 1) if step + 1 < max_steps else None
            counts, n_sup, n_tok = global_totals(items, decision_ids, ddp)
            lr = lr_at(step, max_steps, args.lr, args.warmup, args.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss = forward_backward(dmodel, items, args, counts, n_sup, decision_ids, pad_id, device, world, autocast, ddp)
            gnorm = clip_and_step(opt, params, args.grad_clip, step)
            step += 1
            meter.add(n_tok, [len(x["input_ids"]) for x in items], sum(len(x["pixel_values"]) for x in items))
            rec = {"step": step, "loss": loss, "lr": lr, "gnorm": gnorm, "counts": [int(c) for c in counts]}
            if step % args.log_every == 0 or step == max_steps:
                names = ["negative", "positive"] if args.activation else [t[2:-1].lower() for t in data.STATES[args.states]]
                cls = " | " + " ".join(f"{k} {int(c)}" for k, c in zip(names, counts)) if args.stage == "stream" else ""
                rec["tok_per_s"], hw = meter.read()
                print0(f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {'-' if gnorm is None else f'{gnorm:.2f}'}"
                       f"{cls} | {rec['tok_per_s']:,.0f} tok/s{hw}")
            if (args.eval_every and step % args.eval_every == 0) or step == max_steps:
                nxt and nxt.result()
                ev = evaluate()
                rec.update(ev)
                if ev:
                    print0("eval " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                if "threshold" in ev:  # the activation model's operating point, saved with it (infer.py's default)
                    model.config.streampro_act_threshold = ev["threshold"]
                meter.restart()  # throughput counts training only
            log_line(log, rec)
            if step % args.save_every == 0 or step == max_steps or step == args.stop_at:
                nxt and nxt.result()
                save()
            if step == args.stop_at:
                print0(f"stopped at step {step} (--stop_at): continue with --resume")
                break
    if start >= max_steps:
        print0(f"nothing to do: {args.out} is at step {step} of {max_steps}")


if __name__ == "__main__":
    data.run_cli(main, get_args())
