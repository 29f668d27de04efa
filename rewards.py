"""
GRPO rewards (SPEC section 4): R = w_fmt * R_fmt + w_turn * R_turn + w_traj * R_traj (Eq. 5).
R_fmt checks every step's decision-token syntax, R_turn is the turn-level F1 with GT-first matching
(Algorithm 1), R_traj the mean of binary rubric marks. Rubrics come from an LLM designer (--make_rubrics)
or, for structured (slot) answers, from offline_rubric(), which needs no endpoint.

    python rewards.py --make_rubrics data/synthetic/train.jsonl --offline
    python rewards.py --make_rubrics ANN.jsonl --judge_url http://localhost:8000/v1 --judge_model NAME [--api_key_env VAR]

Both write ANN.rubrics.jsonl beside the annotations, one {"id", "rubric"} line per sample; a rerun skips
the ids already written.
"""
import argparse
import json
import os
import sys
import threading

from data import DECISION_TOKENS, RESPONSE, SILENCE, STANDBY, answer_end, check_flags, cli_args, load_annotations, run_cli
from metric import DIMENSIONS, EPS, ChatClient, JudgeError, ReplyError, accuracy, extract_json, read_jsonl

END_OF_TURN = "<|im_end|>"  # Qwen's end-of-turn token; decoded step outputs may still carry it

# -----------------------------------------------------------------------------
# Format reward


def step_format_ok(output, states=2):
    """Exactly the silence token (or, with states=3, the standby token), or the response token followed by
    non-empty text; surrounding whitespace and one trailing end-of-turn token are allowed. (ours) A reply
    whose text holds another decision token ("</Response> </Silence>") is malformed."""
    s = output.strip()
    if s.endswith(END_OF_TURN):
        s = s[:-len(END_OF_TURN)].strip()
    if s == SILENCE or (states == 3 and s == STANDBY):
        return True
    text = s[len(RESPONSE):] if s.startswith(RESPONSE) else ""
    return bool(text.strip()) and not any(tok in text for tok in DECISION_TOKENS + (END_OF_TURN,))


def format_reward(step_outputs, states=2):
    """R_fmt = mean over the K steps of the trajectory (0 for no steps)."""
    return sum(step_format_ok(o, states) for o in step_outputs) / len(step_outputs) if step_outputs else 0.0


# -----------------------------------------------------------------------------
# Turn-level F1 (Algorithm 1): each GT, in annotation order, takes the unmatched prediction with the best
# S' = S_time + S_acc inside its window. R_turn is in [0, 2].


def turn_f1_reward(sample, responses, judge, tau=8.0):
    preds = sorted(responses, key=lambda r: r["time"])  # candidates in time order: ties keep the earliest
    one_sided = sample["task"] in DIMENSIONS["PA"]  # Proactive Agency: only predictions up to t_g count
    used, total = set(), 0.0
    for g in sample["answers"]:
        tg = answer_end(g)  # interval answers are due at their end (ours, SPEC section 4)
        hi = tg if one_sided else tg + tau
        best, pick = 0.0, None
        for j, p in enumerate(preds):
            if j in used or not tg - tau - EPS <= p["time"] <= hi + EPS:
                continue
            s = max(0.0, 1.0 - abs(p["time"] - tg) / tau) + accuracy(sample, p["text"], g, judge)
            if s > best:  # strict: S' = 0 is never matched
                best, pick = s, j
        if pick is not None:
            used.add(pick)
            total += best
    n = len(preds) + len(sample["answers"])
    return 2 * total / n if n else 0.0


# -----------------------------------------------------------------------------
# Trajectory rubric reward, and the total


def rubric_reward(sample, responses, evaluator):
    """Mean of the evaluator's 0/1 marks over sample["rubric"]; 0.0 without a rubric (ours; total_reward
    then drops the term instead)."""
    items = sample.get("rubric") or []
    return sum(evaluator(sample, responses, it) for it in items) / len(items) if items else 0.0


def total_reward(sample, step_outputs, responses, judge, evaluator, w_fmt=0.1, w_turn=0.45, w_traj=0.45,
                 tau=8.0, states=2):
    """Eq. 5. (ours) A sample without rubric items (or w_traj = 0) has no trajectory term: traj is None and
    the other weights are not rescaled; every trajectory of a GRPO group shares the sample, so their
    advantages are unaffected."""
    fmt = format_reward(step_outputs, states)
    turn = turn_f1_reward(sample, responses, judge, tau)
    traj = rubric_reward(sample, responses, evaluator) if w_traj and sample.get("rubric") else None
    total = w_fmt * fmt + w_turn * turn + (w_traj * traj if traj is not None else 0.0)
    return {"total": total, "format": fmt, "turn": turn, "traj": traj}


# -----------------------------------------------------------------------------
# Offline rubric (ours): machine-checkable items for slot answers, so the synthetic benchmark needs no LLM


def _event(a):
    return f'"{a["text"].strip().rstrip(".")}" (at {answer_end(a):g}s)'


def offline_rubric(sample):
    """6-10 items: coverage of each expected event (with more than 5 events: the first 4 and one "all of
    them"), no hallucination, no over-splitting, no repeats, chronological order and no merging (the last
    two need 2+ events), padded with nothing-before-the-question and timeliness items. A sample with no
    answer gets six silence items. Each item carries a `check` that OfflineEvaluator decides."""
    gts, q, n, qt = sample["answers"], sample["question"], len(sample["answers"]), sample["query_time"]
    if n == 0:
        end = max(sample.get("duration", qt + 60.0), qt)
        mid = (qt + end) / 2
        items = [("coverage", f"No response describes an event for the question '{q}': none happens.", {"type": "no_hallucination"}),
                 ("granularity", "The assistant gives no response at all.", {"type": "max_responses", "max": 0}),
                 ("granularity", "The assistant gives at most one response.", {"type": "max_responses", "max": 1}),
                 ("coherence", f"The assistant says nothing before the question is asked at {qt:g}s.", {"type": "after_question"}),
                 ("coherence", f"The assistant stays silent from {qt:g}s to {mid:g}s.", {"type": "quiet", "from": qt, "to": mid}),
                 ("coherence", f"The assistant stays silent from {mid:g}s to the end.", {"type": "quiet", "from": mid, "to": end})]
    else:
        per_event = n if n <= 5 else 4
        items = [("coverage", f"The assistant reports {_event(gts[i])} after the question is asked.",
                  {"type": "covers", "answer": i}) for i in range(per_event)]
        if n > per_event:
            items.append(("coverage", f"The assistant reports all {n} expected events, including {_event(gts[4])} "
                          "and the ones after it.", {"type": "covers_all"}))
        items += [
            ("coverage", f"Every response reports one of the expected events for the question '{q}'; no response "
             "describes an event that does not happen.", {"type": "no_hallucination"}),
            ("granularity", f"The assistant gives at most {n + 1} responses, not splitting the {n} expected "
             f"event{'s' if n > 1 else ''} into more fragments.", {"type": "max_responses", "max": n + 1}),
            ("granularity", "The assistant reports each event once and does not repeat an event it already reported.",
             {"type": "no_duplicates"})]
        if n > 1:
            chrono = sorted(range(n), key=lambda i: (answer_end(gts[i]), i))
            order = ", then ".join(_event(gts[i]) for i in chrono[:4]) + (", and so on" if n > 4 else "")
            items += [("coherence", f"The assistant reports the events in the order they happen: {order}.", {"type": "order"}),
                      ("granularity", "No single response merges two different events into one vague answer.",
                       {"type": "not_merged"})]
        pads = [("coherence", f"The assistant says nothing before the question is asked at {qt:g}s.",
                 {"type": "after_question"})]
        pads += [("coherence", f"The assistant reports {_event(gts[i])} within 8 s of when it happens.",
                  {"type": "timely", "answer": i, "tol": 8.0}) for i in range(n)]
        while len(items) < 6:
            items.append(pads.pop(0))
    return [{"rubric_id": f"r{k + 1}", "dimension": d, "rubric": text, "check": check}
            for k, (d, text, check) in enumerate(items)]


class OfflineEvaluator:
    """Marks offline_rubric items with OfflineJudge slot matching: a response reports an answer when the
    judge gives it >= 0.99, at any time (coverage needs it after the question)."""

    def __init__(self, judge):
        self.judge = judge
        self._memo = (None, None)

    def assign(self, sample, responses):
        """Per response in time order: (response, the GT it reports, every GT it matches). A response is
        assigned to the first GT it matches that no earlier response took, else the first it matches (a
        repeat); None when it matches no GT (a hallucination)."""
        key = (id(sample), sample.get("id"), tuple((r["time"], r["text"]) for r in responses))
        if self._memo[0] == key:
            return self._memo[1]
        gts, taken, out = sample["answers"], set(), []
        for r in sorted(responses, key=lambda r: r["time"]):
            hits = [i for i, g in enumerate(gts) if self.judge.reports(r["text"], g)]
            i = next((i for i in hits if i not in taken), hits[0] if hits else None)
            taken.add(i)
            out.append((r, i, hits))
        self._memo = (key, out)
        return out

    def __call__(self, sample, responses, item):
        c, gts, qt = item["check"], sample["answers"], sample["query_time"]
        got = self.assign(sample, responses)
        covered = {i for r, i, _ in got if i is not None and r["time"] >= qt - EPS}
        reported = [i for _, i, _ in got if i is not None]
        rank = {i: k for k, i in enumerate(sorted(range(len(gts)), key=lambda i: (answer_end(gts[i]), i)))}
        kind = c["type"]
        if gts and not covered and kind not in ("covers", "covers_all"):
            # (ours) a trajectory that reports none of the expected events earns nothing: "no hallucination",
            # "no repeats", "in order"... hold vacuously for silence, and crediting them made GRPO on the tiny
            # model learn to stay silent (README). Samples with nothing to report keep their silence items.
            return 0
        if kind == "covers":
            ok = c["answer"] in covered
        elif kind == "covers_all":
            ok = len(covered) == len(gts)
        elif kind == "order":
            ok = all(rank[a] <= rank[b] for a, b in zip(reported, reported[1:]))
        elif kind == "no_hallucination":
            ok = all(i is not None for _, i, _ in got)
        elif kind == "no_duplicates":
            ok = len(set(reported)) == len(reported)
        elif kind == "max_responses":
            ok = len(responses) <= c["max"]
        elif kind == "not_merged":  # no response names two events with different content
            ok = all(len({json.dumps(g.get("slots") or g["text"], sort_keys=True) for g in gts
                          if self.judge.mentions(r["text"], g)}) <= 1 for r in responses)
        elif kind == "after_question":
            ok = all(r["time"] >= qt - EPS for r in responses)
        elif kind == "quiet":
            ok = not any(c["from"] - EPS <= r["time"] <= c["to"] + EPS for r in responses)
        elif kind == "timely":
            tg = answer_end(gts[c["answer"]])
            ok = any(i == c["answer"] and abs(r["time"] - tg) <= c["tol"] + EPS for r, i, _ in got)
        else:
            raise ValueError(f"unknown rubric check {kind!r} in item {item.get('rubric_id')}")
        return int(ok)


# -----------------------------------------------------------------------------
# LLM rubric designer and evaluator (same client, retries and cache as metric.HTTPJudge)


def _references(sample):
    return "\n".join(f"- at {answer_end(a):g}s" + (f" (from {a['start']:g}s)" if "start" in a else "") +
                     f": {a['text']}" for a in sample["answers"]) or "- (nothing: the right behaviour is silence)"


EVAL_PROMPT = """You check one rubric item against the responses a video assistant gave while watching a live video.

Question (asked at {qt:g}s): {question}
What actually happens (reference answers):
{references}
The assistant's responses, each with the time it was given:
{trajectory}

Rubric item: {rubric}

Does the assistant's trajectory satisfy this rubric item? Reply with JSON only:
{{"explanation": "<one sentence>", "mark": <1 if satisfied, else 0>}}"""

RUBRIC_PROMPT = """You design a grading rubric for one sample of a proactive streaming video assistant. The assistant watches a video live; after the question is asked it must respond at the right moments with the expected responses below, and stay silent otherwise.

Task: {task}
Question (asked at {qt:g}s): {question}
Expected responses, in time order:
{references}

Write 6 to 10 binary checkpoints that a grader can mark 0 or 1 by reading the assistant's timestamped responses. Each checkpoint is one assertive sentence about this sample (name its events), in one of three dimensions:
- granularity: the responses are neither split into too many fragments nor merged into vague summaries, given how long the events last;
- coherence: the responses follow the temporal and physical order of the events, with no skipped steps;
- coverage: every essential event is reported, and nothing that does not happen is reported.
Cover all three dimensions. Reply with a JSON list only:
[{{"rubric_id": "r1", "dimension": "coverage", "rubric": "..."}}, ...]"""


def parse_mark(reply):
    obj = extract_json(reply)
    v = next((obj[k] for k in ("mark", "score", "pass") if k in obj), None) if isinstance(obj, dict) else None
    if v in (0, 1, "0", "1"):  # True/False compare equal to 1/0
        return int(v)
    raise ReplyError(f"no 0/1 mark in {reply[:100]!r}")


def parse_rubric(reply):
    items = extract_json(reply)
    if not isinstance(items, list) or not 6 <= len(items) <= 10:
        raise ReplyError(f"expected a JSON list of 6-10 items, got {reply[:100]!r}")
    out = []
    for k, it in enumerate(items):
        if not (isinstance(it, dict) and it.get("dimension") in ("granularity", "coherence", "coverage")
                and isinstance(it.get("rubric"), str) and it["rubric"].strip()):
            raise ReplyError(f"item {k} needs a dimension (granularity|coherence|coverage) and a rubric: {it!r:.100}")
        out.append({"rubric_id": str(it.get("rubric_id") or f"r{k + 1}"), "dimension": it["dimension"],
                    "rubric": it["rubric"].strip()})
    return out


class LLMEvaluator:
    """Marks one rubric item 0/1 from the question, the references and the timestamped responses."""

    def __init__(self, url, model, api_key_env="OPENAI_API_KEY", cache_path=None, retries=5, timeout=60,
                 concurrency=8, backoff=1.0):
        self.client = ChatClient(url, model, api_key_env, cache_path, retries, timeout, concurrency, backoff)

    def __call__(self, sample, responses, item):
        traj = "\n".join(f"[{r['time']:g}s] {r['text']}" for r in sorted(responses, key=lambda r: r["time"]))
        prompt = EVAL_PROMPT.format(qt=sample["query_time"], question=sample["question"],
                                    references=_references(sample), trajectory=traj or "(no responses)",
                                    rubric=item["rubric"])
        return self.client.ask("rubric-mark", (prompt,), prompt, parse_mark, max_tokens=256)


def rubric_path(ann_path):
    return (ann_path[:-len(".jsonl")] if ann_path.endswith(".jsonl") else ann_path) + ".rubrics.jsonl"


def make_rubrics(ann_path, client=None):
    """Write a rubric per sample to rubric_path(ann_path): the LLM designer's through `client`, or
    offline_rubric with client=None. Resumable: ids already in the file are skipped; a sample whose rubric
    fails is reported by id and the others are kept. Returns (number written, [(id, error)])."""
    samples = load_annotations(ann_path, check_videos=False)
    out = rubric_path(ann_path)
    done = {e["id"] for e in read_jsonl(out) if isinstance(e, dict) and "id" in e}  # a cut line is redone
    todo = [s for s in samples if s["id"] not in done]
    lock, failed = threading.Lock(), []

    def one(s):
        try:
            if client is None:
                items = offline_rubric(s)
            else:
                prompt = RUBRIC_PROMPT.format(task=s["task"], qt=s["query_time"], question=s["question"],
                                              references=_references(s))
                items = client.ask("rubric-design", (prompt,), prompt, parse_rubric, max_tokens=2048)
        except JudgeError as e:
            failed.append((s["id"], str(e)))
            return
        with lock, open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": s["id"], "rubric": items}) + "\n")

    if client is None:
        for s in todo:
            one(s)
    else:
        client.map(one, todo, desc="rubrics")
    print(f"{out}: wrote {len(todo) - len(failed)} rubrics, {len(done)} already there, {len(failed)} failed")
    for sid, err in failed:
        print(f"  failed {sid}: {err}", file=sys.stderr)
    return len(todo) - len(failed), failed


def load_rubrics(ann_path, samples):
    """Attach sample["rubric"]: from ANN.rubrics.jsonl when it exists (samples it lacks get none, so their
    trajectory term is dropped), else offline_rubric for every sample."""
    path = rubric_path(ann_path)
    if not os.path.exists(path):
        for s in samples:
            s["rubric"] = offline_rubric(s)
        return samples
    by_id = {e["id"]: e["rubric"] for e in read_jsonl(path)}
    missing = [s["id"] for s in samples if s["id"] not in by_id]
    for s in samples:
        s["rubric"] = by_id.get(s["id"])
    if missing:
        print(f"{path}: no rubric for {len(missing)} samples (e.g. {missing[0]}): their trajectory term is dropped")
    return samples


def main():
    ap = argparse.ArgumentParser(description="Write per-sample trajectory rubrics (SPEC section 4).")
    ap.add_argument("--make_rubrics", metavar="ANN.jsonl", required=True, help="annotation file")
    ap.add_argument("--offline", action="store_true", help="write offline_rubric items (slot answers, no LLM)")
    ap.add_argument("--judge_url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    ap.add_argument("--judge_model", help="model name sent to the endpoint")
    ap.add_argument("--api_key_env", default="OPENAI_API_KEY", help="env var holding the API key (may be unset)")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(cli_args())
    check_flags(args, positive=("concurrency",))
    if not args.offline and not (args.judge_url and args.judge_model):
        ap.error("give --judge_url and --judge_model, or --offline")
    client = None if args.offline else ChatClient(args.judge_url, args.judge_model, args.api_key_env,
                                                  concurrency=args.concurrency)
    _, failed = make_rubrics(args.make_rubrics, client)
    return 1 if failed else 0  # (each failed sample is named above; a rerun retries only those)


if __name__ == "__main__":
    sys.exit(run_cli(main))
