"""
StreamPro-F1 (SPEC section 3): per-task timing windows, prediction-first greedy matching, S = S_time * S_acc,
per-sample precision / recall / F1, task and dimension means. Plus the judges that give S_acc:
OfflineJudge (normalised slot match / lexical overlap; NOT the paper's LLM judge) and HTTPJudge (any
OpenAI-compatible chat endpoint, the paper's 0-5 rubric). bench.py is the command line around this file.
"""
import collections
import concurrent.futures
import hashlib
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from data import INTERVAL_TASKS, TASKS, UserError

# -----------------------------------------------------------------------------
# Timing table (SPEC section 3). The window is [t_opt_start - before, t_opt_end + after], both ends inclusive.
# interval: t_opt is the answer's [start, end] (dt = 0 inside); otherwise t_opt is the answer's time or end.

Timing = collections.namedtuple("Timing", "interval before after tau_early tau_late")
TIMING = {
    "EU": Timing(True, 0, 3, 4, 4),   # event interval; window [start, end + 3]
    "OU": Timing(False, 3, 3, 4, 4),  # state-transition time; [t - 3, t + 3]
    "AA": Timing(False, 0, 5, 6, 6),  # anomaly onset; [t, t + 5]
    "TP": Timing(True, 0, 3, 4, 4),   # event interval; [start, end + 3]
    "TG": Timing(False, 3, 3, 4, 4),  # event end; [t - 3, t + 3]
    "GP": Timing(False, 3, 0, 4, 4),  # completion of the previous step; [t - 3, t]
    "RF": Timing(False, 1, 3, 2, 4),  # warning time (annotated); [t - 1, t + 3], tau 2 early / 4 late
}
DEFAULT_TIMING = Timing(False, 3, 3, 4, 4)  # any other task (ours): timestamp task, [t - 3, t + 3], tau 4
assert {t for t, w in TIMING.items() if w.interval} == set(INTERVAL_TASKS)
DIMENSIONS = {"PU": ("EU", "OU", "AA"), "TR": ("TP", "TG"), "PA": ("GP", "RF")}
EPS = 1e-9  # (ours) window edges are inclusive, so a float like 0.1 + 0.2 - 3 must not fall off an edge


def optimal_span(timing, answer):
    """t_opt as an interval [a, b]: an interval task keeps [start, end] (an instant is [t, t]); a
    timestamp task answers at the instant's time or the interval's end (SPEC section 1)."""
    if "time" in answer:
        return answer["time"], answer["time"]
    return (answer["start"], answer["end"]) if timing.interval else (answer["end"], answer["end"])


def time_score(timing, span, t):
    """S_time = max(0, 1 - dt / tau), dt = distance from t to the span (0 inside it) (Eq. 8)."""
    a, b = span
    if t < a:
        return max(0.0, 1.0 - (a - t) / timing.tau_early)
    return max(0.0, 1.0 - (t - b) / timing.tau_late) if t > b else 1.0


# -----------------------------------------------------------------------------
# Temporal grounding: S_acc is the IoU of the interval written in the reply with the ground truth

_T = r"(\d+(?::\d{1,2}){1,2}(?:\.\d+)?|\d+(?:\.\d+)?)"  # 12 | 12.5 | 00:12 | 1:02:03
_U = r"(?:\s*(?:s|secs?|seconds?)\b)?"
_END = r"(?:it\s+)?end(?:s|ed|ing)?\s*(?:at\s*)?"  # "start 12 end 18", "starts at 12s and ends at 18s"
_SEP = rf"(?:\s*(?:-+|–|—|~|to|until|till|through|and|,)\s*(?:{_END})?|\s*{_END})"
_SPAN = re.compile(rf"(?<![\d.:]){_T}{_U}{_SEP}{_T}{_U}", re.IGNORECASE)


def _seconds(s):
    v = 0.0
    for part in s.split(":"):  # ss | mm:ss | h:mm:ss
        v = v * 60 + float(part)
    return v


def parse_interval(text):
    """The first '<time> <separator> <time>' in the text as (start, end) in seconds, or None. A reversed
    pair is swapped (ours): '18 to 12' still names the segment [12, 18]."""
    m = _SPAN.search(text)
    if m is None:
        return None
    a, b = _seconds(m.group(1)), _seconds(m.group(2))
    return (a, b) if a <= b else (b, a)


def iou(p, g):
    """Intersection over union of two closed intervals. (ours) Zero-length intervals: two identical points
    give 1; a point against anything else has zero intersection and so gives 0."""
    union = max(p[1], g[1]) - min(p[0], g[0])
    if union <= 0:
        return 1.0 if p == g else 0.0
    return max(0.0, min(p[1], g[1]) - max(p[0], g[0])) / union


def accuracy(sample, text, answer, judge):
    """S_acc in [0, 1]: IoU for TG, the judge for every other task. Shared with rewards.py."""
    if sample["task"] == "TG":
        span = parse_interval(text)
        gt = (answer["time"], answer["time"]) if "time" in answer else (answer["start"], answer["end"])
        return 0.0 if span is None else iou(span, gt)
    return judge(sample["question"], text, answer)


# -----------------------------------------------------------------------------
# StreamPro-F1 of one sample, and the table over many


def score_sample(sample, responses, judge):
    """Prediction-first greedy matching (SPEC section 3). responses: [{"time", "text"}] in any order.
    Returns P, R, F1, Time, Acc, counts, and per-GT / per-prediction details (for bench.py --show)."""
    timing = TIMING.get(sample["task"], DEFAULT_TIMING)
    gts = sample["answers"]
    spans = [optimal_span(timing, g) for g in gts]
    windows = [(a - timing.before, b + timing.after) for a, b in spans]
    best = [None] * len(gts)  # per GT: (S, S_time, S_acc, response index) of its best-scoring match
    preds = []
    for j in sorted(range(len(responses)), key=lambda j: responses[j]["time"]):  # stable: ties keep input order
        t = responses[j]["time"]
        i = next((i for i, (lo, hi) in enumerate(windows) if lo - EPS <= t <= hi + EPS), None)
        st = sa = s = 0.0
        if i is not None:  # the judge is only asked about predictions inside a window
            st = time_score(timing, spans[i], t)
            sa = accuracy(sample, responses[j]["text"], gts[i], judge)
            s = st * sa
            if best[i] is None or s > best[i][0]:  # strict: ties keep the earliest
                best[i] = (s, st, sa, j)
        preds.append({"index": j, "time": t, "gt": i, "s_time": st, "s_acc": sa, "s": s})
    matches = [{"optimal": list(spans[i]), "window": list(windows[i]), "match": b[3] if b else None,
                "s": b[0] if b else 0.0, "s_time": b[1] if b else 0.0, "s_acc": b[2] if b else 0.0}
               for i, b in enumerate(best)]
    total, n_pred, n_gt = sum(m["s"] for m in matches), len(responses), len(gts)
    p = total / n_pred if n_pred else 0.0
    r = total / n_gt if n_gt else 0.0
    row = {"id": sample.get("id"), "task": sample["task"], "precision": p, "recall": r,
           "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0,
           "time": sum(m["s_time"] for m in matches) / n_gt if n_gt else 0.0,  # (ours) 0 with no GT
           "acc": sum(m["s_acc"] for m in matches) / n_gt if n_gt else 0.0,
           "n_pred": n_pred, "n_gt": n_gt, "matches": matches, "preds": preds}
    if "duration" in sample:  # turns from the question's turn to the end, 1 fps (ours, for the response rate)
        row["turns"] = max(0, math.ceil(sample["duration"] - EPS) - math.floor(sample["query_time"]))
    return row


COLUMNS = ("time", "acc", "precision", "recall", "f1")


def _means(rows):
    return {"n": len(rows), **{c: sum(r[c] for r in rows) / len(rows) for c in COLUMNS}}


def aggregate(rows):
    """Per-task and per-dimension means over samples (score_sample rows, which carry "task"). Avg = mean of
    the dimension F1s of the dimensions that have samples (ours: a missing dimension is left out rather than
    counted as 0; None when no sample is in any dimension); W-Avg = mean F1 over all samples. Time and Acc
    (ours) are, like P/R/F1, means over samples of each sample's mean over its GTs. Response rate
    (ours) = responses / turns from the question to the end, over the samples that know their duration."""
    by_task = collections.defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    order = [t for t in TASKS if t in by_task] + sorted(t for t in by_task if t not in TASKS)
    dims = {d: _means([r for t in ts for r in by_task.get(t, [])])
            for d, ts in DIMENSIONS.items() if any(t in by_task for t in ts)}
    timed = [r for r in rows if "turns" in r]
    n_turns = sum(r["turns"] for r in timed)
    return {"tasks": {t: _means(by_task[t]) for t in order}, "dims": dims,
            "avg": sum(d["f1"] for d in dims.values()) / len(dims) if dims else None,
            "w_avg": sum(r["f1"] for r in rows) / len(rows) if rows else 0.0, "n": len(rows),
            "response_rate": sum(r["n_pred"] for r in timed) / n_turns if n_turns else None,
            "n_responses": sum(r["n_pred"] for r in rows), "n_turns": n_turns}


def roc_auc(scores, labels):
    """Threshold-free separation of two classes: P(score of a positive > score of a negative), ties
    counted one half (Mann-Whitney U from average ranks); nan when a class is missing. Used on
    p(</Response>) at the decision positions, to tell a moved threshold from better perception."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct value, ties averaged
    return float((avg_rank[inv][y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -----------------------------------------------------------------------------
# Offline judge: for tests and structured benchmarks. It is NOT the paper's LLM judge.

STOPWORDS = frozenset("a an the is are was were be been it its this that these those of to in on at by for with "
                      "and or as has have had just now then there here i you he she they we do does did".split())


def _tokens(text):
    """Lower-case word and number tokens; punctuation and hyphens split words ("top-left" = "top left") and
    numbers are canonical ("12.0" = "12")."""
    out = []
    for tok in re.findall(r"\d+(?:\.\d+)?|[^\W\d_]+", str(text).lower()):
        if tok[0].isdigit():
            v = float(tok)
            tok = str(int(v)) if v.is_integer() else repr(v)
        out.append(tok)
    return out


def _phrase(text):
    return " " + " ".join(_tokens(text)) + " "  # padded, so ' red ' matches whole words only


def _spans(hay, needle):
    out, i = [], hay.find(needle)
    while i >= 0:
        out.append((i, i + len(needle)))
        i = hay.find(needle, i + 1)
    return out


class OfflineJudge:
    """S_acc without an LLM (an approximation, not the paper's judge). The reference text itself scores 1.
    Answers with `slots` ({key: value}):
    the mean over slots of 1 if the value is named in the prediction and no other value of that key (its
    vocabulary is learned from all answers of the file) is, else 0. A value inside a longer known value
    ("red" in "dark red") does not count as named. Free text: token F1 over content words (ours)."""

    def __init__(self, vocab=None):
        self.vocab = {k: set(v) for k, v in (vocab or {}).items()}  # key -> set of padded phrases

    @classmethod
    def from_samples(cls, samples):
        vocab = collections.defaultdict(set)
        for s in samples:
            for a in s["answers"]:
                for k, v in a.get("slots", {}).items():
                    vocab[k].add(_phrase(v))
        return cls(vocab)

    def __call__(self, question, prediction, answer):
        pred = _phrase(prediction)
        if pred == _phrase(answer["text"]):
            return 1.0  # (ours) the reference itself is always right, even if its text omits a slot value
        slots = answer.get("slots")
        if not slots:
            return self.lexical(pred, answer["text"])
        return sum(self._slot_ok(pred, k, _phrase(v)) for k, v in slots.items()) / len(slots)

    def _slot_ok(self, pred, key, value):
        named = [v for v in self.vocab.get(key, set()) | {value} if v in pred]
        if named == [value]:
            return 1.0
        if value not in named:
            return 0.0
        # several values of the key occur: keep those not wholly inside an occurrence of a longer one
        spans = {v: _spans(pred, v) for v in named}
        def free(v):
            return any(not any(w != v and len(w) > len(v) and a <= x and y <= b for w in named for a, b in spans[w])
                       for x, y in spans[v])
        return 1.0 if [v for v in named if free(v)] == [value] else 0.0

    @staticmethod
    def lexical(pred, ref):
        p = collections.Counter(t for t in pred.split() if t not in STOPWORDS)
        r = collections.Counter(t for t in _tokens(ref) if t not in STOPWORDS)
        if not p or not r:
            return float(not p and not r)
        common = sum((p & r).values())
        return 2 * common / (sum(p.values()) + sum(r.values()))

    def reports(self, prediction, answer):
        """Does this response report this answer (rewards.py's offline rubric)?"""
        return self(None, prediction, answer) >= 0.99

    def mentions(self, prediction, answer):
        """Are all the answer's slot values named, conflicting values or not (a merged reply names two)?"""
        pred, slots = _phrase(prediction), answer.get("slots")
        return all(_phrase(v) in pred for v in slots.values()) if slots else self.reports(prediction, answer)


# -----------------------------------------------------------------------------
# OpenAI-compatible chat client: retries, on-disk cache, thread pool. Used by HTTPJudge and rewards.py.


class JudgeError(UserError, RuntimeError):  # an endpoint that fails after the retries: a URL, a key, a server to fix
    pass


class ReplyError(ValueError):
    """The endpoint answered, but not in the form asked for: the request is retried."""


def chat_url(url):
    """Accept http://host:8000, http://host:8000/v1 or the full .../v1/chat/completions."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def extract_json(text):
    """The first JSON object or list in a reply that may wrap it in code fences or prose; None if none."""
    text = re.sub(r"```(?:json)?", "", text)
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            try:
                return json.loads(text[i:j + 1])
            except json.JSONDecodeError:
                pass
    return None


def read_jsonl(path):
    """The entries of a JSONL file that we append to. A line cut short by an interrupted run is skipped, and
    the file gets its missing newline back so the next entry starts a line of its own."""
    out, line = [], ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        if line and not line.endswith("\n"):
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return out


class ChatClient:
    """POSTs one user prompt to a chat endpoint; replies are parsed, cached on disk and shared by threads."""

    def __init__(self, url, model, api_key_env="OPENAI_API_KEY", cache_path=None, retries=5, timeout=60,
                 concurrency=8, backoff=1.0):
        self.url, self.model, self.retries, self.timeout = chat_url(url), model, retries, timeout
        self.concurrency, self.backoff, self.cache_path = concurrency, backoff, cache_path
        self._key = os.environ.get(api_key_env) if api_key_env else None  # None: a local server without auth
        self._lock = threading.Lock()
        self._cache = {}
        if cache_path:
            self._cache = {e["key"]: e["value"] for e in read_jsonl(cache_path) if isinstance(e, dict) and "key" in e}

    def cache_key(self, kind, fields):
        return hashlib.sha256(json.dumps([self.model, kind, *fields]).encode()).hexdigest()

    def cached(self, kind, fields):
        return self.cache_key(kind, fields) in self._cache

    def _clean(self, msg):
        return msg.replace(self._key, "***") if self._key else msg  # in case a server echoes the key back

    def ask(self, kind, fields, prompt, parse, max_tokens=512):
        """One user prompt -> parse(reply text), cached under (model, kind, *fields). Network errors, timeouts,
        429, 5xx and unparseable replies are retried with exponential backoff; other HTTP errors fail at once."""
        key = self.cache_key(kind, fields)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(60.0, self.backoff * 2 ** (attempt - 1)))
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read())["choices"][0]["message"]["content"]
                value = parse(reply)
                break
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}: {e.read()[:200].decode('utf-8', 'replace')}"
                if e.code != 429 and e.code < 500:
                    raise JudgeError(self._clean(f"{self.url}: {last}")) from None
            except ReplyError as e:
                last = f"unusable reply ({e})"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"network error ({e})"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                last = f"not an OpenAI chat-completions response ({type(e).__name__}: {e})"
        else:
            raise JudgeError(self._clean(f"{self.url}: no usable reply after {self.retries + 1} attempts; last: {last}"))
        with self._lock:
            self._cache[key] = value
            if self.cache_path:  # appended and flushed per answer: an interrupted run loses nothing
                os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "kind": kind, "value": value}) + "\n")
        return value

    def map(self, fn, items, desc="judge"):
        """fn over items in a thread pool of `concurrency`, with a progress bar."""
        from tqdm import tqdm
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=len(items) < 2))


JUDGE_PROMPT = """You grade the answer of an assistant that watches a live video and answers a question about it.

Question: {question}
Reference answer: {reference}
Predicted answer: {prediction}

Score the predicted answer against the reference answer with an integer from 0 to 5:
5 = fully accurate and complete.
4 = correct, with the key information; minor omissions.
3 = partially relevant, but important information is missing.
2 = tangential or speculative.
1 = factually incorrect.
0 = no attempt, or off-topic.
Rephrasings are not penalised, and neither is leaving out secondary detail.
Reply with JSON only: {{"explanation": "<one sentence>", "score": <integer 0-5>}}"""


def parse_score(reply):
    obj = extract_json(reply)
    v = obj.get("score") if isinstance(obj, dict) else None
    if v is None:
        m = re.search(r"score\W{0,4}(-?\d+(?:\.\d+)?)", reply, re.IGNORECASE)
        v = m and m.group(1)
    try:
        return min(5, max(0, round(float(v))))
    except (TypeError, ValueError):
        raise ReplyError(f"no score in {reply[:100]!r}") from None


class HTTPJudge:
    """The paper's LLM judge (0-5 rubric, S_acc = score / 5) on any OpenAI-compatible endpoint."""

    def __init__(self, url, model, api_key_env="OPENAI_API_KEY", cache_path=None, retries=5, timeout=60,
                 concurrency=8, backoff=1.0):
        self.client = ChatClient(url, model, api_key_env, cache_path, retries, timeout, concurrency, backoff)

    def __call__(self, question, prediction, answer):
        if not prediction.strip():
            return 0.0  # (ours) an empty reply is "no attempt" without asking
        fields = (question, prediction, answer["text"])
        prompt = JUDGE_PROMPT.format(question=question, reference=answer["text"], prediction=prediction)
        return self.client.ask("judge", fields, prompt, parse_score, max_tokens=256) / 5

    def prefetch(self, items):
        """Judge many (question, prediction, answer) at once in the thread pool, so later calls hit the cache."""
        todo, seen = [], set()
        for q, p, a in items:
            k = (q, p, a["text"])
            if p.strip() and k not in seen and not self.client.cached("judge", k):
                seen.add(k)
                todo.append((q, p, a))
        self.client.map(lambda x: self(*x), todo)
        return len(todo)
