"""`dualblade.Llama`: llama_cpp.Llama with the KV cache under dualblade's residency module."""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Callable, Optional, Sequence

import llama_cpp
import numpy as np

from . import _native, llama_log, placement, sessions, vram
from .config import KVConfig, check_cache_type_args, check_context_args, check_model_file, size_arg
from .errors import KVIOError  # noqa: F401 (re-exported)
from .errors import (BudgetError, ConfigError, EvalAborted, FlashAttentionWarning, ModelError, PinnedMemoryWarning,
                     StoreError)
from .gguf_header import GGML_TYPE_NAMES, RECURRENT_ARCHS, model_info
from .sizes import format_size
from .speculative import Speculation

log = logging.getLogger("dualblade")


def _vram_budget_arg(vram_budget, kwargs: dict) -> int | str | None:
    """vram_budget in bytes, or vram.AUTO (None: stock placement); ConfigError where it cannot apply."""
    if vram_budget is None:
        return None
    auto = isinstance(vram_budget, str) and vram_budget.strip().lower() == vram.AUTO
    size = vram.AUTO if auto else size_arg(vram_budget, "vram_budget")
    if not llama_cpp.llama_supports_gpu_offload():
        raise ConfigError("vram_budget needs a GPU build of dualblade and a GPU (this build or machine has none); "
                          "reinstall with CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install ., or leave vram_budget out")
    if not kwargs.get("n_gpu_layers"):
        raise ConfigError("vram_budget applies to the layers on the GPU, and n_gpu_layers is 0; pass "
                          "n_gpu_layers=-1 (all layers), or leave vram_budget out")
    if kwargs.get("offload_kqv") is False:
        raise ConfigError("vram_budget places KV in VRAM, and offload_kqv=False keeps it all in host memory; "
                          "drop one of them")
    return size


def default_kv_dir() -> str:
    from .models import cache_dir

    d = cache_dir() / "kv"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(d)


class Llama(llama_cpp.Llama):
    """A drop-in for ``llama_cpp.Llama``: same arguments and methods, plus

    mem_budget: bytes (int) or a size string ("2G", "1.5GiB", "512M", "64MiB") that pinned KV and
        staging memory may use; None for no budget (every layer pinned).
    kv_policy: "auto" | "ram" | "mmap" | "direct": where KV layers that do not fit the budget go.
        "auto" puts them on the page-cache path while the memory actually available (cgroup limit,
        MemAvailable, memory pressure) holds them next to the model's weights, and moves them to the
        direct path (O_DIRECT) when it does not, and back when memory recovers; kv_stats() shows
        each layer's path and the switches with their reasons.
    kv_dir: directory for the (unnamed, preallocated) KV file; default ~/.cache/dualblade/kv. Several
        (a list, or one string of paths separated by commas): the KV is striped over a file in each, each
        directory's share following its probed read bandwidth (kv_stats()["store_members"]); at most 8.
    kv_device: a raw block device or partition instead of a file, or several (as kv_dir); kv_force: take
        over a device that holds something else (destroys it).
    kv_verify: check a CRC-32C of every block the direct path reads back (default on).
    kv_wipe: at close, overwrite what the KV store held with zeros (a device's written range is
        discarded either way; a KV file is unnamed and freed).
    vram_budget: GPU builds, with n_gpu_layers: bytes or a size string that the KV of the GPU's layers
        may take in VRAM. The largest layers that fit stay in VRAM as stock; the others keep their KV
        in the host tiers above (pinned RAM within mem_budget, page cache, direct) and are copied into
        a VRAM slot before they compute, their new rows going back after. "auto": the VRAM the GPUs
        have free at load, less the weights that go there and an estimate of llama.cpp's compute
        buffers. A budget that cannot fit next to the weights is refused. None: stock placement.
    """

    def __init__(self, model_path: str, *args, mem_budget: int | str | None = None, kv_policy: str = "auto",
                 kv_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 kv_device: str | os.PathLike | Sequence[str | os.PathLike] | None = None, kv_force: bool = False,
                 kv_verify: bool = True, kv_wipe: bool = False, vram_budget: int | str | None = None, **kwargs):
        # what the caller asked for, as given: pickling restores exactly this (defaults resolved again)
        self._kv_args = dict(mem_budget=mem_budget, kv_policy=kv_policy, kv_dir=kv_dir, kv_device=kv_device,
                             kv_force=kv_force, kv_verify=kv_verify, kv_wipe=kv_wipe, vram_budget=vram_budget)
        self._flash_attn_arg = kwargs.get("flash_attn")
        # everything is validated, and the KV store opened, before any weight is loaded
        cfg = KVConfig.from_args(mem_budget, kv_policy, kv_dir, kv_device, kv_force)
        vram_bytes = _vram_budget_arg(vram_budget, kwargs)
        if cfg.policy == "ram" and cfg.budget_bytes is not None:
            warnings.warn("kv_policy='ram' pins every layer: the memory budget is not enforced", stacklevel=2)
        meta = check_model_file(model_path)  # missing, a directory, not GGUF, truncated: ModelError
        vocab_only = bool(kwargs.get("vocab_only"))
        if not vocab_only:  # a tokenizer alone has no context and no KV cache to place
            check_context_args(meta, kwargs)
            check_cache_type_args(kwargs)
        info = None if vocab_only else self._model_info(model_path, cfg, meta, vram_bytes is not None)
        if info is not None and vram_bytes is not None:
            vram_bytes = self._vram_budget_now(vram_bytes, info, kwargs)
        layout = self._plan_layout(model_path, cfg, kwargs, info, vram_bytes) if info is not None else []
        # layers the module places away from the stock placement: on the host's offloaded paths, or streamed
        offloaded = any(e[1] in ("mmap", "direct") or e[4] for e in layout)
        n_ctx = (kwargs.get("n_ctx", 512) or info.n_ctx_train) if offloaded else None
        # their rows are read once per graph that computes them: the prompt goes in large ubatches (unless the
        # caller chose one), with llama.cpp's compute buffers reserved for the outputs a ubatch asks for, several
        # ubatches a batch, which llama.cpp computes layer by layer (patch 0006)
        self._prefill_ubatch = None
        if offloaded and "n_ubatch" not in kwargs and "n_batch" not in kwargs:
            streamed = any(e[4] for e in layout)
            self._prefill_ubatch = placement.prefill_ubatch(info, n_ctx, streamed)
            kwargs["n_ubatch"] = self._prefill_ubatch
            kwargs["n_batch"] = placement.prefill_batch(info, n_ctx, self._prefill_ubatch, streamed)
            layout = self._plan_layout(model_path, cfg, kwargs, info, vram_bytes)  # an iSWA cache may grow
        self._flash_attn_forced = offloaded and self._flash_attn_arg is not True
        if self._flash_attn_forced:
            # llama_cpp's default is off; offloaded layers need V untransposed, which only flash attention
            # keeps. Outputs may then differ from a stock run without it (not from one with it).
            asked = "flash_attn=False was given" if self._flash_attn_arg is False else "llama_cpp's default is off"
            warnings.warn(f"flash attention switched on: offloaded KV layers need it ({asked}); pass "
                          "flash_attn=True to say so and silence this", FlashAttentionWarning, stacklevel=2)
        if offloaded:
            kwargs["flash_attn"] = True
            if cfg.kv_dir is None and cfg.kv_device is None:
                cfg = KVConfig(cfg.policy, cfg.budget_bytes, (default_kv_dir(),), None)
        self._kv_config = cfg
        self._kv_layout = layout
        self._kv_wipe = bool(kv_wipe)
        self.eval_progress: Optional[Callable[[int, int], None]] = None
        # prompt_tokens: evaluated other than as a step of generation (a sampled token and its drafts)
        # generation steps (an evaluation after a sample): the storage bytes they read, and the tokens sampled after
        # them (generated: their bytes per token is what speculation divides)
        self._counters = {"eval_tokens": 0, "eval_s": 0.0, "sampled": 0, "prompt_tokens": 0,
                          "step_bytes_read": 0, "step_sampled": 0}
        self._just_sampled = self._after_step = False
        # the weights are mmap'ed (unless use_mmap=False): auto leaves their working set its page cache; with
        # every layer on a GPU they live in VRAM, and their file pages are read once, at load
        all_on_gpu = info is not None and placement.all_weights_on_gpu(
            len(info.layers), kwargs.get("n_gpu_layers", 0), bool(llama_cpp.llama_supports_gpu_offload()))
        mapped = offloaded and kwargs.get("use_mmap", True) and not all_on_gpu
        # auto's first room must leave out what llama.cpp allocates after the KV opens and a prompt fills: the
        # host compute buffers of a full ubatch (the attention masks; on the CPU the activations too). Left in
        # until prompts have touched them (_reserve_touched), when the monitor counts them itself.
        self._reserve = None
        if offloaded and cfg.policy == "auto":
            streamed = any(e[4] for e in layout)
            ub = min(kwargs.get("n_ubatch", 512), kwargs.get("n_batch", 2048))
            stash = placement.prefill_stash_bytes(info, kwargs.get("n_batch", 2048), ub, streamed)
            self._reserve = {"weights": info.weights_working_set() if mapped else 0, "info": info, "ubatch": ub,
                             "gpu": streamed, "buffers": placement.prefill_host_bytes(info, n_ctx, ub, streamed),
                             "touched": 0,  # of the buffers, what prompts have filled (the most of any ubatch)
                             "stash": stash, "hold": 0}
        if offloaded and len(cfg.members) > 1:
            # every member checked first, writing nothing: the module opens them in turn, and a device opened
            # before one that is refused would keep the header it got
            why = _native.store_check(cfg.policy, cfg.kv_dir, cfg.kv_device, kv_force, layout)
            if why:
                raise StoreError(why)
        try:
            self._kv = _native.KV(cfg.policy, cfg.budget_bytes, cfg.kv_dir, cfg.kv_device,
                                       layout if offloaded else None, force=kv_force,
                                       reserve_bytes=self._reserve_bytes() if self._reserve else 0,
                                       verify=kv_verify)
        except _native.KVError as e:
            raise StoreError(str(e)) from None
        if not kwargs.get("logits_all") and not kwargs.get("embedding"):
            # a ubatch asks for the logits of its last token (or of a verification batch's drafts): llama.cpp's
            # compute buffers need not hold them for every token of the largest ubatch
            self._kv.set_outputs_max(placement.OUTPUTS_MAX)
        with self._kv.bound(), llama_log.errors() as load_log:
            try:
                super().__init__(model_path, *args, **kwargs)
            except ValueError as e:  # llama_cpp says only "Failed to load model"; llama.cpp's log says why
                raise llama_log.load_error(e, model_path, load_log) from None
        self._kv.install_abort(self._ctx.ctx)  # abort_eval()
        why = self._kv.stats()["vram"].get("pin_failed") if any(e[4] for e in layout or ()) else None
        if why and why != "DUALBLADE_PIN=0":
            warnings.warn(f"the VRAM tier's host memory could not be page-locked ({why}): its copies to the GPU run "
                          "from pageable memory, slower; raise the locked-memory limit (ulimit -l, a container's "
                          "memlock) to lock it", PinnedMemoryWarning, stacklevel=2)
        # speculative decoding (draft_model=): drafts adapt to what is accepted; a verification batch asks
        # llama.cpp for its positions' logits only (llama_cpp 0.3.36 copies every row into a scores matrix sized
        # for one batch, and fails)
        self._speculation = None
        self._step = None
        # llama_cpp turns logits_all on for any draft_model; a session keeps every position's logits only when the
        # user asked for them (a verification batch's logits are used once, and the last token is evaluated again)
        self._user_logits_all = bool(kwargs.get("logits_all"))
        if self.draft_model is not None and not kwargs.get("logits_all"):
            k_max = min(getattr(self.draft_model, "num_pred_tokens", 10), placement.OUTPUTS_MAX - 1, self.n_batch - 1)
            self._speculation = Speculation(self.draft_model, k_max)
            self.draft_model = self._speculation
        if self._reserve:
            # weights llama.cpp repacked at load live in anonymous memory (the monitor counts that); their
            # file pages are never read again
            if mapped:
                self._reserve["weights"] = info.weights_working_set(load_log.buffers.get("CPU_REPACK", 0))
            self._reserve["ubatch"] = self.context_params.n_ubatch
            # compute buffers in page-locked host memory (a GPU build's masks) are resident from their allocation,
            # and the monitor counts them already: reserved on top, they were counted twice (run 14: room 0)
            self._reserve["touched"] = max(self._reserve["touched"],
                                           min(self._reserve["buffers"], load_log.pinned_compute_bytes()))
            # Under a memory limit a GPU build's first prompt takes memory that no estimate here names (GPU runs 15
            # and 16: a kv-heavy 30K prompt added about 120 MiB of anonymous memory, 85 of it in a stock run: the
            # driver's kernels, host buffers touched first): page-cache layers placed from the room at load were
            # taken back mid-prompt, at the prompt's cost. There the offloaded layers wait on the direct path until
            # the first prompt has run (a prompt's rows go around the page cache under a limit anyway), and auto
            # places them from the memory that prompt left.
            limit = self._kv.stats()["memory"]["limit_bytes"]
            if self._reserve["gpu"] and limit:
                self._reserve["hold"] = limit
            self._kv.set_reserve(self._reserve_bytes())

    def _buffers_left(self) -> int:
        """Of auto's reserve for the compute buffers, what no prompt has touched yet."""
        r = self._reserve
        return max(r["buffers"] - r["touched"], 0)

    def _reserve_bytes(self) -> int:
        r = self._reserve
        return r["weights"] + self._buffers_left() + r["stash"] + r["hold"]

    def _reserve_touched(self, n_tokens: int, n_end: int) -> None:
        """A batch of n_tokens ending at position n_end was evaluated: its ubatches' masks (and activations) are
        resident now, counted by the monitor as the process's own memory; auto's reserve keeps the rest."""
        r = self._reserve
        touched = placement.prefill_host_bytes(r["info"], n_end, min(n_tokens, r["ubatch"]), r["gpu"])
        if touched > r["touched"]:
            r["touched"] = touched
            self._kv.set_reserve(self._reserve_bytes())

    def __getstate__(self):
        state = super().__getstate__()
        state.update(self._kv_args)
        if self._prefill_ubatch:
            state.pop("n_batch", None)  # chosen here, as the caller left them: chosen again
            state.pop("n_ubatch", None)
        if getattr(self, "_speculation", None) is not None:
            state["draft_model"] = self._speculation.draft
        if self._flash_attn_arg is None:
            state.pop("flash_attn", None)  # as the caller left it: switched on again, and said so
        else:
            state["flash_attn"] = self._flash_attn_arg
        return state

    @staticmethod
    def _model_info(model_path, cfg: KVConfig, meta: dict, vram: bool = False):
        """The model's KV geometry when the policy may place layers (None: every layer stays in RAM)."""
        if not vram and (cfg.policy == "ram" or cfg.budget_bytes is None):
            return None
        info = model_info(model_path, meta)
        if info.arch in RECURRENT_ARCHS:
            if cfg.policy != "auto":
                raise ConfigError(f"{info.arch} keeps recurrent state, not a per-layer KV cache: dualblade cannot "
                                  f"offload it, so kv_policy='{cfg.policy}' cannot hold it to mem_budget; use "
                                  "kv_policy='ram' (or 'auto', which runs it in RAM with a warning)")
            warnings.warn(f"{info.arch} keeps recurrent state, not a per-layer KV cache: it runs in RAM",
                          stacklevel=3)
            return None
        return info

    @staticmethod
    def _vram_budget_now(vram_budget: int | str, info, kwargs: dict) -> int:
        """vram_budget ("auto" or bytes) against the VRAM the GPUs have free now, with the weights they get."""
        found = vram.gpus(kwargs.get("main_gpu", 0), kwargs.get("split_mode", llama_cpp.LLAMA_SPLIT_MODE_LAYER))
        try:
            budget, warning = vram.budget_from_free(vram_budget, info, kwargs.get("n_gpu_layers", 0),
                                                    kwargs.get("n_ubatch", 512), found)
        except vram.VramExceedsFree as e:
            raise BudgetError(str(e)) from None
        if warning:
            warnings.warn(warning, stacklevel=3)
        partial = placement.cpu_layers_warning(info.n_layer, kwargs.get("n_gpu_layers", 0))
        if partial:
            warnings.warn(partial, stacklevel=3)
        if vram_budget == vram.AUTO:
            log.info("vram_budget='auto': %s for the KV (%s)", format_size(budget),
                     ", ".join(f"{g.name} {format_size(g.free)} free" for g in found))
        return budget

    @staticmethod
    def _plan_layout(model_path, cfg: KVConfig, kwargs: dict, info,
                     vram_bytes: int | None = None) -> list[tuple[int, str, int, int, bool]]:
        """[(layer, path, K bytes, V bytes, streamed)] from the model's header and the C module's plan;
        on a GPU: path "vram" for a layer kept in VRAM as stock, streamed for one copied into VRAM per pass."""
        n_ctx = kwargs.get("n_ctx", 512) or info.n_ctx_train
        types = []
        for key in ("type_k", "type_v"):
            t = kwargs.get(key)
            if t is not None and t not in GGML_TYPE_NAMES:
                raise ConfigError(f"{key}={t} is not a KV type dualblade can offload; use f16 (1), q8_0 (8) or "
                                  "q4_0 (2), or kv_policy='ram'")
            types.append(GGML_TYPE_NAMES.get(t, "f16"))
        swa_full = kwargs.get("swa_full")
        kv = info.layer_kv_bytes(n_ctx, types[0], types[1], swa_full=True if swa_full is None else swa_full,
                                 n_ubatch=kwargs.get("n_ubatch", 512))
        gpu = placement.gpu_layers(len(info.layers), kwargs.get("n_gpu_layers", 0), kwargs.get("offload_kqv", True),
                                   bool(llama_cpp.llama_supports_gpu_offload()))
        try:
            return placement.place([(l.il, k, v) for l, (k, v) in zip(info.layers, kv)], cfg.policy,
                                   cfg.budget_bytes, gpu, vram_bytes,
                                   quantized=any(t not in ("f16", "f32", "bf16") for t in types)).layout
        except placement.VramTooSmall as e:
            minimum = e.args[0]
            raise BudgetError(f"vram_budget {format_size(vram_bytes)} is below the minimum for this model at "
                              f"n_ctx={n_ctx} ({format_size(minimum)}: {placement.VRAM_SLOTS} VRAM slots the streamed "
                              f"layers take turns in, and the layers too large to share them); give "
                              f"vram_budget='{-(-minimum // 2**20)}M' or more, or a smaller n_ctx") from None
        except ValueError as e:  # sizes no real model has
            raise ModelError(f"{model_path}: {e}; check the model file") from None
        except MemoryError as e:
            minimum = e.args[0]
            raise BudgetError(f"memory budget {format_size(cfg.budget_bytes)} is below the minimum working set of "
                              f"the {cfg.policy} policy for this model at n_ctx={n_ctx} ({format_size(minimum)}); "
                              f"give mem_budget='{-(-minimum // 2**20)}M' or more, or a smaller n_ctx") from None

    def kv_stats(self) -> dict:
        """Placement and I/O counters of the KV cache, as the C module reports them."""
        st = self._kv.stats()  # with the store's members (store_members), each with its share and bandwidth
        # the members given (or the default directory), as lists
        st["kv_dir"] = list(self._kv_config.kv_dir) if self._kv_config.kv_dir else None
        st["kv_device"] = list(self._kv_config.kv_device) if self._kv_config.kv_device else None
        # switched on for offloaded layers although the caller did not ask for it (llama_cpp's default is off)
        st["flash_attn"] = self.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        st["flash_attn_forced"] = self._flash_attn_forced
        # GPU builds: the layers kept in VRAM as stock (the module streams the others, counted above)
        resident = [e for e in self._kv_layout if e[1] == "vram"]
        st["vram"]["resident_layers"] = len(resident)
        st["vram"]["resident_bytes"] = sum(e[2] + e[3] for e in resident)
        if st.get("memory") is not None:  # auto's reserve: the weights' page cache, compute buffers not yet touched
            r = getattr(self, "_reserve", None)
            st["memory"]["weights_reserve_bytes"] = r["weights"] if r else st["memory"]["reserve_bytes"]
            st["memory"]["buffers_reserve_bytes"] = self._buffers_left() if r else 0
            st["memory"]["first_prompt_hold"] = bool(r and r["hold"])  # offloaded layers on the direct path until then
        # speculative decoding (draft_model=): drafted, accepted, mean accepted length; None without
        st["speculation"] = self._speculation.stats() if getattr(self, "_speculation", None) else None
        # what generation read from storage per token it generated (with speculation: per token, not per pass)
        c = self._counters
        st["generation"] = {"tokens": c["step_sampled"], "bytes_read": c["step_bytes_read"],
                            "bytes_read_per_token": c["step_bytes_read"] / c["step_sampled"] if c["step_sampled"]
                            else None}
        if st["speculation"] is not None:
            st["speculation"]["bytes_read_per_token"] = st["generation"]["bytes_read_per_token"]
        return st

    def kv_trim(self) -> int:
        """For an idle process (a server between requests): writes back what the direct path holds staged
        and gives the pages of its staging pool back to the system. The pool keeps them otherwise, so that
        staging a layer costs no page faults; the next layer staged faults fresh ones in, as on first use.
        The output does not change. Returns the bytes given back; raises KVIOError after an I/O error."""
        n = self._kv.trim()
        self._kv_check()
        return n

    def kv_set_path(self, layer: int, path: str) -> None:
        """Move offloaded layer `layer` to the page-cache ("mmap") or the direct path; it happens
        between graph computations and never changes the output. Under kv_policy="auto" the policy
        may move it again."""
        self._kv.set_path(layer, path)

    def counters(self) -> dict:
        """Tokens evaluated and sampled so far, and the time spent evaluating (for status lines)."""
        return dict(self._counters)

    def _kv_check(self) -> None:
        err = self._kv.error()
        if err:
            self._requires_eval = True  # logits computed from the damaged cache are never sampled
            raise KVIOError(err, "nothing computed from it is returned: call reset() to go on from an empty KV "
                                 "cache, or close()")

    def reset(self):
        super().reset()
        kv = getattr(self, "_kv", None)
        if kv is not None and kv.error():
            self._ctx.kv_cache_clear()  # nothing read since the error is trusted: forget it all
            kv.clear_error()

    def eval(self, tokens: Sequence[int]):
        self._kv_check()
        # evaluated batch by batch so that a long prompt can report progress; same result as one call
        total = len(tokens)
        step, self._after_step = self._just_sampled, False
        read0 = self._kv.bytes_read() if step else 0
        start = time.perf_counter()
        done = 0
        if self._speculation is not None:
            self._speculation.begin(self.n_tokens, total)
            # a step of generation, timed from its evaluation to the next one's: its samples and drafts included
            last, self._step = self._step, (start, total) if self._just_sampled else None
            if last is not None and self._just_sampled:
                self._speculation.timed(last[1], start - last[0])
        while True:
            batch = tokens[done:done + self.n_batch]
            try:
                if self._speculation is not None:
                    # a verification batch (or a short prompt) gets every position's logits, a long prompt its last
                    self._decode(batch, len(batch) if total <= placement.OUTPUTS_MAX else 1)
                else:
                    super().eval(batch)
            except BaseException as e:  # llama_cpp: RuntimeError "llama_decode returned N"
                if not self._kv.aborting():
                    raise
                self._kv.abort(False)  # consumed
                self._requires_eval = True
                if not isinstance(e, RuntimeError):
                    raise  # a KeyboardInterrupt raised as llama_decode returned (the signal that asked for the stop)
                raise EvalAborted(f"the evaluation was stopped (abort_eval) after {done} of {total} tokens: the rest "
                                  "are not in the context; evaluate them again to go on") from None
            done += len(batch)
            if self._reserve and self._buffers_left():
                self._reserve_touched(len(batch), self.n_tokens)
            if self._reserve and self._reserve["hold"] and done >= total:
                self._reserve["hold"] = 0  # the first evaluation has run: auto places the layers from what it left
                self._kv.set_reserve(self._reserve_bytes())
            self._kv_check()
            if self.eval_progress is not None and total > 1:
                self.eval_progress(done, total)
            if done >= total:
                break
        self._counters["eval_tokens"] += total
        if step:
            self._counters["step_bytes_read"] += self._kv.bytes_read() - read0
            self._after_step = True
        else:
            self._counters["prompt_tokens"] += total
        self._just_sampled = False
        self._counters["eval_s"] += time.perf_counter() - start

    def abort_eval(self, on: bool = True) -> None:
        """Stops the evaluation in progress from another thread (a server whose client went away, a user's
        interrupt): on the CPU within one node of llama.cpp's graph, not at the end of the batch (a long prompt's
        batch computes several ubatches layer by layer). eval() then raises EvalAborted; the tokens of the batch it
        was computing are not kept, the ones before are. A request made while no evaluation runs stops the next
        one; abort_eval(False) withdraws it. (A GPU computes each graph to its end.)"""
        self._kv.abort(on)

    def _decode(self, batch: Sequence[int], n_outputs: int) -> None:
        """llama_cpp's eval of one batch, with logits for its last n_outputs tokens, copied nowhere (sample() reads
        them from the context)."""
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)  # rows of rejected drafts: the cells go empty
        n_past, n = self.n_tokens, len(batch)
        self._batch.set_batch(batch=batch, n_past=n_past, logits_all=False)
        for i in range(n - n_outputs, n):
            self._batch.batch.logits[i] = True
        self._ctx.decode(self._batch)
        self.input_ids[n_past:n_past + n] = batch
        self.n_tokens += n
        self._requires_eval = False

    def save_state(self):
        self._kv_check()
        state = super().save_state()
        self._kv.flush()  # the copy is done: release the layers staged for it
        self._kv_check()  # a state copied from a damaged cache is not handed out
        return state

    def load_state(self, state) -> None:
        super().load_state(state)
        self._kv.flush()  # write the restored rows back and release them
        self._kv_check()

    def save_session(self, path: str | os.PathLike, app: bytes | None = None, compact: bool = False) -> dict:
        """Persist this context to `path`, one file: the KV of every layer, the token history and what the
        next eval needs. The KV is not copied through this process's memory: offloaded layers go from the
        KV store into the file by reflink, else an O_DIRECT copy through 4 MiB buffers, else in-kernel
        copy_file_range; pinned layers are written from their memory.
        If `path` holds what this context last saved there or loaded from it, the save appends: it writes
        only the KV blocks changed since (the new rows, a block or two per layer around them, rows that
        were rewritten), their checksums and the metadata, and commits with one header write once all of
        it is durable; nothing the previous save holds is overwritten, so a crash at any instant leaves
        that save loadable. Otherwise (or with compact=True) the file is written whole into a new file
        renamed over `path` (a crash leaves the old one or the new one). Created 0600; a symlink at `path`
        or a file that is not a session is never replaced.
        `app`: bytes of the caller's own kept with the session (the CLI keeps its messages there).
        Returns the save's counters: KV bytes, written_bytes, appended (and whole_why when not), strategy.
        Raises SessionError."""
        return sessions.save(self, path, app, whole=compact)

    def load_session(self, path: str | os.PathLike, verify: bool = False) -> dict:
        """Resume the context saved at `path` (one file, see save_session) on this Llama, which must have
        the same model and KV geometry (n_ctx, type_k/type_v, flash_attn, swa_full, n_ubatch, n_seq_max, RoPE
        and LoRA settings); budget, policy and kv_dir may differ. Afterwards n_tokens, eval and create_completion (with its
        prefix reuse) continue exactly as in the process that saved it. The file is only read: any number of
        processes may load it at once. Offloaded layers' rows are copied into this Llama's own KV store (as
        save_session moves them) and checked block by block when first read (a damaged block raises KVIOError then);
        pinned layers are read and checked now; verify=True reads and checks every block before anything
        changes (a damaged one then raises SessionError). Raises SessionError (the context is then empty).
        Returns the load's counters; the caller's `app` bytes are under "app"."""
        return sessions.load(self, path, verify)

    # --- what dualblade.sessions saves and restores besides llama_cpp's public attributes ------------------------

    def _kv_handle(self, flush: bool = False) -> _native.KV:
        """The KV module's handle (a session file's rows are copied from it and restored into it), once the store
        is checked (KVIOError); flush: every row written to the store first, tails too."""
        self._kv_check()
        if flush:
            self._kv.flush()
            self._kv_check()
        return self._kv

    def _saved_settings(self) -> dict:
        """What a session keeps besides the geometry: the sampling seed, and whether every position's logits are
        kept (a loader must keep them too)."""
        return {"seed": self._seed, "logits_all": self._user_logits_all}

    def _restore_history(self, tokens: np.ndarray, scores: np.ndarray | None, seed: int | None) -> None:
        """The token history of a restored context (and its logits, with logits_all), and its seed; the logits of
        the last token are not restored: it is evaluated again before the next sample."""
        n = len(tokens)
        self.input_ids[:n] = tokens
        self.n_tokens = n
        if scores is not None:
            self.scores[:n, :] = scores
        if seed is not None:
            self._seed = seed
        self._requires_eval = True

    def _clear_context(self) -> None:
        """No token and no KV cell: what a restore that failed half way leaves."""
        self._ctx.kv_cache_clear()
        self.n_tokens = 0

    def sample(self, *args, **kwargs):
        token = super().sample(*args, **kwargs)
        self._counters["sampled"] += 1
        self._counters["step_sampled"] += self._after_step
        self._just_sampled = True
        return token

    def generate(self, tokens, *args, **kwargs):
        self._just_sampled = False  # its first evaluation is the prompt's
        return super().generate(tokens, *args, **kwargs)

    def close(self) -> None:
        kv = getattr(self, "_kv", None)
        live = kv is not None and getattr(kv, "_h", None)
        if live:
            kv.flush()  # tails included: what the store holds is complete
        if hasattr(self, "_stack"):  # __init__ may have stopped before the parent set up
            super().close()
        if live:
            # nothing of the conversation stays on a device: its written range is discarded (or zeroed)
            rc = kv.wipe(zero=getattr(self, "_kv_wipe", False))
            devices = self._kv_config.kv_device
            if rc < 0 and devices:
                which = (f"KV device {devices[0]} could not discard what it held" if len(devices) == 1 else
                         f"a KV device of {', '.join(devices)} could not discard what it held")
                warnings.warn(f"{which} ({os.strerror(-rc)}): the conversation stays on it until overwritten; pass "
                              "kv_wipe=True to overwrite it with zeros at close", stacklevel=2)
        if kv is not None:
            kv.release()
