"""
The streaming turn format: annotations, video decoding, turns and labels, tokenisation, windows.
sft.py, grpo.py, infer.py and bench.py all build their conversations here, so the format has one
definition (SPEC section 1).

It is the bottom of the repo: it imports nothing of ours. Its command lines live with what they need:

    python synthetic.py                      # generate the synthetic benchmark into data/synthetic
    python model.py --show 1                 # one tokenised training conversation, coloured (show, below)
    python formats.py --from_streamo stream_format.json --out data/streamo/train.jsonl --video_root DIR
"""
import json
import math
import os
import sys

import numpy as np
import torch

# -----------------------------------------------------------------------------
# The format's vocabulary

SILENCE, STANDBY, RESPONSE = "</Silence>", "</Standby>", "</Response>"
DECISION_TOKENS = (SILENCE, STANDBY, RESPONSE)  # all three are added to every tokenizer (model.py)
STATES = {2: (SILENCE, RESPONSE), 3: (SILENCE, STANDBY, RESPONSE)}  # decision classes, in class order
# per-position classes in the `classes` array (IGNORE = not supervised)
IGNORE, C_SILENCE, C_STANDBY, C_RESPONSE, C_TEXT = -1, 0, 1, 2, 3
CLASS_OF = {SILENCE: C_SILENCE, STANDBY: C_STANDBY, RESPONSE: C_RESPONSE}

TASKS = ("EU", "OU", "AA", "TP", "TG", "GP", "RF")  # StreamPro-Bench; any other task name is allowed
INTERVAL_TASKS = ("EU", "TP")  # t_opt is the interval itself (SPEC section 3)

SYSTEM_PROMPT = (
    "You are watching a live video stream. Each user turn brings the next frame, labelled with the "
    "seconds it covers, such as <3s-4s>. The question is asked once, in the turn where the user asks it. "
    f"After every frame answer with exactly one of two outputs. Output {SILENCE} while the event the "
    "question is about has not finished yet or the frame is not relevant. Output "
    f"{RESPONSE} followed by a complete, final answer as soon as the event has finished or you have "
    "enough information to answer. Never give partial answers and never guess about what has not "
    "happened."
)
SYSTEM_PROMPT_3 = SYSTEM_PROMPT.replace(
    "After every frame answer with exactly one of two outputs.",
    f"After every frame answer with exactly one of three outputs. Output {STANDBY} when a relevant event "
    "has started but not finished.",
)


# -----------------------------------------------------------------------------
# Annotations (SPEC section 1): one JSON object per line


class UserError(ValueError):
    """Bad input: a flag, a file, a line of one. Every command line answers it with one line, `error: ...`,
    and exit status 2 (run_cli); any other exception is a bug and keeps its traceback."""


class AnnotationError(UserError):
    pass


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_annotations(path, check_videos=True):
    """Read and validate a JSONL annotation file. Every error names the file, the line, the field and
    what was expected. Returns the samples with `video_path` (absolute) added. With check_videos the
    video files must exist and a missing `duration` is read from the video."""
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: annotation file not found")
    root = os.path.dirname(os.path.abspath(path))
    samples, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue

            def fail(field, msg):
                raise AnnotationError(f"{path}:{lineno}: field '{field}': {msg}")

            try:
                s = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(s, dict):
                raise AnnotationError(f"{path}:{lineno}: expected a JSON object, got {type(s).__name__}")
            for field in ("id", "video", "task", "question"):
                if not isinstance(s.get(field), str) or not s[field]:
                    fail(field, "missing, expected a non-empty string" if field not in s else f"expected a non-empty string, got {s[field]!r}")
            if s["id"] in seen:
                fail("id", f"duplicate id {s['id']!r} (first seen on line {seen[s['id']]})")
            seen[s["id"]] = lineno
            if not _num(s.get("query_time")) or s["query_time"] < 0:
                fail("query_time", f"expected a number >= 0, got {s.get('query_time', 'nothing')!r}")
            if "duration" in s and (not _num(s["duration"]) or s["duration"] <= 0):
                fail("duration", f"expected a number > 0, got {s['duration']!r}")
            if not isinstance(s.get("answers"), list):
                fail("answers", f"expected a list of answers, got {s.get('answers', 'nothing')!r}")
            for i, a in enumerate(s["answers"]):
                where = f"answers[{i}]"
                if not isinstance(a, dict):
                    fail(where, f"expected an object, got {a!r}")
                if not isinstance(a.get("text"), str):
                    fail(where + ".text", "missing, expected a string")
                if "time" in a:
                    if not _num(a["time"]) or a["time"] < 0:
                        fail(where + ".time", f"expected a number >= 0, got {a['time']!r}")
                elif "start" in a and "end" in a:
                    for k in ("start", "end"):
                        if not _num(a[k]) or a[k] < 0:
                            fail(f"{where}.{k}", f"expected a number >= 0, got {a[k]!r}")
                    if a["end"] < a["start"]:
                        fail(where + ".end", f"expected end >= start, got start={a['start']} end={a['end']}")
                else:
                    fail(where, "expected either 'time' or both 'start' and 'end'")
                if "slots" in a and not isinstance(a["slots"], dict):
                    fail(where + ".slots", f"expected an object, got {a['slots']!r}")
            s["video_path"] = s["video"] if os.path.isabs(s["video"]) else os.path.join(root, s["video"])
            s["where"] = f"{path}:{lineno}"  # for messages about this sample that come later (check_video_times)
            if check_videos:
                if not os.path.isfile(s["video_path"]):
                    fail("video", f"video file not found: {s['video_path']}")
                if "duration" not in s:
                    s["duration"] = video_duration(s["video_path"])
            if "duration" in s:
                last = max([answer_end(a) for a in s["answers"]] + [s["query_time"]])
                if last > s["duration"] + 1e-6:
                    fail("answers" if s["answers"] and last > s["query_time"] else "query_time",
                         f"time {last} is beyond the video's duration {s['duration']}")
            samples.append(s)
    if not samples:
        raise AnnotationError(f"{path}: no samples (the file is empty)")
    return samples


def check_video_times(s, seconds):
    """What is wrong with sample `s` against its video, `seconds` long (read from the file): answers or
    the question after its end, or an annotated duration longer than it. Annotations loaded without their
    videos (check_videos=False: baselines, scoring --preds) cannot be checked before a stream decodes
    them; each message names the file, the line and the sample."""
    out, eps = [], 1e-6
    if s.get("duration", 0) > seconds + 1:  # (a second of slack: containers round their durations)
        out.append(f"duration {s['duration']} is longer than the video ({seconds:.1f} s): the last frame repeats")
    late = [answer_end(a) for a in s["answers"] if answer_end(a) > max(seconds, s.get("duration", 0)) + eps]
    if late:
        out.append(f"answer time {late[0]:g} is beyond the end of the video ({seconds:.1f} s): it is due after the last turn")
    if s["query_time"] > max(seconds, s.get("duration", 0)) + eps:
        out.append(f"query_time {s['query_time']:g} is beyond the end of the video ({seconds:.1f} s)")
    return [f"{s.get('where', '?')}: sample {s['id']} ({s['video_path']}): {m}" for m in out]


def answer_end(a):
    """The time an answer is due: an instant's time, an interval's end (SPEC section 1)."""
    return a["time"] if "time" in a else a["end"]


def parse_filter(levels, tasks):
    """--levels "0,1" and --tasks "EU,OU" as (levels, tasks) sets; '' (or None) = no filter."""
    return ({int(x) for x in levels.split(",")} if levels else None), ({t.strip() for t in tasks.split(",")} if tasks else None)


def select(samples, levels=None, tasks=None):
    """The samples a stage trains on: level in `levels` and task in `tasks` (None = no filter on that
    field). A sample without a level (real data) passes the level filter. Synthetic levels 0 and 1 are
    OU samples, so the paper's SFT split is levels {0, 1, 2} x tasks {OU, EU, TP, TG}."""
    return [s for s in samples if (levels is None or s.get("level") is None or s["level"] in levels)
            and (tasks is None or s["task"] in tasks)]


# -----------------------------------------------------------------------------
# Video decoding (decord)


class VideoError(UserError, RuntimeError):  # (RuntimeError: what it was before UserError existed)
    pass


def _reader(path, **kw):
    import decord  # imported lazily: scoring code never needs it
    if not os.path.isfile(path):
        raise VideoError(f"{path}: video file not found")
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1, **kw)
    except Exception as e:  # decord raises DECORDError / RuntimeError on bad files
        raise VideoError(f"{path}: cannot read video ({str(e).splitlines()[0][:200]})") from None


def video_duration(path):
    vr = _reader(path)
    return len(vr) / vr.get_avg_fps()


def smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=100352):
    """Qwen2-VL's resizing rule: both sides multiples of `factor` (patch * merge: 28 for Qwen2.5-VL,
    32 for Qwen3-VL), area within [min_pixels, max_pixels], aspect ratio kept."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def load_video(path, fps=1.0, duration=None, factor=28, min_pixels=3136, max_pixels=100352, frames_per_turn=1):
    """Decode the frames of every turn: frame k is the frame shown at time k/fps, for every k/fps <
    duration (SPEC section 1). With frames_per_turn = 2 (ours, the tiny models) turn k also gets the
    frame half a turn earlier, k/fps - 0.5/fps (clamped at 0): the two form one temporal patch of the
    ViT, as Qwen's 2-fps video does, so a change shows inside the turn's own visual tokens. Frames are
    resized while decoding to the size the processor will use, so a 1080p video never exists in memory
    at full size. Returns (uint8 array (K, frames_per_turn, H, W, 3), decision-free times k/fps (K,))."""
    vr = _reader(path)
    n, vfps = len(vr), vr.get_avg_fps()
    if n == 0 or not vfps or vfps <= 0:
        raise VideoError(f"{path}: video has no frames")
    h, w = vr[0].shape[:2]
    th, tw = smart_resize(h, w, factor, min_pixels, max_pixels)
    if (th, tw) != (h, w):
        vr = _reader(path, width=tw, height=th)
    duration = n / vfps if duration is None else duration
    K = max(1, math.ceil(duration * fps - 1e-9))
    times = np.arange(K) / fps
    at = np.maximum(times[:, None] - np.arange(frames_per_turn - 1, -1, -1)[None] / (frames_per_turn * fps), 0)
    idx = np.minimum(np.floor(at * vfps + 1e-6).astype(int), n - 1)
    uniq, inv = np.unique(idx, return_inverse=True)
    try:
        frames = vr.get_batch(uniq.tolist()).asnumpy()
    except Exception as e:
        raise VideoError(f"{path}: decoding failed ({str(e).splitlines()[0][:200]})") from None
    return frames[inv.reshape(idx.shape)], times


# -----------------------------------------------------------------------------
# Turns and labels (SPEC section 1)


def time_marker(k, fps=1.0):
    t0, t1 = k / fps, (k + 1) / fps
    return f"<{int(t0)}s-{int(t1)}s>" if fps == 1 else f"<{t0:.1f}s-{t1:.1f}s>"


def num_turns(duration, fps=1.0):
    """Turn k covers [k/fps, (k+1)/fps); there is one per frame shown before `duration`."""
    return max(1, math.ceil(duration * fps - 1e-9))


def question_turn(query_time, fps=1.0):
    """The turn containing query_time: its user message carries the question."""
    return int(math.floor(query_time * fps + 1e-9))


def due_turn(t, fps=1.0):
    """The turn whose decision time (k+1)/fps is the first one >= t."""
    return max(0, math.ceil(t * fps - 1e-9) - 1)


def build_conversation(sample, n_turns, fps=1.0, states=2):
    """The target conversation of one annotation: one turn per frame, each turn's assistant output
    by SPEC section 1's label rules. Returns {"id", "system", "q_turn", "turns": [...]}, each turn
    {"k", "marker", "question", "decision", "target"} where `target` is the assistant text."""
    q = min(question_turn(sample["query_time"], fps), n_turns - 1)
    decision, texts = [SILENCE] * n_turns, [[] for _ in range(n_turns)]
    for a in sorted(sample["answers"], key=answer_end):
        # (ours) an answer due before the question is asked is given at the question turn: the model
        # cannot answer earlier, and answering at once is the best it can do. Clamped to the last turn.
        k = min(max(q, due_turn(answer_end(a), fps)), n_turns - 1)
        decision[k] = RESPONSE
        texts[k].append(a["text"].strip())  # (ours) two answers due in one turn are given together
    if states == 3:
        for a in sample["answers"]:
            if "start" in a:
                k_end = min(max(q, due_turn(a["end"], fps)), n_turns - 1)
                for k in range(max(q, question_turn(a["start"], fps)), k_end):
                    if decision[k] == SILENCE:
                        decision[k] = STANDBY
    turns = []
    for k in range(n_turns):
        target = decision[k] if decision[k] != RESPONSE else f"{RESPONSE} {' '.join(texts[k])}"
        turns.append({"k": k, "marker": time_marker(k, fps), "question": sample["question"] if k == q else None,
                      "decision": decision[k], "target": target})
    return {"id": sample["id"], "system": SYSTEM_PROMPT_3 if states == 3 else SYSTEM_PROMPT, "q_turn": q, "turns": turns}


def window_turns(n_turns, q_turn, W):
    """Indices of the turns a sliding window keeps: the question turn plus the last W turns
    (the system prompt is always kept). W <= 0 keeps everything; q_turn < 0: no question yet."""
    if W <= 0 or n_turns <= W:
        return list(range(n_turns))
    last = list(range(n_turns - W, n_turns))
    return last if q_turn < 0 or q_turn >= n_turns - W else [q_turn] + last


def window_start(k, W, chunk):
    """The first of the turns before turn k that a sliding window keeps besides the question turn: the
    schedule of both backends (infer.Streams rebuilds its cache when it changes; vllm_engine.Row prompts
    from it, so prefix caching holds between cuts). The kept turns grow from W to W + chunk, then the
    oldest chunk + 1 are dropped at once: W/(chunk + 1) turn-prefills per frame for chunk turns of extra
    memory. W <= 0 keeps everything."""
    if W <= 0 or k <= W + chunk:
        return 0
    return k - W - (k - W - chunk - 1) % (chunk + 1)


def split_decision(text):
    """Assistant output text -> (decision token or None, answer text)."""
    text = text.strip()
    for tok in DECISION_TOKENS:
        if text.startswith(tok):
            return tok, text[len(tok):].strip()
    return None, text


# -----------------------------------------------------------------------------
# Tokenisation through the model's chat template


class ChatFormat:
    """The token-level turn format for one processor. The chat template is rendered once with
    sentinel strings to learn the exact text around the system prompt, a user message, an image and
    an assistant message; every conversation is then tokenised message by message. Message
    boundaries are special tokens, so this equals tokenising the whole rendered conversation, and
    infer.py / grpo.py can append one turn at a time with the very same ids."""

    def __init__(self, processor, frames_per_turn=1):
        self.processor, self.tok, self.frames_per_turn = processor, processor.tokenizer, frames_per_turn
        S, A, B, C, D, E = (f"\x02{c}\x03" for c in "SABCDE")
        sys_msg = {"role": "system", "content": [{"type": "text", "text": S}]}

        def user(*parts):
            return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}

        def render(msgs, gen=False):
            return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        two = render([sys_msg, user(A, None, B), {"role": "assistant", "content": [{"type": "text", "text": C}]},
                      user(D), {"role": "assistant", "content": [{"type": "text", "text": E}]}])
        cut = lambda x, y: two[two.index(x) + len(x): two.index(y)]
        self.sys_open = two[: two.index(S)]
        self.image = cut(A, B)
        self.asst_close = two[two.index(E) + len(E):]
        user_open = cut(C, D)[len(self.asst_close):]
        self.sys_close = cut(S, A)[: -len(user_open)]
        self.asst_open = render([sys_msg, user(D)], gen=True)[len(render([sys_msg, user(D)])):]
        self.user_open, self.user_close = user_open, cut(B, C)[: -len(self.asst_open)]
        ok = (cut(C, D) == self.asst_close + user_open and cut(S, A) == self.sys_close + user_open
              and cut(B, C) == self.user_close + self.asst_open and cut(D, E) == self.user_close + self.asst_open)
        if not ok:
            raise ValueError("unsupported chat template: messages are not rendered as independent pieces")
        self.image_token_id = processor.image_token_id
        self.decision_ids = {t: self.tok.convert_tokens_to_ids(t) for t in DECISION_TOKENS}
        for t, i in self.decision_ids.items():
            if i is None or i == self.tok.unk_token_id or len(self.ids(t)) != 1:
                raise ValueError(f"decision token {t} is not a single token of this tokenizer (load it with model.load)")
        close = self.ids(self.asst_close)
        self.eos_id, self.asst_close_tail = close[0], close[1:]  # the end-of-turn token, then what follows it ("\n")
        self.merge, self.patch = processor.image_processor.merge_size, processor.image_processor.patch_size
        self.factor = self.patch * self.merge  # frame sides are multiples of this
        self._tables = {}  # frame size -> what the image processor makes of each byte (images)

    def video(self, path, fps=1.0, duration=None):
        """The frame chunks of every turn of a video, sized for this processor (load_video)."""
        return load_video(path, fps, duration, self.factor, frames_per_turn=self.frames_per_turn)

    def ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def system_ids(self, system):
        return self.ids(self.sys_open + system + self.sys_close)

    def user_ids(self, marker, n_image_tokens, question=None, gen_prompt=True):
        """One user message (time marker, frame(s), question) followed by the assistant prompt.
        n_image_tokens: visual tokens of the frame, or a list of them for several frames."""
        n_image_tokens = [n_image_tokens] if isinstance(n_image_tokens, int) else n_image_tokens
        text = self.user_open + marker + self.image * len(n_image_tokens) + (question or "") + self.user_close
        out, n = [], iter(n_image_tokens)
        for i in self.ids(text + (self.asst_open if gen_prompt else "")):  # expand each placeholder, as the processor does
            out += [i] * next(n) if i == self.image_token_id else [i]
        return out

    def assistant_ids(self, content):
        """Assistant content + end-of-turn token (supervised) and the tail after it (not supervised)."""
        return self.ids(content) + [self.eos_id], list(self.asst_close_tail)

    def images(self, chunks):
        """uint8 chunks (K, n, H, W, 3), n = 1 or 2 frames each (or single frames (K, H, W, 3)) ->
        pixel_values, image_grid_thw, tokens per chunk. Each chunk is one image placeholder: the
        processor repeats a still image over the ViT's temporal patch of 2; a 2-frame chunk puts its
        frames in the two temporal slots instead (what Qwen's video processor does with 2 frames, done
        here because that processor needs torchvision). The processor itself runs once per frame size:
        after that, a table gives the same values (_table)."""
        chunks = chunks[:, None] if chunks.ndim == 4 else chunks
        size = chunks.shape[2:4]
        if size not in self._tables:
            self._tables[size] = self._table(*size, chunks[:1])
        return self._processed(chunks) if self._tables[size] is None else self._looked_up(chunks, self._tables[size])

    def _processed(self, chunks):
        ip = self.processor.image_processor
        out = ip(images=list(chunks[:, -1]), return_tensors="pt")
        pv, grid = out["pixel_values"], out["image_grid_thw"]
        if chunks.shape[1] == 2:  # each patch row is laid out (channel, time, y, x)
            first = ip(images=list(chunks[:, 0]), return_tensors="pt")["pixel_values"]
            shape = (-1, 3, ip.temporal_patch_size, ip.patch_size, ip.patch_size)
            pv = pv.view(shape).clone()
            pv[:, :, 0] = first.view(shape)[:, :, 0]
            pv = pv.flatten(1)
        return pv, grid, (grid.prod(-1) // self.merge**2).tolist()

    def _table(self, H, W, sample):
        """The image processor spends about 0.5 ms on a 56-px frame (most of a streamed turn's host work). On a frame
        it does not resize, it maps each byte of a channel to one float (rescale, normalise): a table of
        3 x 256 floats, read off its output for an image that holds every byte value. Kept only if every
        pixel of that image agrees with it and `sample` comes out bit for bit as the processor makes it;
        else None (the processor, always)."""
        if H % self.factor or W % self.factor or H * W < 256:  # resized, or too small to hold every byte
            return None
        codes = np.arange(H * W).reshape(H, W) % 256
        pv = self.processor.image_processor(images=[np.repeat(codes[..., None], 3, -1).astype(np.uint8)], return_tensors="np")["pixel_values"]
        where = self._patchify(np.broadcast_to(codes[None, None, :, :, None] + 256 * np.arange(3), (1, 2, H, W, 3)))
        if pv.shape != where.shape:
            return None
        table = np.zeros(3 * 256, np.float32)
        table[where.ravel()] = pv.ravel()
        if not np.array_equal(table[where], pv):
            return None
        fast, slow = self._looked_up(sample, table), self._processed(sample)
        return table if torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]) else None

    def _looked_up(self, chunks, table):
        K, _, H, W, _ = chunks.shape
        grid = torch.tensor([[1, H // self.patch, W // self.patch]] * K)
        codes = self._patchify(chunks[:, [0, -1]])  # bytes laid out first: a row's 3 x 2 x p x p are (channel, ...)
        pv = torch.from_numpy(table[codes + 256 * (np.arange(codes.shape[1]) // (codes.shape[1] // 3))])
        return pv, grid, (grid.prod(-1) // self.merge**2).tolist()

    def _patchify(self, x):
        """(K, 2, H, W, 3) -> (K * patches, 3 * 2 * p * p): the ViT's rows as the processor lays them out
        (merge windows in raster order; channel, time, y, x within a row)."""
        K, t, H, W, C = x.shape
        p, m = self.patch, self.merge
        x = x.reshape(K, t, H // p // m, m, p, W // p // m, m, p, C).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return np.ascontiguousarray(x).reshape(-1, C * t * p * p)

    def encode_single(self, frames, prompt, answer, system="You are a helpful assistant."):
        """A single-turn example (the offline stage's perception pairs): 1 or 2 frames + prompt ->
        answer. The frames are separate images, or with 2-frame turns one chunk (a still frame twice)."""
        if self.frames_per_turn == 2:
            frames = frames[None, [0, -1]]
        pixel_values, grid, n_img = self.images(frames)
        ids = self.system_ids(system) + self.user_ids("", n_img, prompt)
        a, tail = self.assistant_ids(answer)
        labels = [-100] * len(ids) + a + [-100] * len(tail)
        ids = torch.tensor(ids + a + tail)
        return {"input_ids": ids, "labels": torch.tensor(labels), "classes": torch.tensor([IGNORE if l == -100 else C_TEXT for l in labels], dtype=torch.int8),
                "mm_token_type_ids": (ids == self.image_token_id).int(), "pixel_values": pixel_values, "image_grid_thw": grid}

    def classes_of(self, ids):
        cls = {i: CLASS_OF[t] for t, i in self.decision_ids.items()}
        return [cls.get(i, C_TEXT) for i in ids]

    def encode(self, conv, frames, window=0):
        """Tokenise a conversation (build_conversation) with its frames (one per turn). Returns the
        model's inputs plus `labels` (-100 outside assistant content and end-of-turn tokens),
        `classes` (IGNORE / C_SILENCE / C_STANDBY / C_RESPONSE / C_TEXT per position) and
        `turn_spans` (token start, decision position, end) per kept turn."""
        keep = window_turns(len(conv["turns"]), conv["q_turn"], window)
        pixel_values, grid, n_img = self.images(np.stack([frames[conv["turns"][k]["k"]] for k in keep]))
        ids = self.system_ids(conv["system"])
        labels, classes, spans = [-100] * len(ids), [IGNORE] * len(ids), []
        for j, k in enumerate(keep):
            turn = conv["turns"][k]
            start = len(ids)
            u = self.user_ids(turn["marker"], n_img[j], turn["question"])
            a, tail = self.assistant_ids(turn["target"])
            ids += u + a + tail
            labels += [-100] * len(u) + a + [-100] * len(tail)
            classes += [IGNORE] * len(u) + self.classes_of(a) + [IGNORE] * len(tail)
            spans.append((start, start + len(u), len(ids)))
        ids = torch.tensor(ids)
        return {"input_ids": ids, "labels": torch.tensor(labels), "classes": torch.tensor(classes, dtype=torch.int8),
                "mm_token_type_ids": (ids == self.image_token_id).int(), "pixel_values": pixel_values,
                "image_grid_thw": grid, "turn_spans": spans, "turns": [conv["turns"][k] for k in keep]}


def collate(items, pad_id):
    """Right-pad a list of encoded conversations into a batch. Images are concatenated in sample
    order, which is the order their placeholder tokens appear in the flattened batch."""
    L = max(len(x["input_ids"]) for x in items)

    def pad(key, value, dtype=None):
        out = torch.full((len(items), L), value, dtype=dtype or items[0][key].dtype)
        for i, x in enumerate(items):
            out[i, : len(x[key])] = x[key]
        return out

    mask = torch.zeros(len(items), L, dtype=torch.long)
    for i, x in enumerate(items):
        mask[i, : len(x["input_ids"])] = 1
    out = {"input_ids": pad("input_ids", pad_id), "attention_mask": mask, "labels": pad("labels", -100),
           "classes": pad("classes", IGNORE), "mm_token_type_ids": pad("mm_token_type_ids", 0),
           "pixel_values": torch.cat([x["pixel_values"] for x in items]),
           "image_grid_thw": torch.cat([x["image_grid_thw"] for x in items])}
    if all("position_ids" in x for x in items):  # mrope positions made on the host (sft.with_positions)
        out["position_ids"] = torch.zeros(3, len(items), L, dtype=torch.long)  # padding at 0, as the model sets it
        for i, x in enumerate(items):
            out["position_ids"][:, i, : x["position_ids"].shape[1]] = x["position_ids"]
    return out


def model_inputs(batch):
    """The keys of a collated batch that the model's forward takes."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


# -----------------------------------------------------------------------------
# Debug view: what the model sees and what it is trained on


def show(enc, tok, colour=None):
    """Print an encoded conversation one turn per line: images collapsed to [img x N], decision
    tokens highlighted, supervised tokens marked (colours on a terminal, brackets otherwise)."""
    colour = sys.stdout.isatty() if colour is None else colour
    ids, labels, classes = enc["input_ids"].tolist(), enc["labels"].tolist(), enc["classes"].tolist()
    paint = {C_SILENCE: "\033[90;1m", C_STANDBY: "\033[33;1m", C_RESPONSE: "\033[32;1m", C_TEXT: "\033[42;30m"}

    def render(a, b):
        out, i = [], a
        while i < b:
            if ids[i] == tok.convert_tokens_to_ids("<|image_pad|>"):
                j = i
                while j < b and ids[j] == ids[i]:
                    j += 1
                out.append(f"[img x{j - i}]")
                i = j
                continue
            t = tok.decode([ids[i]])
            if labels[i] != -100:
                c = classes[i]
                t = (paint[c] + t + "\033[0m") if colour else ("\u27e6" + t + "\u27e7")
            out.append(t)
            i += 1
        return "".join(out).replace("\n", "\u21b5")

    spans = enc["turn_spans"]
    print("system: " + render(0, spans[0][0]))
    for (a, d, b), turn in zip(spans, enc["turns"]):
        q = "  <- question" if turn["question"] else ""
        print(f"turn {turn['k']:>3} {render(a, b)}{q}")
    sup = [c for c in classes if c != IGNORE]
    names = {C_SILENCE: "silence", C_STANDBY: "standby", C_RESPONSE: "response", C_TEXT: "text"}
    print(f"{len(ids)} tokens, {len(sup)} supervised: " + ", ".join(f"{names[c]} {sup.count(c)}" for c in names if sup.count(c)))


def cli_args(argv=None):
    """Command-line words with every long flag in its documented spelling, underscores: --max_new, and
    also --max-new as an alias (one convention for every script; a flag copied from another script or
    an older README still works)."""
    argv = sys.argv[1:] if argv is None else argv
    fix = lambda w: "--" + w[2:].split("=", 1)[0].replace("-", "_") + ("=" + w.split("=", 1)[1] if "=" in w else "")
    return [fix(w) if w.startswith("--") and len(w) > 2 else w for w in argv]


def run_cli(main, *args):
    """A command line's entry point: main(*args), where bad input (UserError, an OSError such as a missing or
    unwritable file, an exit with a message) ends in one line on stderr, `error: ...`, and exit status 2, as
    argparse ends bad usage. Nothing else is caught: a bug keeps its traceback. Under torchrun each rank that
    stops says so and torchrun stops the others, so none waits at a barrier for it."""
    try:
        return main(*args)
    except (UserError, OSError) as e:
        msg = str(e)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        msg = str(e.code)
    print("error: " + "; ".join(line.strip() for line in msg.splitlines() if line.strip()), file=sys.stderr, flush=True)
    sys.exit(2)


def check_flags(args, positive=(), non_negative=(), fractions=()):
    """Numeric flags that cannot work, named before any work starts (`--batch 0: must be > 0`) rather than
    found steps later as an empty torch.cat or a modulo by zero. A flag left at None is not checked."""
    rules = [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (fractions, lambda v: 0 <= v <= 1, "within [0, 1]")]
    for names, ok, want in rules:
        for name in names:
            v = getattr(args, name)
            if v is not None and not ok(v):  # (NaN fails every rule)
                raise UserError(f"--{name} {v:g}: must be {want}")


def fill_defaults(args, words, values):
    """Set `values` (a preset's or a stage's defaults) on args, except the flags given on the command line
    (`words`, from cli_args), even at the global default: `--backend hf` under a vLLM preset stays hf."""
    given = {w[2:].split("=", 1)[0] for w in words if w.startswith("--")}
    for k, v in values.items():
        if k not in given:
            setattr(args, k, v)


def json_line(rec):
    """One log.jsonl line: NaN (an AUC with one class missing, a metric of no samples) is written as null,
    since NaN is not JSON."""
    return json.dumps({k: None if isinstance(v, float) and v != v else v for k, v in rec.items()}) + "\n"


DEFAULT_DATA = "data/synthetic"  # the synthetic benchmark (synthetic.ensure makes it on first use)
