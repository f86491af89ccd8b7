"""How one step runs, decided once by the model runner before it runs: the executor (CUDA graph, compiled
layers, native CPU stack, readable eager forward) and what the step carries (rows sampled, masked,
timed). One frozen object that a reader, a log line (`str(plan)`), a profiler trace (`plan.label`) and
a test can see; `/debug/latency_stats` counts the executors the timed steps used.

The rule, in `ModelRunner.plan`, the first that applies:
  timed (latency timers on)             -> eager: module hooks fire only on the plain forward
  masked rows                           -> compiled on a long step (attention stays outside compiled
                                           code), else eager: masks need the readable attention; rows
                                           masked only to observe the attention (h2o over its evicted
                                           cache) run the native stack where it would run the step, and
                                           it writes what their keys received (`observed_rows`)
  rows reading Quest's blocks, CUDA     -> cuda_graph (Quest's own graphs) for a decode step, else eager
  decode step within the CUDA graphs    -> cuda_graph
  native CPU layers (quantized)         -> native_stack over a float32/bfloat16 cache, else native_layers
  compiled layers, long step            -> compiled (model_runner.COMPILED_MIN_TOKENS tokens or more)
  otherwise                             -> eager
A tensor-parallel engine's rank 0 plans every step as `tensor_parallel` (engine/tp_runner.py): the model's
own forward on every rank, sent to the workers first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXECUTORS = ("cuda_graph", "compiled", "native_stack", "native_layers", "eager", "tensor_parallel")


@dataclass(frozen=True)
class StepPlan:
    executor: str  # one of EXECUTORS
    reason: str  # why this executor, in a few words
    num_seqs: int
    num_tokens: int  # new tokens computed, all sequences together
    num_sampled: int  # rows that sample a token this step
    masked_rows: tuple[int, ...] = ()  # batch rows whose sparsity mask drops keys this step
    prompt_logprob_rows: tuple[int, ...] = ()  # batch rows that report prompt logprobs
    timed: bool = False  # latency timers on: the plain forward, its module hooks firing
    launched_ahead: bool = False  # a decode step launched before the host read the previous one's tokens
    # Batch rows whose decode token reads only chosen KV blocks (Quest) -> the budget in each layer (0: all).
    quest: dict[int, list[int]] = field(default_factory=dict, hash=False)
    # Batch rows over evicted caches whose method observes the attention (h2o), on the native stack, which
    # writes what their keys received.
    observed_rows: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        """decode (one token per sequence), prefill (no sequence decodes) or mixed."""
        if self.num_tokens == self.num_seqs:
            return "decode"
        return "prefill" if self.num_sampled < self.num_seqs else "mixed"

    @property
    def label(self) -> str:
        """The name of the step's executor in profiler traces (inside glassbox::forward, or forward_graph)."""
        return f"glassbox::executor[{self.executor}]"

    def __str__(self) -> str:
        extra = "".join(
            f" {name}={value}"
            for name, value in (
                ("masked", len(self.masked_rows)),
                ("quest", len(self.quest)),
                ("observed", len(self.observed_rows)),
                ("timed", self.timed),
                ("ahead", self.launched_ahead),
            )
            if value
        )
        return (
            f"step {self.executor} ({self.reason}): {self.kind}, {self.num_seqs} seqs, {self.num_tokens} tokens, "
            f"{self.num_sampled} sampled{extra}"
        )
