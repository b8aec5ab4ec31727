"""This harness's checkpoints as an lm-evaluation-harness model, registered as `dba`.

Importing this module registers the model (lm-eval has no discovery of external models); the command
`python -m production.eval.harness` does that and then runs lm-eval's own CLI. Model arguments:

    ckpt=RUN/best.pt          a checkpoint, run directory or export directory (required)
    kv_policy=none            none: log-likelihoods from batched full forward passes and generation by
                              recomputation (the reference); fp16 | bf16 | paper | auto | a policy string with
                              `;` between items (lm-eval splits its arguments on commas): everything goes
                              through the KV cache in that policy
    chunk=1                   through a cache: continuation tokens fed per step (1: exactly decoding; more: faster)
    dtype=auto max_length=<block size> max_gen_toks=min(256, max_length/2) seed=1337 (generation: request i
    samples with seed + i); a longer max_length scores past the trained length with plain RoPE
and lm-eval's own --device and --batch_size (default 1 on its CLI; e.g. --batch_size 16; `auto` means 16).

Through a cache, a request's context is prefilled (exact attention over its own K/V, as when generation starts)
and its continuation is decoded `chunk` tokens at a time over the stored cache, so a one-token continuation scores
the same under every policy, exactly as a first generated token would.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from production.cache.policy import PAPER_POLICY, KVPolicy, parse_policy
from production.config.fields import with_defaults
from production.config.sampling import SamplingConfig
from production.core.errors import UserError
from production.core.layout import checkpoint_file
from production.core.runtime import resolve_runtime
from production.data.tokenizer import get_tokenizer
from production.eval.scoring import forward_logprobs, score_tokens
from production.model.attention import cache_widths
from production.sample.generate import generate
from production.train.checkpoint import load_model
from production.tune.auto import AutoRequest, auto_policy
from production.tune.store import DecisionStore

DEFAULT_BATCH = 16
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # what lm-eval's CLI passes when --device is not given


def stop_check(decode, until: list[str]):
    """generate()'s stop test: has the text generated so far (B = 1) reached any stop sequence?"""
    return lambda new: any(s in decode(new[0].tolist()) for s in until)


@register_model("dba")
class DBALM(TemplateLM):
    def __init__(
        self,
        ckpt: str | None = None,
        kv_policy: str = "none",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = DEFAULT_BATCH,
        max_length: int | None = None,
        max_gen_toks: int | None = None,
        seed: int = 1337,
        chunk: int = 1,
        max_batch_size: int | None = None,  # passed by lm-eval for --batch_size auto; batches here are fixed
        **unknown,
    ):
        super().__init__()
        if unknown:
            known = "ckpt, kv_policy, device, dtype, batch_size, max_length, max_gen_toks, seed, chunk"
            raise UserError(f"unknown dba model argument(s) {', '.join(sorted(unknown))}; the arguments are {known}")
        if ckpt is None:
            raise UserError("the dba model needs --model_args ckpt=RUN/best.pt (a checkpoint or run directory)")
        device = str(device or "auto")
        if device == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available():
            print(f"dba: no CUDA here, so lm-eval's default --device {device} becomes auto", file=sys.stderr)
            device = "auto"
        self.runtime = resolve_runtime(device, str(dtype), compile=False)
        self.autocast = self.runtime.autocast
        self.ckpt_path = checkpoint_file(str(ckpt))
        self.model, self.ckpt = load_model(self.ckpt_path, self.runtime.device)
        self.model.eval()
        self.tok = get_tokenizer()
        if self.model.cfg.vocab_size < self.tok.vocab_size:
            raise UserError(f"{ckpt}: vocabulary {self.model.cfg.vocab_size} is smaller than GPT-2's")
        self.batch_size = DEFAULT_BATCH if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length or self.model.cfg.block_size)
        self.max_gen_toks = int(max_gen_toks or min(256, self._max_length // 2))
        self.seed = int(seed)
        if not 0 < self.max_gen_toks < self._max_length:
            raise UserError(f"max_gen_toks must be in [1, {self._max_length}), got {max_gen_toks}")
        self.chunk = int(chunk)
        if self.chunk < 1:
            raise UserError(f"chunk must be a positive number of tokens, got {chunk}")
        self.policy = self._resolve_policy("none" if kv_policy is None else str(kv_policy))  # lm-eval: none -> None
        self.requests_done = 0  # generation seeds: seed + request number, so repeats of a request differ

    def _resolve_policy(self, text: str) -> KVPolicy | None:
        """none -> None; paper / auto / fp16 / 'k=q8_0@32;v=q4_0@32' -> a checked policy for this model."""
        text = PAPER_POLICY if text == "paper" else text.replace(";", ",")
        if text == "none":
            return None
        if text == "auto":
            v = with_defaults({})
            store = DecisionStore(v["tuner_store"])
            # no prompt: calibration on the run's validation split, else the embedded corpus
            request = AutoRequest.from_options(v, self._max_length)
            text, _ = auto_policy(self.model, self.ckpt_path, self.ckpt, [], request, self.runtime, store)
        return parse_policy(text, list(cache_widths(self.model.cfg)), self.model.cfg.n_layer)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.runtime.device

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (sum of log-probabilities, greedy) each, the
        context cut from the left to fit max_length."""
        rows = []
        for _, context, continuation in requests:
            seq = (context + continuation)[-(self._max_length + 1) :]
            rows.append((seq, min(len(continuation), len(seq) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        step = self.batch_size if self.policy is None else 1
        for start in tqdm(range(0, len(order), step), desc="dba loglikelihood", disable=disable_tqdm):
            batch = order[start : start + step]
            if self.policy is None:
                seqs, n_scored = [rows[i][0] for i in batch], [rows[i][1] for i in batch]
                scored = forward_logprobs(self.model, seqs, n_scored, self.autocast)
            else:
                seq, n = rows[batch[0]]  # the context prefilled, the continuation decoded token by token
                ids = torch.tensor([seq])
                logp, hit = score_tokens(
                    self.model, ids, self.policy, len(seq) - n, self.chunk, len(seq) - 1 - n, self.autocast
                )
                scored = [(logp[0], hit[0])]
            for i, (logp, hit) in zip(batch, scored, strict=True):
                results[i] = (float(logp.sum()), bool(hit.all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood, in windows of max_length that predict each token once."""
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="dba rolling", disable=disable_tqdm):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self._max_length, 1)
            ]
            scored = self._loglikelihood_tokens([(None, c, p) for c, p in windows], disable_tqdm=True)
            out.append(sum(logp for logp, _ in scored))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation through this project's sampler and KV cache (one request at a time), cut at the first stop
        sequence."""
        eot_text = self.tok.decode([self.eot_token_id])
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="dba generate", disable=disable_tqdm):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.get("until"), eos=eot_text)
            n_new = min(int(kwargs["max_gen_toks"]), self._max_length - 1)
            ids = self.tok_encode(context)[-(self._max_length - n_new) :] or [self.eot_token_id]
            greedy = not kwargs.get("do_sample") or not kwargs.get("temperature")
            seed = self.seed + self.requests_done
            self.requests_done += 1
            cfg = SamplingConfig(n_new, float(kwargs.get("temperature") or 1.0), None, greedy, seed)
            stop = stop_check(self.tok.decode, until)
            result = generate(
                self.model, torch.tensor([ids]), cfg, self.policy, len(ids) + n_new, self.autocast, stop=stop
            )
            text = self.tok.decode(result["ids"][0].tolist())
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out
