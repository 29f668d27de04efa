"""
StreamBridge's activation model (SPEC section 6): a compact model, decoupled from the main one, whose LM head
is replaced by a score head read at a learnable <ACT> token after each frame; where it fires, the main model
answers, its own decision tokens unused.

    python sft.py --activation --model out/sft-cb --out out/act --max_steps 200      # train it (any checkpoint)
    python infer.py --model out/sft-cb --activation out/act --ann data/synthetic/test.jsonl
    python infer.py --model out/sft-cb --activation out/act --act_threshold 0.3 --video clip.mp4 --question "..."

Its turn is the format's user turn (time marker, frame, the question once) followed by the assistant prompt
and <ACT> (ActFormat): no answers in its context, so what it reads streaming is what it was trained on, and
a teacher-forced forward is its deployment (sft.eval_activation). The score head, a Linear(hidden, 1) on the
hidden state at <ACT>, is saved with the checkpoint (model.safetensors: act_head.*; config streampro_act).
"""
import contextlib
import functools
import json
import math
import os

import torch
import transformers

import data
import model as M

ACT = "<ACT>"
CLASSES = [0, 1]  # the labels' values, in the place of decision ids (sft.global_totals counts them: negative, positive)

# from_pretrained builds the VLM and leaves the head's keys to attach(), without a load report that calls them unexpected
for _cls in (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen3VLForConditionalGeneration):
    _cls._keys_to_ignore_on_load_unexpected = [r"^act_head\."]


def act_labels(conv, last):
    """Per turn of a conversation (data.build_conversation): 1, 0, or None before the question (no question is
    pending: not trained, and infer.py keeps the main model silent there). (ours) The segment of an answer is the
    turns after the previous answer's turn (for the first answer, from the question turn) up to its own turn;
    StreamBridge's rule: its last P = `last` of them are positive, ceil(P x length), so at least its own turn;
    the rest are negative, as are the turns after the last answer."""
    q, out = conv["q_turn"], [None] * len(conv["turns"])
    start = q
    for k in range(q, len(out)):
        out[k] = 0
        if conv["turns"][k]["decision"] == data.RESPONSE:
            for j in range(k + 1 - math.ceil(last * (k - start + 1)), k + 1):
                out[j] = 1
            start = k + 1
    return out


class ActFormat(data.ChatFormat):
    """The activation model's turn format: every user turn ends with the assistant prompt and <ACT>, where the
    score is read; its assistant turn is the end of turn alone. `last`: P of act_labels."""

    def __init__(self, processor, frames_per_turn=1, last=0.1):
        super().__init__(processor, frames_per_turn)
        self.act, self.last = self.tok.convert_tokens_to_ids(ACT), last

    def user_ids(self, marker, n_image_tokens, question=None, gen_prompt=True):
        return super().user_ids(marker, n_image_tokens, question, gen_prompt) + ([self.act] if gen_prompt else [])

    def encode(self, conv, frames, window=0):
        """ChatFormat.encode of the conversation with <ACT> turns; `labels` hold each turn's act_labels value at the
        position after its <ACT> (so sft.supervised_logits reads the head at <ACT>), -100 elsewhere."""
        y = act_labels(conv, self.last)
        enc = super().encode(dict(conv, turns=[dict(t, target="") for t in conv["turns"]]), frames, window)
        labels = torch.full_like(enc["labels"], -100)
        for (_, d, _), t in zip(enc["turn_spans"], enc["turns"]):
            if y[t["k"]] is not None:
                labels[d] = y[t["k"]]
        enc["labels"], enc["classes"] = labels, torch.full_like(enc["classes"], data.IGNORE)
        return enc


def attach(model, processor, path=None, last=0.1):
    """Make `model` an activation model: <ACT> in the vocabulary (as the decision tokens are added), and the score
    head `model.act_head`, with its weights where the checkpoint at `path` has them. An untied LM head is frozen: no
    loss reaches it (a tied one is the input embedding, <ACT>'s row included, and trains). Returns the ActFormat."""
    M.add_special_tokens(model, processor.tokenizer, [ACT])
    hidden = model.config.get_text_config().hidden_size
    model.act_head = torch.nn.Linear(hidden, 1).to(model.device, model.dtype)
    saved = saved_head(path) if path else {}
    if saved:
        model.act_head.load_state_dict(saved)
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        model.lm_head.weight.requires_grad_(False)
    model.config.streampro_act = True  # what the checkpoint is (config.json)
    return ActFormat(processor, M.frames_per_turn(model), last)


def saved_head(path):
    """act_head.* of a checkpoint's safetensors ({} for one without them, or a hub id)."""
    from safetensors import safe_open
    path = M.latest(path) or path
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    out = {}
    for f in (os.path.join(path, f) for f in files):
        if os.path.isfile(f):
            with safe_open(f, "pt") as s:
                out.update({k[len("act_head."):]: s.get_tensor(k) for k in s.keys() if k.startswith("act_head.")})
    return out


@contextlib.contextmanager
def scoring(model):
    """Within the block the model's LM head is its score head: its forward returns (..., 1) scores, so sft.py's
    training and evaluation run unchanged (M.logits_at selects the <ACT> rows)."""
    m = M.unwrap(model)
    lm, m.lm_head = m.lm_head, m.act_head
    try:
        yield
    finally:
        m.lm_head = lm


def check(path):
    """--activation names an activation checkpoint (its config says so), before anything loads."""
    path = M.check_model(path, "--activation")
    config = os.path.join(path, "config.json")
    if os.path.isfile(config) and not json.load(open(config)).get("streampro_act"):
        raise data.UserError(f"--activation {path}: not an activation model (train one with sft.py --activation)")
    return path


@functools.lru_cache(maxsize=2)
def load(path, device="cpu", dtype="float32"):
    """(model, ActFormat, threshold) of an activation checkpoint for inference: its LM head replaced by the score
    head for good (never saved so). The threshold is the checkpoint's (sft.eval_activation; 0.5 without one).
    Kept for the run: infer.py streams its batches with one."""
    path = check(path)
    model, processor = M.load(path, dtype=getattr(torch, dtype), device=device)
    fmt = attach(model, processor, path)
    model.lm_head = model.act_head
    model.eval()
    return model, fmt, getattr(model.config, "streampro_act_threshold", 0.5)


class Gate:
    """The activation model beside the main one (StreamBridge's ACT(Q, F_tQ..t)): its own streams (infer.Streams
    over its ActFormat, the same frames, question and kind of memory), whose every turn ends at <ACT>; the sigmoid
    of the score there is its probability that the main model should respond now, and it fires at `threshold`.

    Cost: the activation model's turn per frame (its own ViT pass and one forward of the turn, no decoding)
    beside the main model's, which decodes an answer only where the gate fires."""

    def __init__(self, streams, threshold):
        self.S, self.threshold = streams, threshold

    def observe(self, inputs):
        """inputs as Streams.observe takes them -> the probability per row (0 for a row with no turn)."""
        p = torch.sigmoid(self.S.observe(inputs)[:, 0].float()).tolist()
        for b, x in enumerate(inputs):
            if x is not None:
                self.S.end_turn(b, [self.S.fmt.eos_id], 0)
        return [pb if x is not None else 0.0 for pb, x in zip(p, inputs)]
