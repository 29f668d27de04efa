"""
Model and processor loading shared by sft.py, grpo.py and infer.py, and the tiny offline models.

    python model.py --tiny qwen2_5_vl --out out/tiny-qwen2_5_vl     # random tiny Qwen2.5-VL + tokenizer
    python model.py --tiny qwen3_vl --out out/tiny-qwen3_vl

`load` takes a local directory or a hub id (Qwen2.5-VL-3B-Instruct, Qwen3-VL-4B-Instruct, a checkpoint
written by sft.py or grpo.py, or a tiny model made here) and returns (model, processor) with the
decision tokens in the vocabulary and the vision encoder frozen, as both papers train.
"""
import argparse
import contextlib
import json
import os
import shutil

import torch
from transformers import AutoModelForImageTextToText

from data import DECISION_TOKENS

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
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or os.path.isdir(os.path.dirname(path) or ".")):
        # a local path that is not there (a hub id would be "org/name"): say so now, not after hub retries
        raise FileNotFoundError(f"{path}: no such model directory")
    processor = Processor.from_pretrained(path, min_pixels, max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)
    add_decision_tokens(model, processor.tokenizer)
    if freeze_vision:  # the ViT stays frozen; the merger (projector) and the LLM are trained
        # (ours) except a tiny model's projector, which is random: Adam's steps on it (even at 1e-4)
        # scrambled the visual tokens faster than the LM learned to read them (README: tiny models)
        tiny = getattr(model.config, "streampro_tiny", False)
        for name, p in model.model.visual.named_parameters():
            p.requires_grad = "merger" in name and not tiny
    return model, processor


def add_decision_tokens(model, tok):
    """Add </Silence> </Standby> </Response> as single special tokens (all three, so one checkpoint
    serves both the 2- and 3-state formats) and give their embeddings the mean of the existing ones.
    Real Qwen checkpoints have spare embedding rows beyond len(tokenizer): new ids land there and the
    matrix keeps its size; a tiny model's matrix is grown to fit."""
    new = [t for t in DECISION_TOKENS if t not in tok.get_vocab()]
    if not new:
        return
    n_old = len(tok)
    tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    if model is None:  # a tokenizer alone (data.py --show)
        return
    emb = model.get_input_embeddings()
    if len(tok) > emb.weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        ids = tok.convert_tokens_to_ids(new)
        for e in {model.get_input_embeddings(), model.get_output_embeddings()}:
            e.weight[ids] = e.weight[:n_old].mean(0)


def frames_per_turn(model_or_path):
    """Frames in one turn's visual chunk, as the model was built and trained (data.load_video): 1 for
    the paper's models, 2 for the tiny ones (ours, see there)."""
    if isinstance(model_or_path, str):
        with open(os.path.join(model_or_path, "config.json")) as f:
            return json.load(f).get("streampro_frames_per_turn", 1)
    return getattr(unwrap(model_or_path).config, "streampro_frames_per_turn", 1)


def unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the model in .module; FSDP2 keeps it in place


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
    for d in (out, out + ".old"):
        if d and os.path.isfile(os.path.join(d, "config.json")):
            return d
    return None


def save_checkpoint(out, model, processor, optimizer=None, extra=None, rank=0):
    """Write a checkpoint atomically: model + processor in save_pretrained layout (what `load`,
    infer.py, grpo.py and vLLM read) plus trainer_state.pt (optimizer, step, RNG, config). It is
    written to out.tmp and swapped in, so a crash leaves either the old or the new checkpoint.
    Call it on every rank: under FSDP gathering the full state dict is a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    if rank != 0:
        return
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, state_dict=msd)
    processor.save_pretrained(tmp)
    torch.save({**(extra or {}), "optimizer": osd}, os.path.join(tmp, "trainer_state.pt"))
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
    its step-`step` checkpoint redoes those steps, so every step appears once (a fresh run, step 0,
    starts an empty log; a line cut off by a crash is dropped too)."""
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


def set_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def vocab_mask(model, tok):
    """True for the ids a policy must never emit: embedding rows beyond the tokenizer (padding) and
    special tokens (vision placeholders, <|im_start|>, ...), except the decision tokens and the end
    of turn. A sampled <|image_pad|> would even break the rope index of the turns after it."""
    V = model.get_output_embeddings().weight.shape[0]
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

    from synthetic import corpus
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    n_special = len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # like a released Instruct tokenizer, no decision tokens yet: `load` adds them
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]}, replace_extra_special_tokens=False)
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    return tok


def build_tiny(family="qwen2_5_vl", out="out/tiny-qwen2_5_vl", seed=0, hidden=128, layers=2, heads=4,
               vision_hidden=64, vision_depth=2):
    """A random tiny Qwen2.5-VL or Qwen3-VL saved in the layout `load` reads. Head dim 32 keeps it
    inside vLLM's CPU attention kernels (ENVIRONMENT.md)."""
    from transformers import Qwen2VLImageProcessorPil
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                                         ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=8192,
                rms_norm_eps=1e-6, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                bos_token_id=None, tie_word_embeddings=True)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  out_hidden_size=hidden, spatial_merge_size=2, temporal_patch_size=2)
    hd = hidden // heads
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as M
        processor_class = "Qwen2_5_VLProcessor"
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16]}
        vision.update(patch_size=14, window_size=112, fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        patch = 14
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration as M
        processor_class = "Qwen3VLProcessor"
        text.update(head_dim=hd, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6 * hd // 32, 5 * hd // 32, 5 * hd // 32], "mrope_interleaved": True})
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        patch = 16
    else:
        raise ValueError(f"unknown family {family!r}: qwen2_5_vl or qwen3_vl")
    config.streampro_tiny = True  # load() keeps a tiny model's random projector frozen (see there)
    # (ours) 2-frame turns: a one-frame turn left the tiny LM to find a change by comparing two turns'
    # visual tokens 30 tokens apart, which it did not learn within the CPU budget (README)
    config.streampro_frames_per_turn = 2
    model = M(config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    Processor(tok, image_processor, CHAT_TEMPLATE).save_pretrained(out)
    # Written by hand (no torchvision here to build the class): what AutoProcessor / vLLM read on a GPU
    # machine. Not exercised on CPU; the CPU path reads the parts above through Processor.
    with open(os.path.join(out, "video_preprocessor_config.json"), "w") as f:
        json.dump({"video_processor_type": "Qwen2VLVideoProcessor" if family == "qwen2_5_vl" else "Qwen3VLVideoProcessor",
                   "processor_class": processor_class, "patch_size": patch, "merge_size": 2, "temporal_patch_size": 2,
                   "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}}, f, indent=1)
    return out


def ensure_tiny(family="qwen2_5_vl", root="out"):
    """The default tiny model directory, built on first use (a few seconds)."""
    out = os.path.join(root, f"tiny-{family}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        build_tiny(family, out)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", choices=["qwen2_5_vl", "qwen3_vl"], required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = build_tiny(a.tiny, a.out or f"out/tiny-{a.tiny}", a.seed)
    model, processor = load(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n / 1e6:.2f} M parameters, vocabulary {len(processor.tokenizer)}")
