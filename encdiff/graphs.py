"""A training update recorded once in a CUDA graph and replayed, on every rank or on none.

    snapshot = Snapshot(tensors, optimizers, generators)   # what the warm-up will change
    graphed = Graphed(body, own_generators, optimizers)
    reason = capture_on_every_rank(graphed, snapshot, warmup, d)   # None: every rank replays
    out = graphed.replay()

The warm-up runs `body` eagerly a few times on a side stream (the allocator, cuDNN's autotuner,
DDP's buckets and torch.compile settle there); its cached blocks are then freed, the update is
recorded, and everything the warm-up changed is put back (Snapshot), so the first real update is the
first replay and a run trains exactly as if the warm-up never happened.

Under DDP the ranks agree before any replay: a rank whose recording failed (an op that cannot be
captured, out of memory) would run eager DDP while the others replay graphs with captured
all-reduces, a hang or a silent divergence. One all-gather of the outcome after the recording, and
every rank keeps its graph only if every rank has one. A failure during the warm-up is the eager
step's own failure and ends the run, as it would without the graph.
"""

import gc

import torch

from encdiff import dist


def optimizer_state(opt):
    """The optimiser's state tensors (moments, step counts) in a fixed order; [] before its first step."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return [v for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]


class Snapshot:
    """What a few updates change, kept so that they can be undone: tensors() (weights, buffers, EMA,
    the guard's), the optimisers' state and the generators'."""

    def __init__(self, tensors, optimizers, generators):
        self.tensors, self.optimizers, self.generators = tensors, optimizers, generators
        self.saved = [t.detach().clone() for t in tensors()]
        self.saved_optimizers = [[t.detach().clone() for t in optimizer_state(opt)] for opt in optimizers]
        self.rng = [g.get_state() for g in generators]

    @torch.no_grad()
    def restore(self):
        for t, s in zip(self.tensors(), self.saved, strict=True):
            t.copy_(s)
        for opt, before in zip(self.optimizers, self.saved_optimizers):
            now = optimizer_state(opt)
            if not before:  # a fresh Adam: its state starts at zero (step 0, zero moments)
                for t in now:
                    t.zero_()
            for t, s in zip(now, before, strict=bool(before)):
                t.copy_(s)
        for g, s in zip(self.generators, self.rng):
            g.set_state(s)


class Graphed:
    """`body()` warmed up, recorded once in a CUDA graph and replayed; a replay fills the same
    output tensors again. own_generators: those body draws from besides the device's default one
    (which the graph knows); optimizers: the fused ones body steps (recorded as capturable)."""

    def __init__(self, body, own_generators, optimizers):
        self.body, self.own_generators, self.optimizers = body, own_generators, optimizers
        self.graph, self.out = None, None

    def warm_up(self, steps):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(steps):
                self.body()
        torch.cuda.current_stream().wait_stream(stream)

    def free_cached_memory(self):
        """The warm-up's blocks stay cached for its stream while the graph takes a pool of its own:
        about a second step's memory, handed back before the recording."""
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()

    def record(self):
        graph = torch.cuda.CUDAGraph()
        for g in self.own_generators:
            graph.register_generator_state(g)
        self.set_capturable(True)  # the fused kernel is the same either way; the flag passes step()'s check
        try:
            with torch.cuda.graph(graph):
                self.out = self.body()
        finally:
            self.set_capturable(False)
        self.graph = graph

    def set_capturable(self, on):
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["capturable"] = on

    def discard(self):
        self.graph, self.out = None, None

    def replay(self):
        self.graph.replay()
        return self.out


def root_cause(error):
    """The first error of a chain, in one line: a failed recording raises its own "capture
    invalidated" error on top of the op that could not be recorded."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:240]


def capture_on_every_rank(graphed, snapshot, warmup, d):
    """Warm up, record, undo the warm-up; then agree with the other ranks. -> None when every rank
    holds a graph, else why not (the first failing rank's root cause), every rank's graph dropped."""
    try:
        graphed.warm_up(warmup)
        graphed.free_cached_memory()
        try:
            graphed.record()
            reason = None
        except Exception as e:  # an op that cannot be recorded, out of memory, ...
            graphed.discard()
            reason = root_cause(e)
    finally:
        snapshot.restore()
    reasons = dist.all_gather_object(reason)
    failed = [(rank, why) for rank, why in enumerate(reasons) if why is not None]
    if not failed:
        return None
    graphed.discard()
    rank, why = failed[0]
    return f"rank {rank}: {why}" if d.enabled else why
