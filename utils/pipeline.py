"""The per-device pipeline: decoder processes feed one device loop that batches across videos.

::

    decoder processes (N)            device process
    ---------------------            -------------------------------------------------------
    open + decode + pick frames  ->  shared-memory slot -> one copy to the device -> slot freed
    (different videos at once)       extractor.add_frames: preprocess, windows -> work items
                                     items of all videos -> batches of batch_size -> forward
                                     rows routed back to their video; a finished video's
                                     outputs go to the writer thread

Frames travel as uint8 in fixed shared-memory slots (never pickled); only small messages
(slot index, frame count, timestamps) go through queues. A frame larger than a slot (8K: 99.5 MB)
travels in its message instead, one frame per slot token, so at most ``SLOTS_PER_DECODER`` such
frames per decoder are in flight. Memory is bounded by the slots and one batch per network, never
by a video's length. A decoding error fails its video only.

Extractors that implement the frame seam of :class:`models.base.Extractor` (``add_frames``,
``forward``, ``finish``) run here; the others run whole videos through ``extract`` as before.
"""
from __future__ import annotations

import collections
import logging
import os
import queue as queue_mod
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any, Callable, Iterable

import numpy as np

from video_features.utils.errors import FeatureError

log = logging.getLogger(__name__)

#: bytes of one shared-memory slot: 48 frames of 640x360, 5 of 1920x1080, 1 of 4096x2160
SLOT_BYTES = 32 << 20
SLOTS_PER_DECODER = 3


def default_decoders(n_devices: int = 1) -> int:
    """Decoder processes per device: the machine's cores shared between the devices."""
    return max(1, (os.cpu_count() or 1) // max(1, n_devices))


# -- decoder processes ---------------------------------------------------------------------------
def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach to one of the device process's slots. Spawned decoders share its resource tracker,
    so attaching adds nothing to clean up; the owner unlinks the segment (and unregisters it)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python 3.13+
    except TypeError:
        return shared_memory.SharedMemory(name=name)


def _decoder_main(index: int, gen: int, slot_names: list[str], free: Any, tasks: Any, out: Any,
                  needs: dict, chunk_frames: int, threads: int, parent: int) -> None:
    """Decode each video sent on ``tasks`` into this decoder's free slots; report on ``out``.
    Every message carries ``(kind, index, gen, vid, ...)`` so the device loop can tell a
    replaced decoder's leftovers from its successor's. Per input: the video stream's messages
    (``open``, ``chunk``..., ``end``) where frames are needed, then the audio's (``audio``...,
    ``audio_end``) where audio is, ``error`` for a stream that fails, ``damaged`` (before its
    ``end`` / ``audio_end``) for a stream decoded around undecodable packets, and ``done``
    last."""
    slots = [_attach(n) for n in slot_names]
    try:
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except queue_mod.Empty:
                if os.getppid() != parent:  # the device process is gone
                    return
                continue
            if task is None:
                return
            vid, path = task
            tag = (index, gen, vid)
            try:
                if needs.get("video", True):
                    _stream_guarded(out, tag, "video", _decode_video, path, tag, slots, free, out,
                                    needs, chunk_frames, threads, parent)
                if needs.get("audio"):
                    _stream_guarded(out, tag, "audio", _decode_audio, path, tag, slots, free, out,
                                    needs["audio"], parent, needs.get("audio_stream"))
            except _ParentGone:
                return
            out.put(("done", *tag))
    finally:
        for s in slots:
            s.close()


def _stream_guarded(out: Any, tag: tuple, stream: str, fn: Callable, *args: Any) -> None:
    """Run one stream's decoding; its failure is reported for that stream only."""
    try:
        fn(*args)
    except FeatureError as exc:
        out.put(("error", *tag, stream, str(exc)))
    except _ParentGone:
        raise
    except Exception as exc:  # a library error: this stream fails, the decoder goes on
        out.put(("error", *tag, stream, f"{type(exc).__name__}: {str(exc).strip()[:200]}"))


def _decode_video(path: str, tag: tuple, slots: list, free: Any, out: Any, needs: dict,
                  chunk_frames: int, threads: int, parent: int) -> None:
    from video_features.utils.video import open_frames

    with open_frames(path, needs["extraction_fps"], needs["frames_fps"],
                     timestamps=needs["timestamps"], threads=threads,
                     extraction_total=needs.get("extraction_total"),
                     rotation=needs.get("rotation", "auto"),
                     video_stream=needs.get("video_stream")) as src:
        out.put(("open", *tag, src.fps))
        _decode_into_slots(src, tag, slots, free, out, chunk_frames, parent)
        if src.damage:
            out.put(("damaged", *tag, "video", src.damage))
        out.put(("end", *tag, src.end_time()))


#: audio samples per transfer (10 s at 16 kHz): few messages, little latency
AUDIO_BLOCK = 160_000


def _decode_audio(path: str, tag: tuple, slots: list, free: Any, out: Any, audio: dict,
                  parent: int, stream: int | None = None) -> None:
    """The audio track (``stream``: which of the file's audio streams; None: FFmpeg's default
    choice) as float32 mono samples at ``audio['sample_rate']``, in slot-sized parts."""
    from video_features.utils.audio import AudioInfo, iter_audio

    per = min(AUDIO_BLOCK, SLOT_BYTES // 4)
    slot = view = None
    n = 0
    info = AudioInfo()
    for block in iter_audio(path, audio["sample_rate"], keep_priming=audio.get("keep_priming", False),
                            dtype=np.float32, info=info, stream=stream):
        at = 0
        while at < len(block):
            if slot is None:
                slot = _take_slot(free, parent)
                view, n = np.ndarray((per,), np.float32, buffer=slots[slot].buf), 0
            k = min(len(block) - at, per - n)
            view[n:n + k] = block[at:at + k]
            n, at = n + k, at + k
            if n == per:
                out.put(("audio", *tag, slot, n))
                slot = view = None
    if slot is not None:
        out.put(("audio", *tag, slot, n))
    if info.damage:
        out.put(("damaged", *tag, "audio", info.damage))
    out.put(("audio_end", *tag))


class _ParentGone(Exception):
    pass


def _take_slot(free: Any, parent: int) -> int:
    while True:
        try:
            return free.get(timeout=1.0)
        except queue_mod.Empty:
            if os.getppid() != parent:
                raise _ParentGone from None


def _decode_into_slots(src: Any, tag: tuple, slots: list, free: Any, out: Any, chunk_frames: int,
                       parent: int) -> None:
    """Frames of ``src`` straight into shared-memory slots, a chunk per slot. Frames larger than
    a slot go one at a time in the message itself, still taking a slot token each, which bounds
    how many are in flight."""
    from video_features.utils.video import check_same_size

    slot = view = None
    n = per_slot = 0
    large = False
    stamps: list[float] = []
    times: list[float] = []
    native = not src.extraction_fps
    first = 0
    shape = None

    def message() -> tuple:
        return ("chunk", *tag, slot, n, shape, np.asarray(stamps, np.float64), first,
                np.asarray(times, np.float64) if native else None)

    try:
        for idx, ts, img in src.timed_frames():
            if shape is None:
                shape = img.shape
                large = img.nbytes > SLOT_BYTES
                per_slot = max(1, min(chunk_frames, SLOT_BYTES // img.nbytes))
            check_same_size(img, shape, idx)
            if large:
                token = _take_slot(free, parent)
                out.put(("chunk", *tag, token, 1, shape, np.asarray([ts], np.float64), idx,
                         np.asarray([src.time_s], np.float64) if native else None, img))
                continue
            if slot is None:
                slot = _take_slot(free, parent)
                view = np.ndarray((per_slot, *shape), np.uint8, buffer=slots[slot].buf)
                n, stamps, times, first = 0, [], [], idx
            view[n] = img
            stamps.append(ts)
            if native:
                times.append(src.time_s)
            n += 1
            if n == per_slot:
                out.put(message())
                slot = view = None
    except BaseException:
        # the input failed mid-chunk: its slot goes back unsent, else every such input would
        # cost this decoder a slot until it waits forever for one
        if slot is not None:
            view = None
            free.put(slot)
        raise
    if slot is not None:
        out.put(message())


def check_shared_memory(needed: int, folder: str = "/dev/shm") -> None:
    """Fail up front, with advice, where the shared-memory file system cannot hold the slots:
    creating them would succeed and writing into them would then kill the process (SIGBUS)."""
    import shutil

    if not os.path.isdir(folder):
        return
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FeatureError(
            f"{folder} has {free >> 20} MB free, the decoders' transfer slots need {needed >> 20} MB: "
            "lower decoders=N, or give the container more shared memory (docker run --shm-size=2g)")


@dataclass
class _Decoder:
    proc: Any
    tasks: Any
    free: Any
    shms: list
    gen: int = 0
    vid: int | None = None      # the video it is decoding


class DecoderPool:
    """``n`` decoder processes, each with its own task queue and shared-memory slots (owned,
    created and unlinked by this process), so the device loop always knows which video each
    decoder holds and a decoder that dies takes only its video (and none of the slots) with it."""

    def __init__(self, n: int, needs: dict, chunk_frames: int, threads: int = 1):
        import multiprocessing as mp

        self._ctx = mp.get_context("spawn")
        self.n = n
        check_shared_memory(n * SLOTS_PER_DECODER * SLOT_BYTES)
        self.out = self._ctx.Queue()
        self._args = (needs, chunk_frames, threads)
        self.decoders: list[_Decoder] = []
        for i in range(n):
            shms = [shared_memory.SharedMemory(create=True, size=SLOT_BYTES)
                    for _ in range(SLOTS_PER_DECODER)]
            self.decoders.append(self._start(i, _Decoder(None, None, None, shms)))
        #: the slots page-locked for the GPU (register_slots), unregistered at close
        self.locked: list[int] = []
        #: (decoder, generation, slot, event): slots whose copy to the GPU may still run
        self.copying: list[tuple[_Decoder, int, int, Any]] = []

    def lock_slots(self, cudart: Any) -> bool:
        """Page-lock every slot (``cudaHostRegister``), so chunks go to the GPU straight from
        their slot, asynchronously: no copy into a pinned buffer on the device thread. All or
        none: False (and nothing left locked) when the driver refuses one."""
        for d in self.decoders:
            for shm in d.shms:
                view = np.frombuffer(shm.buf, np.uint8)
                ptr = view.ctypes.data
                del view   # no export of the buffer may outlive this (close needs none)
                if int(cudart.cudaHostRegister(ptr, shm.size, 0)) != 0:
                    self.unlock_slots(cudart)
                    return False
                self.locked.append(ptr)
        return True

    def unlock_slots(self, cudart: Any) -> None:
        for ptr in self.locked:
            cudart.cudaHostUnregister(ptr)
        self.locked = []

    def release(self, d: _Decoder, slot: int, event: Any = None) -> None:
        """Give ``slot`` back to its decoder, at once or, with ``event`` (the copy out of a
        page-locked slot), once that copy is done."""
        if event is None:
            d.free.put(slot)
        else:
            self.copying.append((d, d.gen, slot, event))

    def release_copied(self, wait: bool = False) -> None:
        """Slots whose copy is done go back to their decoders (``wait``: all, after their copy)."""
        still = []
        for d, gen, slot, event in self.copying:
            if wait:
                event.synchronize()
            if not event.query():
                still.append((d, gen, slot, event))
            elif d.gen == gen:   # a replaced decoder got all its slots back already
                d.free.put(slot)
        self.copying = still

    def _start(self, i: int, d: _Decoder) -> _Decoder:
        d.tasks, d.free, d.vid = self._ctx.Queue(), self._ctx.Queue(), None
        for k in range(len(d.shms)):
            d.free.put(k)
        d.proc = self._ctx.Process(
            target=_decoder_main, name=f"decoder{i}", daemon=True,
            args=(i, d.gen, [s.name for s in d.shms], d.free, d.tasks, self.out, *self._args,
                  os.getpid()))
        d.proc.start()
        return d

    def idle(self) -> list[int]:
        return [i for i, d in enumerate(self.decoders) if d.vid is None]

    def assign(self, i: int, vid: int, path: str) -> None:
        self.decoders[i].vid = vid
        self.decoders[i].tasks.put((vid, path))

    def current(self, index: int, gen: int) -> _Decoder | None:
        """The decoder a message came from, or None for a replaced decoder's leftovers."""
        d = self.decoders[index]
        return d if d.gen == gen else None

    def slot(self, d: _Decoder, k: int, n: int, shape: tuple) -> np.ndarray:
        return np.ndarray((n, *shape), np.uint8, buffer=d.shms[k].buf)

    def samples(self, d: _Decoder, k: int, n: int) -> np.ndarray:
        return np.ndarray((n,), np.float32, buffer=d.shms[k].buf)

    def replace_dead(self) -> list[tuple[int, int | None]]:
        """Restart decoders that died; returns ``(exit code, video it held)`` for each."""
        lost = []
        for i, d in enumerate(self.decoders):
            if d.proc.is_alive():
                continue
            lost.append((d.proc.exitcode, d.vid))
            for other, _, _, event in self.copying:   # its slots are reused from now on
                if other is d:
                    event.synchronize()
            d.gen += 1
            self._start(i, d)
        return lost

    def close(self) -> None:
        for d in self.decoders:
            d.tasks.put(None)
        for d in self.decoders:
            d.proc.join(timeout=5)
            if d.proc.is_alive():
                d.proc.kill()
            for s in d.shms:
                s.close()
                try:
                    s.unlink()
                except FileNotFoundError:
                    pass


# -- the device loop -----------------------------------------------------------------------------
@dataclass
class VideoWork:
    """One input in flight: the extractor's per-video state and the rows computed so far."""

    vid: int
    path: str
    fps: float | None = None
    frames: int = 0
    t0: float = field(default_factory=time.perf_counter)
    state: Any = None                      # the extractor's (windows, previous frame, ...)
    rows: dict = field(default_factory=lambda: collections.defaultdict(list))
    stamps: dict = field(default_factory=lambda: collections.defaultdict(list))
    pending: int = 0                       # work items handed to the batcher, rows not back yet
    decoded: bool = False                  # the decoder has sent everything of this input
    #: native-rate times (s) of the chunk being added (see utils.video.Chunk.times_s)
    times_s: Any = None
    #: "type: reason" of the feature types that failed while others succeeded (utils/multi.py)
    partial_errors: list = field(default_factory=list)
    error: str | None = None
    #: one line per stream decoded around undecodable data (utils/video.py, utils/audio.py)
    damaged: list = field(default_factory=list)

    @property
    def damage(self) -> str:
        """What was decoded around, for the output's record and the summary ("" if nothing)."""
        return "; ".join(self.damaged)


class Batcher:
    """Work items of every video, per network, run up to a batch size at a time.

    Items arrive and leave in blocks (a chunk's items of one video), so the cost in Python is per
    block, not per frame: a batch is the concatenation of whole or split blocks of one item shape
    (videos of other sizes wait for a batch of their own), and its rows go back to each video as
    one block. ``batch_size`` is one size for every network or a function of the network's key.
    ``keep`` may return new work items of the same video (a second network fed by the first's
    rows, e.g. I3D stacks of optical flow): they are queued before the rows count as done.
    """

    def __init__(self, forward: Callable[[str, Any], Any], batch_size: int | Callable[[str], int],
                 keep: Callable[[VideoWork, str, Any, np.ndarray], list | None] | None = None):
        self.forward = forward
        self.size = batch_size if callable(batch_size) else (lambda key, n=batch_size: n)
        #: where a video's rows go (``Extractor.keep_rows``); default: held on the work item
        self.keep = keep or hold_rows
        # key -> queued blocks [work, items (k, ...), stamps (k,)]
        self.queues: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.counts: dict[str, int] = collections.Counter()

    def add(self, work: VideoWork, key: str, items: Any, stamps: np.ndarray) -> None:
        if len(stamps) == 0:
            return
        self.queues[key].append([work, items, np.asarray(stamps, np.float64)])
        self.counts[key] += len(stamps)
        work.pending += len(stamps)

    def _take(self, key: str, size: int) -> list:
        """Up to ``size`` items from the front of ``key``'s queue, as blocks of the first block's
        item shape; a video's blocks keep their order (one skipped stops the search)."""
        q, taken, n = self.queues[key], [], 0
        shape = tuple(q[0][1].shape[1:])
        kept: collections.deque = collections.deque()
        skipped: set[int] = set()
        while q and n < size:
            block = q.popleft()
            work, items, stamps = block
            if tuple(items.shape[1:]) != shape or id(work) in skipped:
                skipped.add(id(work))
                kept.append(block)
                continue
            k = min(len(stamps), size - n)
            if k < len(stamps):  # split the block: its first k items go now
                q.appendleft([work, items[k:], stamps[k:]])
                items, stamps = items[:k], stamps[:k]
            taken.append((work, items, stamps))
            n += k
        q.extendleft(reversed(kept))
        self.counts[key] -= n
        return taken

    def run(self, full_only: bool) -> int:
        """Run the batches that are full (or, with ``full_only=False``, everything queued,
        including what the rows of earlier batches fed in)."""
        import torch

        ran = -1
        total = 0
        while ran:
            ran = 0
            for key in list(self.queues):
                size = max(1, int(self.size(key)))
                while self.counts[key] >= size or (self.counts[key] and not full_only):
                    blocks = self._take(key, size)
                    batch = blocks[0][1] if len(blocks) == 1 else torch.cat([b[1] for b in blocks])
                    rows = self.forward(key, batch)
                    at = 0
                    for work, items, stamps in blocks:
                        more = self.keep(work, key, rows[at:at + len(stamps)], stamps)
                        for k2, items2, stamps2 in more or ():
                            self.add(work, k2, items2, stamps2)
                        work.pending -= len(stamps)
                        at += len(stamps)
                    ran += 1
            total += ran
        return total

    def drop(self, work: VideoWork) -> None:
        for key, q in self.queues.items():
            kept = collections.deque(b for b in q if b[0] is not work)
            self.counts[key] = sum(len(b[2]) for b in kept)
            self.queues[key] = kept
        work.pending = 0

def hold_rows(work: VideoWork, key: str, rows: Any, stamps: np.ndarray) -> None:
    """Keep a block of rows of ``key`` on ``work`` until the video is finished."""
    work.rows[key].append(rows)
    work.stamps[key].append(stamps)


def rows_of(work: VideoWork, key: str) -> tuple[Any, np.ndarray]:
    """All rows of ``key`` for one video, in order, and their timestamps."""
    import torch

    if not work.rows[key]:
        return None, np.zeros(0, np.float64)
    return torch.cat(work.rows[key]), np.concatenate(work.stamps[key])


class _FinishFailed(Exception):
    """``Extractor.finish`` raised ``cause`` (on the writer thread)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _lock_for_device(pool: DecoderPool, device: Any) -> Any:
    """Page-lock ``pool``'s slots when the frames go to a GPU; returns the CUDA runtime used, or
    None (CPU, or the driver refused: chunks then pass through a pinned buffer, with one line)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    try:
        cudart = torch.cuda.cudart()
        if pool.lock_slots(cudart):
            return cudart
        why = "cudaHostRegister failed"
    except Exception as exc:   # noqa: BLE001 - any failure: the pinned-buffer path still works
        why = f"{type(exc).__name__}: {exc}"
    log.info("the decoders' slots could not be page-locked (%s): chunks pass through a pinned "
             "buffer", why)
    return None


class DevicePipeline:
    """Runs many videos through one extractor on its device, decoding in ``n_decoders``
    processes. ``submit`` inputs, then call ``step`` until ``busy`` is false; each input comes
    back exactly once as a :class:`utils.runner.Result` through ``on_result``. An exception out
    of ``step`` (a device error in a batch) concerns every input in flight."""

    def __init__(self, extractor: Any, writer: Any, n_decoders: int,
                 on_result: Callable[[Any], None], decode_threads: int = 1):
        self.ex = extractor
        self.writer = writer
        self.on_result = on_result
        self.batcher = Batcher(extractor.run_batch, extractor.batch_size_of, extractor.keep_rows)
        # rotation and the streams are decided once for the run (run options), so they travel
        # with what to decode
        needs = self.needs = {**extractor.frame_needs(),
                              "rotation": extractor.cfg.get("rotation", "auto"),
                              "video_stream": extractor.cfg.get("video_stream"),
                              "audio_stream": extractor.cfg.get("audio_stream")}
        self.gpu = None  # decoder=nvdec: NVDEC threads decode; the CPU pool takes what they cannot
        if extractor.cfg.get("decoder", "cpu") == "nvdec":
            if needs.get("audio"):
                log.info("decoder=nvdec: audio is needed too, so the CPU decoders decode everything")
            else:
                from video_features.utils.nvdec import MAX_SESSIONS, NvdecPool

                self.gpu = NvdecPool(min(n_decoders, MAX_SESSIONS), extractor.device, needs,
                                     extractor.chunk_frames(), first_index=n_decoders)
        self.pool = DecoderPool(n_decoders if self.gpu is None else min(n_decoders, 2), needs,
                                extractor.chunk_frames(), decode_threads)
        #: the CUDA runtime when the slots are page-locked (chunks copied straight from them)
        self.cudart = _lock_for_device(self.pool, extractor.device)
        self.works: dict[int, VideoWork] = {}
        self.waiting: collections.deque[int] = collections.deque()  # submitted, no decoder yet
        self.cpu_only: set[int] = set()  # NVDEC could not decode them
        self._next = 0
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        #: the event of the chunk being handled's copy out of its page-locked slot
        self._copying: Any = None
        self._writing: list[tuple[VideoWork, Future]] = []

    @property
    def busy(self) -> bool:
        return bool(self.works or self._writing)

    @property
    def in_flight(self) -> int:
        return len(self.works) + len(self._writing)

    def paths_in_flight(self) -> list[str]:
        return [w.path for w in self.works.values()] + [w.path for w, _ in self._writing]

    def abandon(self) -> list[str]:
        """After a batch failed (every input in flight is lost with it): the inputs in flight,
        with what the extractor kept on disk for those not yet finishing removed."""
        paths = self.paths_in_flight()
        for work in list(self.works.values()):
            self._discard(work)
        return paths

    def submit(self, path: str) -> None:
        vid, self._next = self._next, self._next + 1
        self.works[vid] = VideoWork(vid, path)
        self.waiting.append(vid)
        self._assign()

    def _assign(self) -> None:
        self.waiting = collections.deque(v for v in self.waiting if v in self.works)
        pools = [(self.pool, lambda v: self.gpu is None or v in self.cpu_only)]
        if self.gpu is not None:
            pools.insert(0, (self.gpu, lambda v: v not in self.cpu_only))
        for pool, takes in pools:
            for i in pool.idle():
                vid = next((v for v in self.waiting if takes(v)), None)
                if vid is None:
                    break
                self.waiting.remove(vid)
                try:
                    self.ex.begin(self.works[vid])
                except FeatureError as exc:
                    self._fail(self.works[vid], str(exc))
                    continue
                pool.assign(i, vid, self.works[vid].path)

    @property
    def n_decoders(self) -> int:
        """Videos decoded at a time."""
        return self.gpu.n if self.gpu is not None else self.pool.n

    def _get(self, timeout: float) -> tuple:
        """The next message of either pool (queue.Empty after ``timeout``)."""
        if self.gpu is None:
            return self.pool.out.get(timeout=timeout) if timeout > 0 else self.pool.out.get_nowait()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.gpu.out.get_nowait()
            except queue_mod.Empty:
                pass
            try:
                return self.pool.out.get(timeout=min(0.002, max(0.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                if time.monotonic() >= deadline:
                    raise

    def _queued(self) -> bool:
        return not self.pool.out.empty() or (self.gpu is not None and not self.gpu.out.empty())

    def _copy_event(self) -> Any:
        import torch

        event = torch.cuda.Event()
        event.record()
        return event

    def step(self, timeout: float = 0.05) -> None:
        """Handle what the decoders sent (waiting up to ``timeout`` for the first message), run
        full batches, and partial ones when no more frames are waiting; finish done videos."""
        self.pool.release_copied()
        got = 0
        deadline = time.monotonic() + timeout
        while got < 64:
            try:
                msg = self._get(max(0.0, deadline - time.monotonic()) if got == 0 else 0.0)
            except queue_mod.Empty:
                break
            got += 1
            self._handle(msg)
        self.batcher.run(full_only=True)
        if got == 0 or not self._queued():
            self.batcher.run(full_only=False)
        for code, vid in self.pool.replace_dead():
            if vid in self.works:
                self._fail(self.works[vid], f"the decoder process died (exit code {code}) "
                                            "while decoding this input")
        self._finish_ready()
        self._assign()

    def _handle(self, msg: tuple) -> None:
        kind, index, gen, vid = msg[:4]
        decoder = (self.pool.current(index, gen) if index < self.pool.n or self.gpu is None
                   else self.gpu.current(index, gen))
        if decoder is None:
            return  # from a decoder that has been replaced; its slots were reset
        work = self.works.get(vid)
        if kind == "fallback":  # NVDEC cannot decode it: the CPU decoders will
            decoder.vid = None
            if work is not None:
                log.info("decoder=nvdec cannot decode %s (%s): decoding it on the CPU",
                         work.path, msg[4])
                self.cpu_only.add(vid)
                self.waiting.appendleft(vid)
            return
        if kind in ("chunk", "audio", "gpu_chunk"):
            slot = msg[4]
            try:
                if work is not None and work.error is None:
                    self._data(work, decoder, kind, msg)
            except FeatureError as exc:
                self._fail(work, str(exc))
            finally:   # the extractor keeps nothing of the slot (its contract) but its copy
                if kind == "chunk":   # CPU decoders' slots (NVDEC's are its own)
                    self.pool.release(decoder, slot, self._copying)
                else:
                    decoder.free.put(slot)
                self._copying = None
            return
        if kind == "done":
            decoder.vid = None
        if work is None:
            return
        try:
            if kind == "open":
                work.fps = msg[4]
                self.ex.video_opened(work)
            elif kind == "end":
                self._add(work, self.ex.end_frames(work, msg[4]))
            elif kind == "audio_end":
                self._add(work, self.ex.end_audio(work))
            elif kind == "error":
                self.ex.stream_failed(work, msg[4], msg[5])
            elif kind == "damaged":
                work.damaged.append(msg[5])
            elif kind == "done":
                work.decoded = True
        except FeatureError as exc:
            self._fail(work, str(exc))

    def _data(self, work: VideoWork, decoder: _Decoder, kind: str, msg: tuple) -> None:
        if kind == "gpu_chunk":  # frames already on the device (utils/nvdec.py)
            frames, stamps, _first, work.times_s = msg[5:]
            work.frames += len(stamps)
            self.ex.count_frames(len(stamps))
            self._add(work, self.ex.add_frames(work, frames, stamps))
            return
        if kind == "audio":
            items = self.ex.add_audio(work, self.pool.samples(decoder, msg[4], msg[5]))
            if not self.needs.get("video", True):  # audio only: count its examples as frames
                work.frames += sum(len(ts) for _, _, ts in items)
            self._add(work, items)
            return
        slot, n, shape, stamps, _first, work.times_s = msg[4:10]
        work.frames += n
        self.ex.count_frames(n)
        # a frame larger than a slot came in the message itself
        in_slot = len(msg) <= 10
        host = self.pool.slot(decoder, slot, n, shape) if in_slot else msg[10][None]
        locked = in_slot and self.cudart is not None
        frames = self.ex.to_device_frames(host, pinned=locked)
        if locked:   # the slot is free again only once this copy has run
            self._copying = self._copy_event()
        self._add(work, self.ex.add_frames(work, frames, stamps))
        del frames

    def _add(self, work: VideoWork, items: list) -> None:
        for key, rows_in, ts in items:
            self.batcher.add(work, key, rows_in, ts)

    def _fail(self, work: VideoWork, reason: str) -> None:
        from video_features.utils.runner import Result

        work.error = reason
        self.batcher.drop(work)
        self.works.pop(work.vid, None)
        self._discard(work)
        self.on_result(Result(work.path, "failed", reason=reason, frames=work.frames,
                              seconds=time.perf_counter() - work.t0))

    def _discard(self, work: VideoWork) -> None:
        """The extractor's clean-up of an input that failed; its own failure is only logged."""
        try:
            self.ex.discard(work)
        except Exception as exc:  # noqa: BLE001 - the input's failure is already its result
            log.warning("%s: cleaning up after the failure: %s", work.path, exc)

    def _finish_ready(self) -> None:
        from video_features.utils.runner import Result

        for work in [w for w in self.works.values() if w.decoded and w.pending == 0]:
            self.works.pop(work.vid)
            self._writing.append((work, self._writes.submit(self._finish_and_write, work)))
        still = []
        for i, (work, fut) in enumerate(self._writing):
            if not fut.done():
                still.append((work, fut))
                continue
            exc = fut.exception()
            if exc is not None:
                self._discard(work)
            if isinstance(exc, _FinishFailed):
                if not isinstance(exc.cause, FeatureError):
                    # e.g. a device error: as if raised by a batch (this input and those not
                    # yet reported are in flight; the ones reported above are not)
                    self._writing = still + self._writing[i:]
                    raise exc.cause
                res = Result(work.path, "failed", reason=str(exc.cause), frames=work.frames,
                             seconds=time.perf_counter() - work.t0)
            elif exc is None and work.partial_errors:  # others of its feature types were written
                res = Result(work.path, "failed", reason="; ".join(work.partial_errors),
                             frames=work.frames, seconds=time.perf_counter() - work.t0,
                             damaged=work.damage)
            elif exc is None:
                res = Result(work.path, "done", frames=work.frames,
                             seconds=time.perf_counter() - work.t0, damaged=work.damage)
            else:
                res = Result(work.path, "failed", reason=f"writing the outputs failed: {exc}",
                             frames=work.frames)
            self.on_result(res)
        self._writing = still

    def _finish_and_write(self, work: VideoWork) -> None:
        """On the writer thread: the video's outputs (``finish`` copies rows off the device, a
        wait that would otherwise stall the device loop) and their files."""
        import torch

        try:
            with torch.inference_mode():
                feats = self.ex.finish(work)
        except Exception as exc:  # noqa: BLE001 - judged on the device loop
            raise _FinishFailed(exc) from exc
        seconds = time.perf_counter() - work.t0
        info = {"frames": work.frames, "seconds": round(seconds, 3), "device": str(self.ex.device)}
        if work.damage:   # the writer puts it at the top of the input's record
            info["damaged"] = work.damage
        self.writer.write(work.path, feats, info)

    def run(self, paths: Iterable[str], max_in_flight: int | None = None) -> None:
        """Every path through the pipeline, keeping ``max_in_flight`` inputs open at a time. A
        failing batch (a device error) fails the inputs in flight with its reason, and the ones
        not yet submitted as not started. ``paths`` may be a queue (a deque, or the runner's
        :class:`utils.claims.InputQueue`) the caller empties from ``on_result`` to stop feeding:
        the inputs already in the pipeline still finish."""
        from video_features.utils.runner import Result, process_failure

        pending = paths if hasattr(paths, "popleft") else collections.deque(paths)
        limit = max_in_flight or self.n_decoders + 1
        while pending or self.busy:
            while pending and self.in_flight < limit:
                self.submit(pending.popleft())
            try:
                self.step()
            except Exception as exc:
                failure = process_failure(exc)
                for path in self.abandon():
                    self.on_result(Result(path, "failed", reason=failure.reason, stage="extract",
                                          device_broken=failure.device_broken))
                reason = failure.reason
                rest = pending.drain() if hasattr(pending, "drain") else list(pending)
                for path in rest:
                    self.on_result(Result(path, "failed", stage="not_started",
                                          reason=f"not processed: {reason}", attempts=0))
                return

    def close(self) -> None:
        for _, fut in self._writing:
            fut.exception()
        self._writes.shutdown(wait=True)
        self.pool.release_copied(wait=True)
        if self.cudart is not None:
            self.pool.unlock_slots(self.cudart)
        self.pool.close()
        if self.gpu is not None:
            self.gpu.close()
