"""ctypes bindings to libdualblade, the C residency module (native/include/dualblade.h).

libdualblade is reached through the handle of the libllama that llama_cpp loaded: the patched
libllama links it, so this is the very instance llama.cpp calls. A stock libllama does not link it,
which is how a llama_cpp replaced by a stock llama-cpp-python install is detected.
"""
from __future__ import annotations

import contextlib
import ctypes
from ctypes import POINTER, c_char_p, c_int, c_int32, c_uint32, c_uint64, c_void_p

ABI_VERSION = 14

PATHS = ("ram", "mmap", "direct", "vram")  # "vram": in VRAM as stock (GPU builds)
POLICIES = ("ram", "mmap", "direct", "auto")
BUDGET_UNLIMITED = (1 << 64) - 1
CONFIG_FORCE, CONFIG_NO_VERIFY = 1 << 0, 1 << 1
LAYOUT_STREAMED = 1 << 0


class NativeError(RuntimeError):
    """libdualblade is missing, of another version, or failed."""


class Config(ctypes.Structure):
    _fields_ = [
        ("policy", c_uint32),
        ("flags", c_uint32),
        ("budget_bytes", c_uint64),
        ("kv_dir", c_char_p),
        ("kv_device", c_char_p),
        ("reserve_bytes", c_uint64),
    ]


class LayoutLayer(ctypes.Structure):
    _fields_ = [("il", c_int32), ("path", c_uint32), ("k_bytes", c_uint64), ("v_bytes", c_uint64),
                ("flags", c_uint32), ("reserved", c_uint32)]


def _layout_array(layout):
    """[(il, path, k_bytes, v_bytes[, streamed])] as the C array (streamed: copied into VRAM per pass)."""
    rows = [LayoutLayer(e[0], PATHS.index(e[1]), e[2], e[3], LAYOUT_STREAMED if len(e) > 4 and e[4] else 0, 0)
            for e in layout]
    return (LayoutLayer * max(len(rows), 1))(*rows)


STRIPE_MEMBERS_MAX = 8  # members a store is striped over at most (the C module's DBLADE_STRIPE_MEMBERS)
MEMBER_PATH_MAX = 511   # bytes of a member's path the C module keeps (char[512])
STORE_KINDS = {1: "file", 2: "device"}


class StoreInfo(ctypes.Structure):
    _fields_ = [
        ("kind", c_uint32),
        ("align", c_uint32),
        ("n_extents", c_uint32),
        ("n_members", c_uint32),
        ("data_bytes", c_uint64),
        ("path", ctypes.c_char * 512),
        ("stripe_unit", c_uint64),
        ("read_bps", c_uint64),
        ("share", c_uint32),
        ("n_pattern", c_uint32),
    ]


def _members_arg(paths) -> bytes | None:
    """A store's members (a tuple of paths, as KVConfig keeps them) as the C module takes them: one per line."""
    if not paths:
        return None
    if isinstance(paths, (str, bytes)):  # one representation: KVConfig's tuple (a str would split into letters)
        raise TypeError(f"the store's members must be a tuple of paths, not {type(paths).__name__}")
    import os

    return b"\n".join(os.fsencode(p) for p in paths)


class LayerStats(ctypes.Structure):
    _fields_ = [
        ("il", c_int32),
        ("path", c_uint32),
        ("bytes", c_uint64),
        ("resident_bytes", c_uint64),
        ("bytes_read", c_uint64),
        ("bytes_written", c_uint64),
        ("io_wait_ns", c_uint64),
        ("flags", c_uint32),
        ("reserved", c_uint32),
    ]


class IOShapeStats(ctypes.Structure):
    _fields_ = [("chunk_bytes", c_uint32), ("depth", c_uint32), ("batches", c_uint64), ("gib_s", ctypes.c_double)]


class Stats(ctypes.Structure):
    _fields_ = [
        ("policy", c_uint32),
        ("n_layers", c_uint32),
        ("io_engine", c_uint32),
        ("depth", c_uint32),
        ("io_engine_why", ctypes.c_char * 96),
        ("n_switches", c_uint64),
        ("mem_limit", c_uint64),
        ("mem_available", c_uint64),
        ("page_cache_room", c_uint64),
        ("page_cache_need", c_uint64),
        ("reserve_bytes", c_uint64),
        ("chunk_bytes", c_uint64),
        ("pool_moves", c_uint32),
        ("reserved0", c_uint32),
        ("pool_bytes", c_uint64),
        ("huge_page_bytes", c_uint64),
        ("checksum_bytes", c_uint64),
        ("n_io_errors", c_uint64),
        ("staged_bytes", c_uint64),
        ("staged_peak", c_uint64),
        ("budget_bytes", c_uint64),
        ("kv_bytes_total", c_uint64),
        ("resident_bytes", c_uint64),
        ("bytes_read", c_uint64),
        ("bytes_written", c_uint64),
        ("io_wait_ns", c_uint64),
        ("vram_slots", c_uint32),
        ("vram_streamed", c_uint32),
        ("vram_slot_bytes", c_uint64),
        ("h2d_bytes", c_uint64),
        ("d2h_bytes", c_uint64),
        ("copy_wait_ns", c_uint64),
        ("h2d_pinned_bytes", c_uint64),
        ("vram_ring_bytes", c_uint64),
        ("vram_ring_read_bytes", c_uint64),
        ("vram_ring_pinned", c_uint32),
        ("reserved1", c_uint32),
        ("vram_why", ctypes.c_char * 96),
        ("vram_pin_why", ctypes.c_char * 96),
        ("io_chunk_bytes", c_uint32),
        ("io_depth", c_uint32),
        ("io_shape_fixed", c_uint32),
        ("io_n_shapes", c_uint32),
        ("io_shapes", IOShapeStats * 8),
        ("vram_ring_around_bytes", c_uint64),
        ("vram_ring_overlapped", c_uint64),
    ]


class Switch(ctypes.Structure):
    _fields_ = [
        ("t_ms", c_uint64),
        ("il", c_int32),
        ("from_path", c_uint32),
        ("to_path", c_uint32),
        ("reason", ctypes.c_char * 100),
    ]


IO_ENGINES = {0: None, 1: "io_uring", 2: "threads"}


def shape_name(chunk: int, depth: int) -> str:
    return f"{chunk / 2**20:g} MiB x{depth}" if chunk >= 2**20 else f"{chunk // 1024} KiB x{depth}"


def _io_shape(st: "Stats") -> "dict | None":
    if not st.io_chunk_bytes:
        return None
    return {"now": shape_name(st.io_chunk_bytes, st.io_depth), "fixed": bool(st.io_shape_fixed),
            "measured": {shape_name(x.chunk_bytes, x.depth): {"batches": x.batches, "gib_s": round(x.gib_s, 3)}
                         for x in st.io_shapes[:st.io_n_shapes]}}
SWITCH_LOG = 64

STATE_STOCK, STATE_SAVE_META, STATE_LOAD_META = 0, 1, 2


class Section(ctypes.Structure):
    _fields_ = [("kind", c_uint32), ("reserved", c_uint32), ("data", c_void_p), ("bytes", c_uint64)]


class SessionFileStats(ctypes.Structure):
    _fields_ = [
        ("kv_bytes", c_uint64),
        ("cloned_bytes", c_uint64),
        ("copied_bytes", c_uint64),
        ("direct_bytes", c_uint64),
        ("memory_bytes", c_uint64),
        ("checked_bytes", c_uint64),
        ("file_bytes", c_uint64),
        ("strategy", ctypes.c_char * 32),
        ("written_bytes", c_uint64),
        ("appended", c_uint32),
        ("n_patches", c_uint32),
        ("whole_why", ctypes.c_char * 96),
    ]

    def as_dict(self) -> dict:
        d = {name: getattr(self, name) for name, _ in self._fields_}
        d["strategy"] = self.strategy.decode(errors="replace")
        d["appended"] = bool(self.appended)
        d["whole_why"] = self.whole_why.decode(errors="replace")
        return d


_lib = None


def lib() -> ctypes.CDLL:
    """The loaded libdualblade (through libllama), with prototypes set; raises NativeError."""
    global _lib
    if _lib is not None:
        return _lib
    import llama_cpp.llama_cpp as llama_cpp_lib  # loads libllama

    handle = llama_cpp_lib._lib
    path = getattr(handle, "_name", "libllama")
    try:
        handle.dblade_abi_version  # noqa: B018  (dlsym through libllama's dependencies)
    except AttributeError:
        raise NativeError(f"the llama_cpp library in use ({path}) is not dualblade's patched build "
                          "(was llama-cpp-python installed over it?); reinstall dualblade: "
                          "pip install --force-reinstall --no-deps dualblade") from None
    handle.dblade_abi_version.restype = c_int
    handle.dblade_abi_version.argtypes = []
    if handle.dblade_abi_version() != ABI_VERSION:
        raise NativeError(f"libdualblade ABI {handle.dblade_abi_version()} does not match this Python package "
                          f"(ABI {ABI_VERSION}); reinstall dualblade so both come from one build")
    protos = {
        "dblade_plan": (c_int, [c_uint32, c_uint64, c_uint32, POINTER(c_uint64), POINTER(c_uint32),
                                POINTER(c_uint64)]),
        "dblade_kv_create": (c_int, [POINTER(Config), c_uint32, POINTER(LayoutLayer), POINTER(c_void_p)]),
        "dblade_kv_error": (c_int, [c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
        "dblade_kv_flush": (c_int, [c_void_p]),
        "dblade_kv_trim": (ctypes.c_int64, [c_void_p]),
        "dblade_kv_clear_error": (c_int, [c_void_p]),
        "dblade_kv_wipe": (c_int, [c_void_p, c_int]),
        "dblade_kv_store": (c_int, [c_void_p, POINTER(StoreInfo)]),
        "dblade_kv_store_member": (c_int, [c_void_p, c_uint32, POINTER(StoreInfo)]),
        "dblade_store_check": (c_int, [POINTER(Config), c_uint32, POINTER(LayoutLayer), ctypes.c_char_p,
                                       ctypes.c_size_t]),
        "dblade_layout_geometry": (c_uint64, [c_uint32, POINTER(LayoutLayer)]),
        "dblade_last_error": (ctypes.c_char_p, []),
        "dblade_kv_release": (None, [c_void_p]),
        "dblade_kv_bind": (c_int, [c_void_p]),
        "dblade_kv_snapshot": (c_int, [c_void_p, POINTER(Stats), POINTER(LayerStats), c_uint32]),
        "dblade_kv_bytes_read": (c_uint64, [c_void_p]),
        "dblade_kv_switches": (c_int, [c_void_p, POINTER(Switch), c_uint32]),
        "dblade_kv_set_path": (c_int, [c_void_p, c_int32, c_uint32]),
        "dblade_kv_set_reserve": (c_int, [c_void_p, c_uint64]),
        "dblade_kv_set_outputs_max": (c_int, [c_void_p, c_uint32]),
        "dblade_prefill_layer_major": (c_int, [c_int]),
        "dblade_kv_abort": (c_int, [c_void_p, c_int]),
        "dblade_kv_aborting": (ctypes.c_bool, [c_void_p]),
        "dblade_kv_state_mode": (c_int, [c_void_p, c_int]),
        "dblade_sessionfile_save_flags": (c_int, [c_void_p, c_char_p, POINTER(Section), c_uint32, c_uint32,
                                                  POINTER(SessionFileStats)]),
        "dblade_sessionfile_open": (c_int, [c_char_p, POINTER(c_void_p)]),
        "dblade_sessionfile_close": (None, [c_void_p]),
        "dblade_sessionfile_section": (c_int, [c_void_p, c_uint32, POINTER(c_void_p), POINTER(c_uint64)]),
        "dblade_sessionfile_restore": (c_int, [c_void_p, c_void_p, POINTER(SessionFileStats)]),
        "dblade_sessionfile_verify": (c_int, [c_void_p, POINTER(SessionFileStats)]),
    }
    for name, (res, args) in protos.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = res, args
    _lib = handle
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        import os

        raise NativeError(f"{what}: {os.strerror(-rc)}")
    return rc


def prefill_layer_major(streamed: bool) -> bool:
    """Whether llama.cpp computes a prompt batch of several ubatches layer by layer, in a context that streams
    layers into VRAM or not (the C module's rule and its DUALBLADE_LAYER_MAJOR)."""
    return bool(lib().dblade_prefill_layer_major(int(streamed)))


def plan(policy: str, budget_bytes: int | None, layer_bytes: list[int]) -> tuple[list[str], int]:
    """The C module's placement plan: a path per layer and the staging bytes of the direct path.

    Raises MemoryError naming the minimum budget when budget_bytes is below the working set.
    """
    n = len(layer_bytes)
    if any(not 0 <= b < 1 << 63 for b in layer_bytes):
        raise ValueError("a KV layer of more than 2^63 bytes: the model's header is not plausible")
    arr = (c_uint64 * max(n, 1))(*layer_bytes)
    paths = (c_uint32 * max(n, 1))()
    staging = c_uint64()
    budget = BUDGET_UNLIMITED if budget_bytes is None else budget_bytes
    rc = lib().dblade_plan(POLICIES.index(policy), budget, n, arr, paths, ctypes.byref(staging))
    if rc == -12:  # ENOMEM: below the minimum working set
        raise MemoryError(staging.value)
    _check(rc, "placement plan")
    return [PATHS[paths[i]] for i in range(n)], staging.value


def store_check(policy: str, kv_dir: tuple[str, ...] | None, kv_device: tuple[str, ...] | None, force: bool,
                layout: list[tuple[int, str, int, int]]) -> str | None:
    """Whether the store for this layout can be opened, writing nothing: None, or why not in the C module's
    words (a missing or read-only directory, tmpfs, no room, a device that is mounted, too small or holds
    something else). kv_dir, kv_device: the members (several: the KV striped over them)."""
    cfg = Config(POLICIES.index(policy), CONFIG_FORCE if force else 0, BUDGET_UNLIMITED,
                 _members_arg(kv_dir), _members_arg(kv_device), 0)
    arr = _layout_array(layout)
    msg = ctypes.create_string_buffer(512)
    rc = lib().dblade_store_check(ctypes.byref(cfg), len(layout), arr, msg, len(msg))
    return (msg.value.decode(errors="replace") or f"error {rc}") if rc < 0 else None


class KVError(NativeError):
    """The C module refused a configuration; the message says why and what to do."""


class KV:
    """One Llama object's residency state in the C module.

    layout: [(il, path, k_bytes, v_bytes)] for every KV layer the context will allocate, or None
    (every layer pinned in RAM). The store for the offloaded ones is opened here.
    """

    def __init__(self, policy: str, budget_bytes: int | None, kv_dir: tuple[str, ...] | None,
                 kv_device: tuple[str, ...] | None, layout: list[tuple[int, str, int, int]] | None = None,
                 force: bool = False, reserve_bytes: int = 0, verify: bool = True):
        self._kv_dir = _members_arg(kv_dir)  # kept: the C module reads them while it opens the store
        self._kv_device = _members_arg(kv_device)
        self._verify = verify
        flags = (CONFIG_FORCE if force else 0) | (0 if verify else CONFIG_NO_VERIFY)
        cfg = Config(POLICIES.index(policy), flags,
                     BUDGET_UNLIMITED if budget_bytes is None else budget_bytes, self._kv_dir, self._kv_device,
                     reserve_bytes)
        layout = layout or []
        arr = _layout_array(layout)
        h = c_void_p()
        self._lib = lib()
        rc = self._lib.dblade_kv_create(ctypes.byref(cfg), len(layout), arr, ctypes.byref(h))
        if rc < 0:
            import os

            msg = (self._lib.dblade_last_error() or b"").decode(errors="replace")
            raise KVError(msg or f"creating the KV object: {os.strerror(-rc)}")
        self._h = h

    @contextlib.contextmanager
    def bound(self):
        """KV caches created by this thread inside the block belong to this KV object."""
        self._lib.dblade_kv_bind(self._h)
        try:
            yield self
        finally:
            self._lib.dblade_kv_bind(None)

    def error(self) -> str | None:
        """The first I/O error of the KV object, in words, or None."""
        if self._lib.dblade_kv_error(self._h, None, 0) == 0:  # the usual case: no text to copy
            return None
        buf = ctypes.create_string_buffer(512)
        rc = self._lib.dblade_kv_error(self._h, buf, len(buf))
        return buf.value.decode(errors="replace") or f"KV I/O error {rc}" if rc < 0 else None

    def flush(self) -> None:
        self._lib.dblade_kv_flush(self._h)

    def trim(self) -> int:
        """Flush, then the idle staging pool's pages back to the system: the bytes given back (0 after an
        I/O error, which error() reports)."""
        return max(self._lib.dblade_kv_trim(self._h), 0)

    def clear_error(self) -> None:
        """Forget the I/O error, once the caches have been cleared."""
        self._lib.dblade_kv_clear_error(self._h)

    def wipe(self, zero: bool = False) -> int:
        """Discard (or overwrite with zeros) what the store holds; 0 or -errno."""
        return self._lib.dblade_kv_wipe(self._h, 1 if zero else 0)

    def store(self) -> dict | None:
        """The whole store (None: no layer offloaded): kind, the members' paths joined by ", ", alignment, bytes,
        file extents (the most of any member), members, stripe_unit (0: one member)."""
        si = StoreInfo()
        _check(self._lib.dblade_kv_store(self._h, ctypes.byref(si)), "reading the KV store")
        if si.kind == 0:
            return None
        return {
            "kind": STORE_KINDS[si.kind],
            "path": si.path.decode(errors="replace"),
            "align": si.align,
            "bytes": si.data_bytes,
            "extents": si.n_extents,
            "members": si.n_members,
            "stripe_unit": si.stripe_unit,
        }

    def store_members(self, n: int | None = None) -> list[dict]:
        """Each member of the store, in the order given: its path, kind, O_DIRECT alignment, bytes reserved on it
        (its share of the stripes), file extents, probed O_DIRECT read bandwidth in bytes/s (None: not probed, as
        with one member or DUALBLADE_STRIPE_SHARES), share (its stripes of every pattern of n_pattern). Empty when
        no layer is offloaded. n: the members, where the caller has read them (store()["members"])."""
        if n is None:
            store = self.store()
            n = store["members"] if store else 0
        out = []
        for m in range(n):
            mi = StoreInfo()
            _check(self._lib.dblade_kv_store_member(self._h, m, ctypes.byref(mi)), f"reading KV store member {m}")
            out.append({
                "path": mi.path.decode(errors="replace"),
                "kind": STORE_KINDS[mi.kind],
                "align": mi.align,
                "bytes": mi.data_bytes,
                "extents": mi.n_extents,
                "read_bps": mi.read_bps or None,
                "share": mi.share,
                "n_pattern": mi.n_pattern,
            })
        return out

    def set_path(self, il: int, path: str) -> None:
        """Move an offloaded layer to the page-cache ("mmap") or the direct path when next used."""
        if path not in ("mmap", "direct") or self._lib.dblade_kv_set_path(self._h, il, PATHS.index(path)) < 0:
            raise ValueError(f"layer {il} is not an offloaded layer, or {path!r} is not mmap or direct")

    def set_reserve(self, reserve_bytes: int) -> None:
        """The memory auto leaves to others (the weights' page cache, compute buffers not yet touched), once
        known: after the model is loaded, and as prompts fill the compute buffers."""
        _check(self._lib.dblade_kv_set_reserve(self._h, reserve_bytes), "setting auto's reserve")

    def install_abort(self, ctx) -> None:
        """Makes the context ctx (a llama_context pointer) stop its evaluation between two nodes of a graph once
        abort(True) is asked (llama.cpp's CPU backend asks; the check is C's, no Python runs in the hot path)."""
        import llama_cpp

        addr = ctypes.cast(self._lib.dblade_kv_aborting, c_void_p).value
        self._abort_cb = llama_cpp.ggml_abort_callback(addr)  # kept: the context calls it
        llama_cpp.llama_set_abort_callback(ctx, self._abort_cb, self._h)

    def abort(self, on: bool = True) -> None:
        """Asks the evaluation in progress (and any after it) to stop, from any thread; abort(False) withdraws."""
        _check(self._lib.dblade_kv_abort(self._h, int(on)), "asking the evaluation to stop")

    def aborting(self) -> bool:
        return bool(self._lib.dblade_kv_aborting(self._h))

    def set_outputs_max(self, n_outputs: int) -> None:
        """The outputs a ubatch of the context created next asks for at most (its compute buffers hold that many)."""
        _check(self._lib.dblade_kv_set_outputs_max(self._h, n_outputs), "setting the outputs a ubatch asks for")

    def switches(self) -> tuple[int, list[dict]]:
        """How many path switches there were, and the last ones (oldest first)."""
        log = (Switch * SWITCH_LOG)()
        total = _check(self._lib.dblade_kv_switches(self._h, log, SWITCH_LOG), "reading KV switches")
        return total, [
            {
                "t_s": e.t_ms / 1000,
                "layer": None if e.il < 0 else e.il,
                "from": PATHS[e.from_path],
                "to": PATHS[e.to_path],
                "reason": e.reason.decode(errors="replace"),
            }
            for e in log[: min(total, SWITCH_LOG)]
        ]

    def bytes_read(self) -> int:
        """Bytes read from storage so far (stats()["bytes_read"], cheaply)."""
        return self._lib.dblade_kv_bytes_read(self._h)

    def stats(self) -> dict:
        st = Stats()
        n = _check(self._lib.dblade_kv_snapshot(self._h, ctypes.byref(st), None, 0), "reading KV stats")
        layers = (LayerStats * max(n, 1))()
        # the totals and the layers of one moment (the worker stages and writes back meanwhile)
        n = min(n, _check(self._lib.dblade_kv_snapshot(self._h, ctypes.byref(st), layers, n), "reading KV stats"))
        n_switches, switches = self.switches()
        store = self.store()
        return {
            "policy": POLICIES[st.policy],
            "budget_bytes": None if st.budget_bytes == BUDGET_UNLIMITED else st.budget_bytes,
            "kv_bytes_total": st.kv_bytes_total,
            # memory the process holds (pinned + staged); page cache of the mmap path apart
            "resident_bytes": sum(layers[i].resident_bytes for i in range(n) if PATHS[layers[i].path] != "mmap"),
            "page_cache_bytes": sum(layers[i].resident_bytes for i in range(n) if PATHS[layers[i].path] == "mmap"),
            "offloaded_bytes": sum(layers[i].bytes for i in range(n) if PATHS[layers[i].path] in ("mmap", "direct")),
            "staged_bytes": st.staged_bytes,
            "staged_peak_bytes": st.staged_peak,
            "bytes_read": st.bytes_read,
            "bytes_written": st.bytes_written,
            "io_wait_s": st.io_wait_ns / 1e9,
            "io_engine": IO_ENGINES.get(st.io_engine),
            "io_engine_reason": st.io_engine_why.decode(errors="replace") or None,
            "pipeline_depth": st.depth,
            # the store's O_DIRECT requests: size x in flight, picked by measuring its reads (shape.c)
            "io_shape": _io_shape(st),
            "huge_page_bytes": st.huge_page_bytes,
            # the direct path's staging memory: a pool reused from layer to layer (moved, not faulted
            # in again) in chunks of this size
            "staging": {"chunk_bytes": st.chunk_bytes, "pool_bytes": st.pool_bytes, "reused": bool(st.pool_moves)},
            "verify": self._verify,
            "checksum_bytes": st.checksum_bytes,
            "io_errors": st.n_io_errors,
            "memory": {
                "limit_bytes": None if st.mem_limit == BUDGET_UNLIMITED else st.mem_limit,
                "available_bytes": st.mem_available or None,
                "page_cache_room_bytes": None if st.page_cache_room == BUDGET_UNLIMITED else st.page_cache_room,
                "page_cache_need_bytes": st.page_cache_need,
                "reserve_bytes": st.reserve_bytes,  # what auto leaves to others (Llama.kv_stats splits it)
            } if st.policy == POLICIES.index("auto") else None,
            "switches": switches,
            "switch_count": n_switches,
            "layers_by_path": {p: sum(1 for i in range(n) if PATHS[layers[i].path] == p) for p in PATHS[:3]},
            # GPU builds: layers whose KV lives on the host path above and is copied into VRAM per pass
            "vram": {
                "streamed_layers": st.vram_streamed,
                "slots": st.vram_slots,
                "slot_bytes": st.vram_slot_bytes,
                "h2d_bytes": st.h2d_bytes,
                "h2d_pinned_bytes": st.h2d_pinned_bytes,
                "d2h_bytes": st.d2h_bytes,
                "copy_wait_s": st.copy_wait_ns / 1e9,
                # page-locked host memory the page cache and direct paths are read into, ahead of the graph
                "ring_bytes": st.vram_ring_bytes,
                "ring_read_bytes": st.vram_ring_read_bytes,
                # of those, a prompt's page-cache rows read back around the cache (written around it under a limit)
                "ring_around_bytes": st.vram_ring_around_bytes,
                # layers whose reads started beside the last reads of the layer before (the queue kept full)
                "ring_overlapped": st.vram_ring_overlapped,
                "ring_pinned": bool(st.vram_ring_pinned),
                "pin_failed": st.vram_pin_why.decode(errors="replace") or None,
                "why": st.vram_why.decode(errors="replace"),
            },
            "store": store,
            # the members the KV is striped over (one: not striped), each with its share and probed bandwidth
            "store_members": self.store_members(store["members"] if store else 0),
            "layers": [
                {
                    "layer": layers[i].il,
                    "path": PATHS[layers[i].path],
                    "bytes": layers[i].bytes,
                    "resident_bytes": layers[i].resident_bytes,
                    "bytes_read": layers[i].bytes_read,
                    "bytes_written": layers[i].bytes_written,
                    "io_wait_s": layers[i].io_wait_ns / 1e9,
                    "streamed": bool(layers[i].flags & LAYOUT_STREAMED),
                }
                for i in range(n)
            ],
        }

    def release(self) -> None:
        if getattr(self, "_h", None):
            self._lib.dblade_kv_release(self._h)
            self._h = None

    def __del__(self):
        self.release()


class SessionFileError(NativeError):
    """A session file cannot be written, read or used; the message says why (one line)."""

    def __init__(self, msg: str, rc: int):
        super().__init__(msg)
        self.rc = rc


def _fail(what: str, rc: int):
    import os

    msg = (lib().dblade_last_error() or b"").decode(errors="replace")
    raise SessionFileError(msg or f"{what}: {os.strerror(-rc)}", rc)


def kv_state_mode(kv: "KV", mode: int) -> None:
    rc = lib().dblade_kv_state_mode(kv._h, mode)
    if rc < 0:
        _fail("setting the state mode", rc)


SAVE_WHOLE = 1


def sessionfile_save(kv: "KV", path: str, sections: dict[int, bytes], room: dict[int, int] | None = None,
                     whole: bool = False) -> dict:
    """Saves the KV object's KV and the sections {kind: bytes} to path: appended to the file's last commit when
    the KV last matched it, else written whole (atomically either way); room {kind: bytes}: space in the file for a
    section to grow into. Returns the counters."""
    room = room or {}
    keep = [(k, ctypes.create_string_buffer(v, len(v)) if v else None, len(v)) for k, v in sections.items()]
    arr = (Section * max(len(keep), 1))(*[Section(k, min(room.get(k, 0), 2**32 - 1),
                                                  ctypes.cast(b, c_void_p) if b is not None else None, n)
                                          for k, b, n in keep])
    st = SessionFileStats()
    rc = lib().dblade_sessionfile_save_flags(kv._h, path.encode(), arr, len(keep), SAVE_WHOLE if whole else 0,
                                             ctypes.byref(st))
    if rc < 0:
        _fail(f"saving {path}", rc)
    return st.as_dict()


class SessionFile:
    """An open, checked session file (header and sections read; no KV read)."""

    def __init__(self, path: str):
        h = c_void_p()
        rc = lib().dblade_sessionfile_open(path.encode(), ctypes.byref(h))
        if rc < 0:
            _fail(f"opening {path}", rc)
        self._h = h

    def section(self, kind: int) -> bytes | None:
        data, n = c_void_p(), c_uint64()
        if lib().dblade_sessionfile_section(self._h, kind, ctypes.byref(data), ctypes.byref(n)) < 0:
            return None
        return ctypes.string_at(data, n.value) if n.value else b""

    def restore(self, kv: "KV") -> dict:
        st = SessionFileStats()
        rc = lib().dblade_sessionfile_restore(kv._h, self._h, ctypes.byref(st))
        if rc < 0:
            _fail("restoring the session", rc)
        return st.as_dict()

    def verify(self) -> dict:
        """Reads every KV block once and checks its CRC-32C."""
        st = SessionFileStats()
        rc = lib().dblade_sessionfile_verify(self._h, ctypes.byref(st))
        if rc < 0:
            _fail("verifying the session", rc)
        return st.as_dict()

    def close(self) -> None:
        if getattr(self, "_h", None):
            lib().dblade_sessionfile_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
