"""The model contract: every hook the tracing core, the server and the client call on a model wrapper.

Offers:
    ModelContract   a ``typing.Protocol``: each hook a wrapper (NNsight, LanguageModel, VLLM...)
                    may implement, with who calls it and when. ``NNsight`` (base.py) implements
                    all of them with the defaults a plain ``torch.nn.Module`` needs; a wrapper
                    overrides the ones its model differs in.
    HOOKS           the names ``ModelContract`` declares (tests/models/test_contract.py checks that
                    every ``model._hook`` the package calls is one of them)

Only what the core reaches through the model object is here: the envoy tree (``_module``,
``_path``, ``_children``...) is Envoy's own (envoy.py), and the public API (``trace``, ``session``,
``generate``, ``edit``, ``scan``, ``tokenizer``) is documented where it is defined. A wrapper
subclasses NNsight, so it has every hook; the Protocol is the list to read, not a base to inherit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["HOOKS", "ModelContract"]


@runtime_checkable
class ModelContract(Protocol):
    """What a model wrapper offers the tracer, editing, generation, the server and the client.

    Class attributes are read from the class (``getattr(type(model), ...)``): a missing one would
    otherwise fall through to the wrapped module's attributes.
    """

    # ---------------------------------------------------------------- state and class-level switches

    active: Any
    """The interleaver of the trace open on this model, or None. Set by ``Tracer.__enter__`` /
    ``__exit__`` (tracing/trace.py); read by every ``envoy.output`` / ``.input`` access."""

    _narrow_min_ndim: ClassVar[int]
    """``Tracer.__enter__`` and ``tracing.run_together``, once per trace: values with at least this
    many dimensions are narrowed to each invoke's rows (LanguageModel: 2, so 1-D ``cache_position``
    is shared)."""

    _no_gradients: ClassVar[str | None]
    """``backward.patched_backward``, at a ``.backward()`` inside a trace: the message to refuse it
    with (an engine that keeps no autograd graph: VLLM), or None: gradients work."""

    _requests_per_invoke: ClassVar[bool]
    """``server/jobs/cotenant.per_request``, when the server batches co-tenant jobs: True if each
    invoke is a request of its own (no padding, its own sampling: VLLM)."""

    _wire_result: ClassVar[Callable[[Any, Any], list[dict] | None] | None]
    """``server/jobs/execute.run_job`` and ``cotenant``, after a job's block ran: called as
    ``_wire_result(model, tracer.result)``, it turns the result into plain data to send back (VLLM's
    completions); None: the result travels as it is."""

    _generator: Any
    """``GenerateTracer._result_envoy`` (models/generation.py), in a generate block: the envoy whose
    output is ``tracer.result`` (LanguageModel's ``model.generator``); None: the root's output."""

    # ---------------------------------------------------------------- a local trace, in call order

    def _ensure_ready(self) -> None:
        """``Tracer.__enter__`` (and ``edit`` followers), before every local trace: load weights or
        start an engine; not under a fake-tensor mode (``scan`` needs shapes only)."""

    def _default_consumers(self, interleaver: Any, tracer: Any) -> Iterable[Any]:
        """``Tracer.__enter__`` and ``run_together``: consumers served before the user's bodies
        (the replays of ``edit()`` blocks, editing.py)."""

    def _holds_input(self, kwargs: dict) -> bool:
        """``Tracer.__init__``, for ``model.trace(**kwargs)`` with no positional input: whether the
        keyword arguments are an input (a plain module: its forward's keywords; LanguageModel:
        ``input_ids``), or, as in nnsight, arguments for every invoke of the trace
        (``model.trace(output_hidden_states=True)`` with ``tracer.invoke(...)`` blocks)."""

    def _prepare(self, args: tuple, kwargs: dict) -> Any:
        """``Tracer`` / ``Invoker`` (and the server's co-tenant batching), once per input: one
        invoke's arguments -> a prepared input (LanguageModel: token rows)."""

    def _single(self, prepared: Any) -> tuple[tuple, dict]:
        """``Tracer.__enter__``, for a trace given its input directly: the model call for one
        prepared input traced alone."""

    def _batch(self, prepared: list[Any], width: int = 0) -> tuple[tuple, dict, list[Any]]:
        """``Tracer.__exit__`` (invokes) and ``run_together``: several prepared inputs -> one call
        ``(args, kwargs, [Rows])``; ``width``: pad sequences to at least this length."""

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        """nnsight 0.8's hook, called by NNsight's ``_batch`` (models/base.py) when a subclass
        overrides it: the rows one invoke's ``(inputs, kwargs)`` contributes. A subclass's
        ``_batch(invokes, fn) -> (args, kwargs)`` in nnsight's form is wrapped into the form above
        (``__init_subclass__``), its rows counted with this. nnsight's ``model.interleave(fn,
        *args, **kwargs)`` is public API, on NNsight."""

    def _exact_rows(self, prepared: list[Any], spans: list[Any], width: int = 0) -> list[Any]:
        """``run_together`` (the server's co-tenant batch): each input's Rows without the padding
        it did not have alone, so each body sees what it would see alone."""

    def _execute(self, args: tuple, kwargs: dict, **call: Any) -> Any:
        """``Tracer._task``, in the runner greenlet once the bodies are scheduled: run the model
        (``call``: the tracer's extras, e.g. ``generate=`` options)."""

    def _missed_hint(self, envoy: Any) -> str | None:
        """``Interleaver`` (interleave.py), when a requested module never ran: advice for the
        error message, or None."""

    def _envoy_of(self, module: Any) -> Any:
        """``tracer.cache(modules=[...])``: the envoy of an envoy, a submodule or a dotted path."""

    # ---------------------------------------------------------------- remote runs and the server

    def _remote_name(self) -> str:
        """The client (``remote/client.py``, building a job), ``remote="local"`` runs
        (``server/jobs/inprocess.py``) and ``activations`` plans: the name a server knows this
        model by."""

    def _run_remotely(self, method: str, body: Any, frame: Any, inputs: list, call: dict, *,
                      timeout: float | None, blocking: bool, local: bool = False) -> Any:
        """``Tracer.__enter__`` / ``Session.__enter__`` with ``remote=``: the remote run of the
        captured block (an object with ``enter()``, ``exit(exc_type)``, ``job`` and ``result``);
        ``local``: run it as a server would, in this process. Plain modules refuse."""

    def _pad_id(self) -> int:
        """``activations.extract``, before batching documents: the token id that pads rows."""


HOOKS: frozenset[str] = frozenset(
    [*ModelContract.__annotations__]
    + [name for name, value in vars(ModelContract).items() if callable(value) and not name.startswith("__")]
)
