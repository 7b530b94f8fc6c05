"""The language model on llama.cpp, quantized, for computers without a GPU (`--quantize int8|int4`).

The route was chosen by measurement (README, "No GPU"): on a 2-core AVX2 CPU llama.cpp's Q8_0 and
Q4_0 kernels decode 4.9x and 7.1x faster than PyTorch in float32, while PyTorch's own int8/int4 CPU kernels
(torchao) were slower than float32 there. Only the transformer layers move: the vision tower, the Q-Former, the
projection and the token embeddings stay in PyTorch, and the engine hands llama.cpp input *embeddings* (the
tokens' rows with each image's 32 features in its slots, `ChatEngine.embed`), the way llama.cpp runs LLaVA. The
prompt ids, the image slots, token choice and stop handling are the engine's one code path; this is a
`LanguageModel` (`engine/protocol.py`).

- `gguf.py` writes the folder's Llama as GGUF, once (int8 is Q8_0, int4 Q4_0).
- `LlamaCppLLM` runs prefill and token steps on a llama.cpp context: each cache row is one llama.cpp sequence in
  one shared key/value store of `KV_CELLS` positions. When it is full, the least recently used *parked* sequence
  (one a session keeps between turns, `park`) is dropped, and that session recomputes its prefix next turn. A
  sequence in use (a row of the running batch, or one being prefilled) is never dropped. The scheduler admits a
  row only when every row fits the store at its longest (`capacity`), so it does not run out mid-answer; were it to
  (a prefill or a step that does not fit), that call fails as out of memory does on a GPU (503 for its requests).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from skingpt4.backends.gguf import check_kind, gguf_file
from skingpt4.backends.padding import padding_mask
from skingpt4.errors import NEEDS_TRANSFORMERS, NO_BEAMS, InputError, ModelLoadError, first_line

log = logging.getLogger(__name__)

KV_CELLS = 2048  # positions in the shared key/value store: one full 2000-token conversation, or several shorter
MAX_SEQUENCES = 64  # llama.cpp sequences (cached sessions and batch rows together)
CHUNK = 512  # positions computed at once in a prefill (llama.cpp's micro-batch)


def require_llama_cpp():
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError:
        raise ModelLoadError("--quantize needs llama.cpp: pip install 'skingpt4[cpu]' (it builds, minutes)") from None
    return llama_cpp


# -- the language model on llama.cpp ----------------------------------------------------------------------------


class Sequence:
    """One row of llama.cpp's key/value store: its sequence id, how many positions it holds, and whether it is
    parked (kept by a session between turns: it may be dropped). When nothing refers to it any more, its id is
    freed (at the next call into llama.cpp, which holds the engine's lock)."""

    def __init__(self, llm: LlamaCppLLM, seq_id: int):
        self.llm, self.id, self.length, self.parked = llm, seq_id, 0, False

    def __del__(self):
        if self.id is not None:
            self.llm.freed.append(self.id)


class Rows:
    """A cache on llama.cpp: its rows' sequences. `get_seq_length` and `crop` are those of a lone row (a session's
    cache), as on a transformers cache."""

    def __init__(self, rows: list[Sequence] | None = None):
        self.rows = rows or []

    def get_seq_length(self) -> int:
        return self.rows[0].length if self.rows else 0

    def crop(self, count: int) -> None:
        """A negative count removes that many positions from the end."""
        row = self.rows[0]
        row.llm.truncate(row, row.length + count)


class LlamaCppLLM:
    """The engine's `LanguageModel` on a llama.cpp context (one shared key/value store of `kv_cells` positions)."""

    def __init__(self, path: Path, embed_tokens: torch.nn.Module, vocab: int, kv_cells: int = KV_CELLS):
        lc = self.lc = require_llama_cpp()
        lc.llama_log_set(_LOG, None)
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        # Read, not mapped: on x86 llama.cpp repacks the weights into its faster CPU layout (a copy), and a mapping
        # would keep every page of the file resident beside that copy (measured, 13B int4: 17.9 GB against 11.3).
        model_params.load_mode = lc.LLAMA_LOAD_MODE_NONE
        self.model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp cannot load {path}")
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = kv_cells, kv_cells, CHUNK
        params.n_seq_max, params.kv_unified, params.no_perf = MAX_SEQUENCES, True, True
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise ModelLoadError(f"llama.cpp cannot make a context of {kv_cells} positions for {path}")
        weakref.finalize(self, _close, lc, self.ctx, self.model)
        self.memory = lc.llama_get_memory(self.ctx)
        self.embed_tokens, self.vocab, self.kv_cells = embed_tokens, vocab, kv_cells
        self.capacity = kv_cells  # the scheduler admits only rows that fit it at their longest
        self.width = lc.llama_model_n_embd(self.model)
        self.free_ids = list(range(MAX_SEQUENCES - 1, -1, -1))
        self.freed: list[int] = []  # ids of sequences dropped by their owners, not yet cleared
        self.live: OrderedDict[int, weakref.ref] = OrderedDict()  # least recently used first

    # -- the LanguageModel interface (engine/protocol.py)

    def new_cache(self) -> Rows:
        return Rows()

    def prefill(self, embeds: list[torch.Tensor], cache: Rows, reuse: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts' embeddings into new sequences, or a lone prompt after the first `reuse` positions of its
        session's row; returns the padding mask (B, T), as `TransformersLLM.prefill` does, and the logits (B, V)."""
        if cache.rows:
            work = [(cache.rows[0], embeds[0][reuse:])]
        else:
            cache.rows = [self._sequence() for _ in embeds]
            work = list(zip(cache.rows, embeds))
        return padding_mask([len(e) for e in embeds]), self._run(work)

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Rows) -> torch.Tensor:
        embeds = self.embed_tokens(tokens)
        return self._run([(row, embeds[i : i + 1]) for i, row in enumerate(cache.rows)])

    @staticmethod
    def join(cache: Rows, old_pad: int, other: Rows, new_pad: int) -> None:
        cache.rows += other.rows  # rows are sequences: there is no padding to add

    @staticmethod
    def keep(cache: Rows, rows: list[int], start: int) -> None:
        cache.rows = [cache.rows[i] for i in rows]

    @staticmethod
    def row(cache: Rows, row: int, start: int) -> Rows:
        return Rows([cache.rows[row]])

    @staticmethod
    def park(cache: Rows) -> None:
        """A session keeps this cache between turns: under pressure its sequence may be dropped (`_evict`)."""
        for seq in cache.rows:
            seq.parked = True

    def beam_search(self, *args, **kwargs):
        raise InputError(NO_BEAMS)

    def logits_at(self, *args, **kwargs):
        raise InputError(f"choice scoring {NEEDS_TRANSFORMERS}")

    # -- sequences

    def truncate(self, seq: Sequence, length: int) -> None:
        self._clear_freed()
        if seq.id is not None and length < seq.length:
            self.lc.llama_memory_seq_rm(self.memory, seq.id, length, -1)
        seq.length = min(seq.length, length)

    def _sequence(self) -> Sequence:
        self._clear_freed()
        if not self.free_ids and not self._evict():
            raise torch.OutOfMemoryError(f"llama.cpp: all {MAX_SEQUENCES} sequences are in use")
        seq = Sequence(self, self.free_ids.pop())
        self.live[seq.id] = weakref.ref(seq)
        return seq

    def _clear_freed(self) -> None:
        """Release the ids of sequences their owners dropped (their `__del__` queued them)."""
        while self.freed:
            self._release(self.freed.pop())

    def _release(self, seq_id: int) -> None:
        self.lc.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        del self.live[seq_id]
        self.free_ids.append(seq_id)

    def _evict(self) -> bool:
        """Drop the least recently used parked sequence; its session recomputes its prefix next turn. A sequence
        in use is never dropped; one whose owner is gone is left to `_clear_freed` (its id is queued there)."""
        self._clear_freed()
        for seq_id, ref in self.live.items():
            if (seq := ref()) is not None and seq.parked:
                self._release(seq_id)
                seq.id, seq.length = None, 0
                return True
        return False

    # -- decoding

    def _run(self, work: list[tuple[Sequence, torch.Tensor]]) -> torch.Tensor:
        """Each row's embeddings (T_i, H) appended to its sequence, whole rows in llama.cpp batches of at most
        `kv_cells` positions; returns the logits after each row's last position (B, V)."""
        self._clear_freed()
        for seq, _ in work:
            if seq.id is None:
                raise RuntimeError("a sequence was evicted while in use")
            seq.parked = False
            self.live.move_to_end(seq.id)
        logits = torch.empty(len(work), self.vocab)
        chunks, size = [[]], 0
        for n, (seq, e) in enumerate(work):
            if len(e) > self.kv_cells:
                raise torch.OutOfMemoryError(f"{len(e)} positions do not fit llama.cpp's store of {self.kv_cells}")
            if size + len(e) > self.kv_cells:
                chunks.append([])
                size = 0
            chunks[-1].append((n, seq, e.detach().to(torch.float32).cpu().numpy()))
            size += len(e)
        for chunk in chunks:
            self._decode(chunk, logits)
        return logits

    def _decode(self, chunk, logits: torch.Tensor) -> None:
        lc, total = self.lc, sum(len(e) for _, _, e in chunk)
        batch = lc.llama_batch_init(total, self.width, 1)
        try:
            embd = np.concatenate([e for _, _, e in chunk])
            ctypes.memmove(batch.embd, embd.ctypes.data, embd.nbytes)
            pos = np.ctypeslib.as_array(batch.pos, shape=(total,))
            np.ctypeslib.as_array(batch.n_seq_id, shape=(total,))[:] = 1
            wants = np.ctypeslib.as_array(batch.logits, shape=(total,))
            wants[:], at, outputs = 0, 0, []
            for n, seq, e in chunk:
                pos[at : at + len(e)] = np.arange(seq.length, seq.length + len(e))
                for i in range(at, at + len(e)):
                    batch.seq_id[i][0] = seq.id
                at += len(e)
                wants[at - 1] = 1  # logits after the row's last position only
                outputs.append((n, at - 1))
            batch.n_tokens = total
            while (status := lc.llama_decode(self.ctx, batch)) == 1:  # no room in the key/value store
                if not self._evict():
                    raise torch.OutOfMemoryError(f"llama.cpp's key/value store ({self.kv_cells} positions) is full")
            if status != 0:
                raise RuntimeError(f"llama.cpp could not decode (status {status})")
            for _, seq, e in chunk:
                seq.length += len(e)
            for n, i in outputs:
                row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
                logits[n] = torch.from_numpy(row.copy())
        finally:
            lc.llama_batch_free(batch)


def _close(lc, ctx, model) -> None:
    lc.llama_free(ctx)
    lc.llama_model_free(model)


def _log_errors(level, text, _):
    """llama.cpp's log: errors to ours, the rest (a page per model load) dropped."""
    if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
        log.error("llama.cpp: %s", text.decode(errors="replace").rstrip())


def _log_callback():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.llama_log_callback(_log_errors)


_LOG = _log_callback()  # kept alive here: llama.cpp calls it for as long as the process runs


# -- loading ----------------------------------------------------------------------------------------------------


def load_quantized(model: str | Path, kind: str, dtype: str | None = None):
    """A model folder (or `tiny`) with its vision tower, Q-Former, projection and token embeddings in PyTorch on the
    CPU (`dtype`, float32 by default) and its LLM on llama.cpp in `kind` (int8, int4; float32 for tests): a
    `LoadedModel` whose `llm` is a `LlamaCppLLM`."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from skingpt4.folder.load import ready, resolve_dtype, resolve_model_path

    require_llama_cpp()  # before the GGUF export, which needs the `gguf` package too
    check_kind(kind)
    path = resolve_model_path(model)
    config = Blip2Config.from_pretrained(path)
    layers = config.text_config.num_hidden_layers
    gguf = gguf_file(path, kind, config.text_config)
    config.text_config.num_hidden_layers = 0  # the layers live in llama.cpp; nothing of them loads here
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the skipped layer weights are expected
    try:
        net = Blip2ForConditionalGeneration.from_pretrained(path, config=config, dtype=resolve_dtype(dtype, "cpu"))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model in {path}: {first_line(exc, 300)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    net.language_model.lm_head.to("meta")  # llama.cpp has the head; only its shape is read here
    net.config.text_config.num_hidden_layers = layers
    return ready(path, net, LlamaCppLLM(gguf, net.get_input_embeddings(), net.config.text_config.vocab_size))
