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
import time
from collections import OrderedDict
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
from sft import (autocast_for, batch_indices, check_run, clip_and_step, log_line, lr_at, print0, restore, resume_point,
                 rng_state, set_grad_sync, wrap)

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
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="rollouts: HF incremental cache, or vLLM (vllm_engine.py)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=os.path.join(data.DEFAULT_DATA, "train.jsonl"))
    g.add_argument("--val", default=os.path.join(data.DEFAULT_DATA, "val.jsonl"))
    # The paper's RL tasks (StreamPro 4.3, B.2): EU, OU, AA, TP, TG, GP; RF is held out of SFT and RL.
    # (ours) on the synthetic data they are level 2's; real data: --levels '' (and --tasks '' for every task)
    g.add_argument("--levels", default="2", help="synthetic difficulty levels ('' = all)")
    g.add_argument("--tasks", default="EU,OU,AA,TP,TG,GP", help="tasks to train on, with --levels ('' = all)")
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
    g.add_argument("--lr", type=float, default=3e-5, help="paper 1e-6 for 3B/4B; tiny model: 3e-4 collapses the format reward (STUDY.md)")
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
    g.add_argument("--cache_gb", type=float, default=2.0, help="decoded frames kept in memory")
    words = data.cli_args(argv)
    args = p.parse_args(words)
    if args.preset:  # a preset fills in what the command line did not give
        data.fill_defaults(args, words, PRESETS[args.preset])
    return args


def check_args(args):
    """Flags that cannot work, named before anything loads (every rank, before the process group forms)."""
    data.check_flags(args, positive=("batch", "micro_batch", "max_new", "temperature", "fps", "chunk", "tau", "lr", "is_cap",
                                     "mask_cap", "save_every", "log_every", "judge_concurrency"),
                     non_negative=("window", "w_fmt", "w_turn", "w_traj", "eps", "eps_high", "kl", "grad_clip", "warmup",
                                   "max_steps", "epochs", "stop_at", "eval_every", "eval_samples", "cache_gb"),
                     fractions=("min_lr_ratio",))
    if args.group < 2:
        raise data.UserError(f"--group {args.group}: must be >= 2 (the advantages compare the trajectories of one video)")
    check_run(args)
    if args.judge == "http" and not (args.judge_url and args.judge_model):
        raise data.UserError("--judge http needs --judge_url and --judge_model")
    try:
        M.check_model(args.model)
    except data.UserError as e:
        raise data.UserError(f"{e}: run `python sft.py` first (or pass --model)") from None


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
        outs, S = infer.run_streams(M.unwrap(model), fmt, rows, iargs, policy, record=True)
    model.train()
    return [trajectory(s, b // args.group, o["responses"], S.segments[b], fmt, args.fps) for b, ((s, _), o) in enumerate(zip(rows, outs))]


def sequences(traj, keep_empty=False):
    """The trajectory as the sequences the policy saw (one per window segment): ids, images, the
    trainable positions (the model's own sampled tokens) and their sampling log-probabilities. Segments
    with nothing to train are left out, unless keep_empty."""
    out = []
    for seg in traj["segments"]:
        ids, train, old = list(seg["prefix"]), [0] * len(seg["prefix"]), [0.0] * len(seg["prefix"])
        images = list(seg["images"])
        for r in seg["turns"]:
            ids += r["user"] + r["content"] + r["tail"]
            train += [0] * len(r["user"]) + [int(lp is not None) for lp in r["logp"]] + [0] * len(r["tail"])
            old += [0.0] * len(r["user"]) + [lp or 0.0 for lp in r["logp"]] + [0.0] * len(r["tail"])
            images.append((r["pv"], r["grid"]))
        if any(train) or keep_empty:
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
    spare = {**sequences(trajs[0], keep_empty=True)[0], "adv": 0.0} if trajs else None  # update()'s padding
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
    return seqs, spare, comp, stats


def update(dmodel, ref, seqs, spare, n_train, args, fmt, never, engine, device, autocast, ddp, world):
    """One token-level clipped policy-gradient pass over this rank's sequences, normalised by the global
    number of trained tokens. With one update per rollout batch pi_old = pi_theta (detached), so rho = 1
    and the gradient is the policy gradient. `spare`: a sequence to pad with (weight 0) when this rank
    has fewer micro-batches than another, or none. A token whose log-probability is not finite (one the
    trainer masks, which the sampler must not emit) is left out of the loss, never into the weights.
    Returns (loss, KL, mean |trainer - sampler| log-prob gap)."""
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
        mb = (micro[0] if micro else [spare]) if pad else micro[j]
        b = collate_seqs(mb, fmt.tok.pad_token_id, fmt.image_token_id, device)
        with autocast:
            logp = token_logp(dmodel, b, args.temperature, never)
        ok = torch.isfinite(logp)
        logp = torch.where(ok, logp, 0.0)
        diff = (logp.detach() - b["old"]) * ok  # trainer vs sampler log-probs of the sampled tokens
        weight = ok.float()
        if engine:  # vLLM sampled: truncated importance ratio, and drop sequences that drifted too far
            n = len(mb)
            seq = torch.exp(diff.new_zeros(n).index_add(0, b["row"], diff) / torch.bincount(b["row"], minlength=n).clamp(min=1))
            weight = weight * torch.exp(diff).clamp(max=args.is_cap) * ((seq < args.mask_cap) & (seq > 1 / args.mask_cap)).float()[b["row"]]
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


# -----------------------------------------------------------------------------
# Setup and logging


def datasets(args):
    """The training videos with their rubrics, and the validation ones (--levels and --tasks: data.select)."""
    pick = lambda ss: data.select(ss, *data.parse_filter(args.levels, args.tasks))
    train = pick(data.load_annotations(args.data))
    if not train:
        raise data.UserError(f"{args.data}: no samples of --levels {args.levels!r} and --tasks {args.tasks!r} "
                         "(pass --levels '' --tasks '' to take every sample)")
    train = rewards.load_rubrics(args.data, train)
    val = pick(data.load_annotations(args.val))[: args.eval_samples] if args.val and os.path.isfile(args.val) else []  # --eval_samples 0: no eval
    return train, val


def reference(start, args, device):
    """The frozen reference policy of the KL term: only with --kl (it costs a second copy of the weights)."""
    if args.kl <= 0:
        return None
    ref, _ = M.load(start, device=device)
    return ref.eval().requires_grad_(False)


def policy(model, args, ddp, device):
    """The wrapped policy, AdamW and the parameters it trains."""
    dmodel = wrap(model, args, ddp, device)
    dmodel.train()  # (from_pretrained leaves eval mode, where gradient checkpointing is off)
    params = [p for p in dmodel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=device.startswith("cuda"))
    return dmodel, opt, params


def step_record(step, loss, kl, gap, gnorm, lr, comp, stats, times):
    """A step's log.jsonl line: the mean of each reward component over the global batch (score's `comp`),
    the zero-variance share of groups and the throughputs of rollout and update (`times`: t0..t3)."""
    t0, t1, t2, t3 = times
    mean = [None if math.isnan(x) else x for x in torch.nanmean(comp, 0).tolist()]  # JSON null, not NaN (r_traj with --w_traj 0)
    rec = {"step": step, "loss": loss, "reward": mean[0], "r_format": mean[1], "r_turn": mean[2], "r_traj": mean[3],
           "response_rate": mean[4], "zero_var": stats[3].item() / stats[4].item(), "gnorm": gnorm, "lr": lr, "logp_gap": gap,
           "rollout_tok_s": stats[2].item() / max(t1 - t0, 1e-9), "train_tok_s": stats[1].item() / max(t3 - t2, 1e-9)}
    if kl is not None:
        rec["kl"] = kl
    return rec


def step_line(r, max_steps):
    f = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"
    return (f"step {r['step']}/{max_steps} | reward {f(r['reward'])} (fmt {f(r['r_format'], 2)} turn {f(r['r_turn'])} "
            f"traj {f(r['r_traj'])}) | resp/turn {f(r['response_rate'])} | zero-var {r['zero_var']:.2f} | loss {r['loss']:+.4f} "
            f"| gnorm {f(r['gnorm'], 2)} | rollout {r['rollout_tok_s']:,.0f} tok/s | train {r['train_tok_s']:,.0f} tok/s")


class FrameCache:
    """Decoded frames by sample id, the least recently used dropped beyond `gb` (a 240-s video is ~68 MB
    at 1 fps: a whole training set would not fit): the training set is revisited every epoch."""

    def __init__(self, fmt, fps, gb=2.0):
        self.fmt, self.fps, self.limit, self.bytes, self.cache = fmt, fps, gb * 2**30, 0, OrderedDict()

    def __call__(self, s):
        if s["id"] in self.cache:
            self.cache.move_to_end(s["id"])
            return self.cache[s["id"]]
        f = self.cache[s["id"]] = self.fmt.video(s["video_path"], self.fps, s["duration"])[0]
        self.bytes += f.nbytes
        while self.bytes > self.limit and len(self.cache) > 1:
            self.bytes -= self.cache.popitem(last=False)[1].nbytes
        return f


def make_judges(args, samples):
    """S_acc's judge and the rubric evaluator: offline (exact slots, the default) or an LLM over HTTP."""
    if args.judge == "http":
        judge = metric.HTTPJudge(args.judge_url, args.judge_model, args.api_key_env, os.path.join(args.out, "judge_cache.jsonl"),
                                 concurrency=args.judge_concurrency)
        return judge, rewards.LLMEvaluator(args.judge_url, args.judge_model, args.api_key_env, os.path.join(args.out, "rubric_cache.jsonl"))
    judge = metric.OfflineJudge.from_samples(samples)
    return judge, rewards.OfflineEvaluator(judge)


# -----------------------------------------------------------------------------
# vLLM rollouts (vllm_engine): run on a CPU by test_vllm.py


class VLLMRollout:
    """`rollout` through a colocated vLLM engine: the same turns, window segments (data.window_start) and
    records, with the sampler's processed log-probabilities as `logp`. Every step first pushes the policy's
    weights; the engine sleeps while the trainer runs where the platform can. A turn is sampled in two calls,
    as the Sampler decides: its first token over the whole vocabulary but the `never` ids, then, unless that
    was a silence or the end of turn, the rest up to the end of turn (a single call would stop at a decision
    token in mid-answer, or sample a whole answer for every silent turn)."""

    def __init__(self, path, fmt, args, rank, samples, never):
        import vllm_engine as V
        self.V, self.fmt, self.args = V, fmt, args
        system = data.SYSTEM_PROMPT_3 if args.states == 3 else data.SYSTEM_PROMPT
        self.system = fmt.system_ids(system)
        n = max(data.num_turns(s["duration"], args.fps) for s in samples)
        q = max(len(fmt.ids(s["question"])) for s in samples)
        self.llm = V.make_engine(path, fmt, args.dtype, V.max_model_len(fmt, args.window, args.chunk, n, args.max_new, q, system),
                                 V.turns_in_context(args.window, args.chunk, n), seed=args.seed * 1000 + rank, colocated=True,
                                 logprobs="processed_logprobs")
        bias = V.ban(never.nonzero()[:, 0].tolist())
        self.first, self.rest = V.first_params(args.temperature, bias), V.answer_params(fmt, args.max_new, args.temperature, bias)
        self.quiet = {fmt.decision_ids[t] for t in V.QUIET} | {fmt.eos_id}

    def rollout(self, videos, model):
        a, fmt, V = self.args, self.fmt, self.V
        V.push_weights(self.llm, model, a.dtype)
        rows = [v for v in videos for _ in range(a.group)]
        streams = [V.Row(fmt, self.system, data.question_turn(s["query_time"], a.fps)) for s, _ in rows]
        recs = [[] for _ in rows]  # the trainer's view of each turn: full ids, pixel values, log-probs
        segs = [[{"prefix": list(self.system), "images": [], "turns": []}] for _ in rows]
        resp, start = [[] for _ in rows], 0
        for k in range(max(len(f) for _, f in rows)):
            if data.window_start(k, a.window, a.chunk) > start:  # a new segment, as infer.Streams rebuilds
                start = data.window_start(k, a.window, a.chunk)
                for b, row in enumerate(streams):
                    keep = [recs[b][j] for j in ([row.q] if row.q < start else []) + list(range(start, len(recs[b])))]
                    segs[b].append({"prefix": list(self.system) + [i for r in keep for i in r["ids"]],
                                    "images": [(r["pv"], r["grid"]) for r in keep], "turns": []})
            live = [b for b, (_, f) in enumerate(rows) if k < len(f)]
            for b in live:
                s, frames = rows[b]
                question = s["question"] if k == streams[b].q else None
                pv, grid, n_img = fmt.images(frames[k][None])
                streams[b].add(frames[k][-1], data.time_marker(k, a.fps), question)
                r = {"user": fmt.user_ids(data.time_marker(k, a.fps), n_img[0], question), "pv": pv, "grid": grid,
                     "question": question is not None, "tail": list(fmt.asst_close_tail), "content": [fmt.decision_ids[data.SILENCE], fmt.eos_id],
                     "logp": [None, None]}  # forced silence before the question: not sampled, not trained
                recs[b].append(r)
                segs[b][-1]["turns"].append(r)
            todo = [b for b in live if k >= streams[b].q]
            res = self.llm.generate([streams[b].prompt(a.window, a.chunk) for b in todo], self.first, use_tqdm=False) if todo else []
            more = []
            for b, o in zip(todo, res):
                (t,), (lp,) = V.token_logps(o.outputs[0])
                recs[b][k].update(content=[t] if t == fmt.eos_id else [t, fmt.eos_id], logp=[lp] if t == fmt.eos_id else [lp, None])
                if t not in self.quiet:
                    more.append(b)
            res = self.llm.generate([streams[b].prompt(a.window, a.chunk, recs[b][k]["content"][:1]) for b in more], self.rest,
                                    use_tqdm=False) if more else []
            for b, o in zip(more, res):
                ids, lps = V.token_logps(o.outputs[0])
                if not ids or ids[-1] != fmt.eos_id:  # cut off at max_new: the end of turn is forced
                    ids, lps = ids + [fmt.eos_id], lps + [None]
                recs[b][k].update(content=recs[b][k]["content"][:1] + ids, logp=recs[b][k]["logp"][:1] + lps)
            for b in live:
                r = recs[b][k]
                r["ids"] = r["user"] + r["content"] + r["tail"]
                streams[b].turns[k]["content"] = r["content"]
                dec, text = infer.response_text(fmt, r["content"])
                if dec == data.RESPONSE:
                    resp[b].append({"time": (k + 1) / a.fps, "text": text})
        V.sleep(self.llm)
        return [trajectory(s, b // a.group, resp[b], segs[b], fmt, a.fps) for b, (s, _) in enumerate(rows)]


# -----------------------------------------------------------------------------
# main: setup, then the loop (rollout, score, update)


def main(args):
    check_args(args)
    ddp, rank, world, device = M.setup_dist()
    start = M.resolve(args.model)
    ckpt = resume_point(args, rank, ddp)
    model, processor = M.load(ckpt or start, device=device)
    fmt = data.ChatFormat(processor, M.frames_per_turn(model))
    train, val = datasets(args)
    frames_of = FrameCache(fmt, args.fps, args.cache_gb)
    judge, evaluator = make_judges(args, train + val)
    ref = reference(start, args, device)
    max_steps = args.max_steps or math.ceil(args.epochs * len(train) / args.batch)
    never = M.vocab_mask(model, processor.tokenizer).to(device)  # ids the policy never emits (sampling and training agree)
    engine = VLLMRollout(start, fmt, args, rank, train, never) if args.backend == "vllm" else None
    dmodel, opt, params = policy(model, args, ddp, device)
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    state = restore(ckpt, dmodel, opt)
    if ckpt and rank < len(state["rng"]["sampler"]):  # the sampler's generator, per rank
        gen.set_state(state["rng"]["sampler"][rank])
    step = state["step"]
    cfg = vars(args).copy()
    print0(json.dumps(cfg))
    print0(f"GRPO: {start} -> {args.out}, {len(train)} training videos, G={args.group}, {world} process(es), {max_steps} steps")
    log = M.open_log(args.out, step if ckpt else -1) if rank == 0 else None  # no checkpoint: a fresh log
    autocast = autocast_for(device, args)
    sizes = M.flop_sizes(model)

    def save():
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, gen.get_state())
        else:
            states = [gen.get_state()]
        M.save_checkpoint(args.out, dmodel, processor, opt, {"step": step, "config": cfg, "rng": {**rng_state(), "sampler": states}}, rank)

    if val and not ckpt:
        ev = evaluate(dmodel, fmt, val, frames_of, args, judge, rank, world, never, device)
        print0("eval (before) " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        log_line(log, {"step": 0, **ev})
    while step < max_steps:
        t0 = time.time()
        videos = [(train[i], frames_of(train[i])) for i in batch_indices(step, args.batch, len(train), args.seed)[rank::world]]
        if engine:
            trajs = engine.rollout(videos, dmodel)
        else:
            trajs = rollout(dmodel, fmt, videos, args, gen, never)
        t1 = time.time()
        seqs, spare, comp, stats = score(trajs, len(videos), args, judge, evaluator, ddp)
        lr = lr_at(step, max_steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        t2 = time.time()
        loss, kl, gap = update(dmodel, ref, seqs, spare, max(1.0, stats[0].item()), args, fmt, never, engine, device, autocast, ddp, world)
        gnorm = clip_and_step(opt, params, args.grad_clip, step)
        step += 1
        t3 = time.time()
        rec = step_record(step, loss, kl if args.kl > 0 else None, gap, gnorm, lr, comp, stats, (t0, t1, t2, t3))
        if step % args.log_every == 0 or step == max_steps:
            flops = M.train_flops(sizes, [len(s["ids"]) for s in seqs], sum(len(p) for s in seqs for p, _ in s["images"]))
            print0(step_line(rec, max_steps) + M.hw_stats(device, flops, t3 - t2))
        if val and ((args.eval_every and step % args.eval_every == 0) or step == max_steps):
            ev = evaluate(dmodel, fmt, val, frames_of, args, judge, rank, world, never, device)
            rec.update(ev)
            print0("eval " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        log_line(log, rec)
        if step % args.save_every == 0 or step == max_steps or step == args.stop_at:
            save()
        if step == args.stop_at:
            print0(f"stopped at step {step} (--stop_at): continue with --resume")
            break
    M.teardown_dist(ddp)


if __name__ == "__main__":
    data.run_cli(main, get_args())
